"""The exporter's tests run on fresh exports made with PyTorch, not on the committed files."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.engine.model import RecurrentModel
from tests.conftest import Exported, load_models
from tests.make_models import export_models

NO_TORCH = importlib.util.find_spec("torch") is None


class _NeedsTorch(pytest.File):
    """Stands in for a test module that would fail to import without torch: one clean skip."""

    def collect(self) -> Iterator[pytest.Item]:
        pytest.skip("the exporter's tests need PyTorch (the export extra)")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    # Only where torch is missing (a `.[dev]`-only install): CI installs the export extra, so nothing skips there.
    return _NeedsTorch.from_parent(parent, path=module_path) if NO_TORCH else None


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Every spec of ``tests/models.py`` exported once per test session, both forms from one trace."""
    return export_models(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="session")
def loaded(exported: dict[str, Exported]) -> dict[str, RecurrentModel]:
    """Runtime models of the fresh exports keyed ``name`` and ``name_step``, plus the bundled ``charlm``."""
    return load_models(exported)
