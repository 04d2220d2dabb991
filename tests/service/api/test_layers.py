"""Dependencies flow one way (api → sessions → engine → store): the transports never reach past
``service.sessions``, nothing below the API and the composition imports FastAPI or Starlette,
and no module grows past a sitting's read."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[3] / "service"
COMPOSITION = {"app.py", "serve.py", "cli.py"}
MAX_LINES = 400


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_api_reaches_no_further_than_sessions() -> None:
    for path in (SERVICE / "api").glob("*.py"):
        below = {n for n in imports(path) if n.startswith(("service.engine", "service.store"))}
        assert not below, f"{path.name} imports {sorted(below)}: go through service.sessions"


def test_only_the_api_and_the_composition_import_the_web_framework() -> None:
    for path in SERVICE.rglob("*.py"):
        relative = path.relative_to(SERVICE)
        if relative.parts[0] == "api" or str(relative) in COMPOSITION:
            continue
        web = {n for n in imports(path) if n.split(".")[0] in ("fastapi", "starlette", "uvicorn")}
        assert not web, f"{relative} imports {sorted(web)}"


def test_modules_stay_small() -> None:
    for path in [*(SERVICE / "api").glob("*.py"), SERVICE / "sessions.py", SERVICE / "app.py"]:
        assert len(path.read_text().splitlines()) <= MAX_LINES, path.name
