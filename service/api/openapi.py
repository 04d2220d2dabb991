"""OpenAPI additions FastAPI cannot infer: the documentation-only schemas (``Problem``,
``StepRequest``), problem+json on every error response, and ``X-Request-ID`` on every response."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.api.problems import PROBLEM_MEDIA_TYPE
from service.api.schemas import REQUEST_ID_DOC, Problem, StepRequest


def install_openapi(app: FastAPI) -> None:
    """Wrap ``app.openapi`` (FastAPI's documented way to extend the schema); built once, cached."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (Problem, StepRequest):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(definition.pop("$defs", {}))
            schemas[model.__name__] = definition
        problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if operation.get("security"):  # behind the API key (service.api.auth)
                    operation["responses"].setdefault("401", {"description": "no or an unknown API key"})
                    operation["responses"].setdefault("429", {"description": "a per-key limit is reached"})
                for status, response in operation.get("responses", {}).items():
                    if status[:1] in "45":  # FastAPI's default 422 is not what we send
                        response["content"] = problem_content
                    response.setdefault("headers", {})["X-Request-ID"] = REQUEST_ID_DOC
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
