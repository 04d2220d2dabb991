"""The pages people open in a browser: the live page at ``/`` and the API docs at ``/docs`` and
``/redoc``, all served from installed packages, so they work offline (no CDN).

* ``/`` is ``service/api/static/index.html`` (package data; no build step); its other files, if
  any, are under ``/static/``.
* ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) load their JavaScript and CSS from
  ``/docs-assets/``: the files shipped by the ``fastapi-offline`` package, which tracks Swagger UI 5
  (needed for the OpenAPI 3.1 schema FastAPI writes). FastAPI's own ``/docs`` and ``/redoc`` pull
  the same files from a CDN; :func:`install_page` replaces them.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse, HTMLResponse, Response

STATIC_DIR = Path(str(files("service.api") / "static"))
DOCS_ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
STATIC_URL, DOCS_ASSETS_URL = "/static", "/docs-assets"
DOCS_URL, REDOC_URL = "/docs", "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    """The prefix the app is mounted under (``--root-path`` behind a proxy), for absolute URLs."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/")
async def live_page() -> Response:
    """The live page: type into the char LM and watch its next-character predictions."""
    # no-cache: a new server version's page is picked up on reload (the session lives in Redis)
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} — API docs",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_URL)
async def redoc(request: Request) -> HTMLResponse:
    root, app = _root(request), request.app
    return get_redoc_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} — API reference",
        redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


def install_page(app: FastAPI) -> None:
    """Serve ``/``, ``/static``, ``/docs``, ``/redoc`` and ``/docs-assets`` on ``app``."""
    # FastAPI registered CDN-backed /docs and /redoc in its constructor; these replace them.
    replaced = {DOCS_URL, REDOC_URL, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS_DIR), name="docs-assets")
