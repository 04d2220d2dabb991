"""Install profiles: the runtime (``pip install carryover``, ``make run``) serves without torch
or dev tools; ``make test`` adds the dev and export extras on top of the same venv."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tests.deploy.files import ROOT

DEV_OR_EXPORT_ONLY = {"torch", "onnxscript", "matplotlib", "mypy", "ruff", "pytest", "tqdm"}

# Everything `carryover serve` runs before it answers: the CLI, the settings, the app with its
# lifespan (bundled model loaded, store connected, batchers started and stopped) and the
# transports; then which heavy packages got imported along the way.
SERVE_PATH = textwrap.dedent(
    """
    import asyncio, sys
    from service.cli import build_parser
    build_parser().parse_args(["serve"])
    from service.app import create_app
    from service.api.state import app_state
    from service.config import Settings
    import service.serve, service.api.http, service.api.ws, service.client
    app = create_app(Settings(redis_url=sys.argv[1]))

    async def main() -> None:
        async with app.router.lifespan_context(app):
            assert app_state(app).ready

    asyncio.run(main())
    print(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:])))
    """
)


def test_serving_imports_no_torch(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_PATH, redis_url, *sorted(DEV_OR_EXPORT_ONLY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"serving imported dev/export-only packages: {result.stdout}"


def test_runtime_dependencies_exclude_dev_and_export_tools() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert not runtime & DEV_OR_EXPORT_ONLY
    export = {Requirement(r).name.lower() for r in project["optional-dependencies"]["export"]}
    assert "torch" in export


def make_dry_run(venv: Path, target: str) -> str:
    """The commands ``make TARGET`` would run with this venv (``make -n``: nothing is run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    result = subprocess.run(
        ["make", "-n", "-C", str(ROOT), f"VENV={venv}", target],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def installs(commands: str) -> list[str]:
    return [line for line in commands.splitlines() if " -m pip install" in line and " -U pip" not in line]


def test_make_run_installs_only_the_runtime(tmp_path: Path) -> None:
    commands = make_dry_run(tmp_path / "venv", "run")
    assert [line.split()[-1] for line in installs(commands)] == ["."]  # `pip install ... -e .`
    assert "carryover serve" in commands


def test_make_test_installs_dev_and_export(tmp_path: Path) -> None:
    assert [line.split()[-1] for line in installs(make_dry_run(tmp_path / "venv", "test"))] == ['".[dev,export]"']


def test_make_test_after_make_run_upgrades_and_not_the_other_way(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".runtime-stamp").touch()  # as `make run` leaves it
    assert installs(make_dry_run(venv, "run")) == []
    assert len(installs(make_dry_run(venv, "test"))) == 1
    (venv / ".installed-stamp").touch()  # as `make test` leaves it
    assert installs(make_dry_run(venv, "test")) == []
    assert installs(make_dry_run(venv, "run")) == []
