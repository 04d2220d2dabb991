"""The exporter's tests run on fresh exports made with PyTorch, not on the committed files."""

from __future__ import annotations

import pytest

from service.engine.model import RecurrentModel
from tests.conftest import Exported, load_models
from tests.make_models import export_models


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Every spec of ``tests/models.py`` exported once per test session, both forms from one trace."""
    return export_models(tmp_path_factory.mktemp("exported"))


@pytest.fixture(scope="session")
def loaded(exported: dict[str, Exported]) -> dict[str, RecurrentModel]:
    """Runtime models of the fresh exports keyed ``name`` and ``name_step``, plus the bundled ``charlm``."""
    return load_models(exported)
