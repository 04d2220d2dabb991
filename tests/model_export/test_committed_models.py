"""The committed test models (``tests/data/models/``) are what the specs export to today.

The server tests run from those files without PyTorch; this test exports again and fails while
they are stale. Fix: ``.venv/bin/python -m tests.make_models`` and commit the files."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from model_export.verify import random_constants, random_inputs, unpadded_run
from service.engine.model import RecurrentModel
from tests.conftest import Exported
from tests.make_models import EXAMPLES, committed_example, committed_models, export_example
from tests.models import SPECS

REGENERATE = "stale: run `python -m tests.make_models` and commit tests/data/models/"


def test_every_spec_is_committed_and_nothing_else() -> None:
    committed = committed_models()
    assert sorted(committed) == sorted(SPECS), REGENERATE
    for e in committed.values():
        assert e.sequence.is_file() and e.step.is_file(), REGENERATE


def _signature(model: onnx.ModelProto) -> tuple[object, ...]:
    """Metadata, opsets and the graph's inputs and outputs with their types and shapes."""
    return (
        sorted((p.key, p.value) for p in model.metadata_props),
        sorted((o.domain, o.version) for o in model.opset_import),
        [vi.SerializeToString() for vi in (*model.graph.input, *model.graph.output)],
    )


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("form", ["sequence", "step"])
def test_committed_file_matches_a_fresh_export(exported: dict[str, Exported], name: str, form: str) -> None:
    """Same contract and same numbers (outputs and states over holes in the mask, from random states)."""
    fresh_path, committed_path = getattr(exported[name], form), getattr(committed_models()[name], form)
    assert _signature(onnx.load(str(committed_path))) == _signature(onnx.load(str(fresh_path))), REGENERATE
    fresh, committed = RecurrentModel(fresh_path), RecurrentModel(committed_path)
    rng = np.random.default_rng(5)
    batch, steps = 3, 7
    rows = [random_inputs(fresh.contract, steps, rng) for _ in range(batch)]
    inputs = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    mask = rng.random((batch, steps)) < 0.6
    initial = fresh.contract.initial_states(batch)
    states = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in initial.items()}
    a, b = fresh.run(inputs, mask, states), committed.run(inputs, mask, states)
    for k in a.outputs:
        np.testing.assert_allclose(b.outputs[k], a.outputs[k], atol=1e-6, err_msg=REGENERATE)
    for k in a.states:
        np.testing.assert_allclose(b.states[k], a.states[k], atol=1e-6, err_msg=REGENERATE)


@pytest.fixture(scope="module")
def fresh_examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("examples")
    return {name: export_example(name, root) for name in EXAMPLES}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
@pytest.mark.parametrize("form", ["sequence", "step"])
def test_committed_example_matches_a_fresh_export(fresh_examples: dict[str, Exported], name: str, form: str) -> None:
    """The committed examples (per-session constants) too: same contract, same numbers."""
    fresh_path, committed_path = getattr(fresh_examples[name], form), getattr(committed_example(name), form)
    assert _signature(onnx.load(str(committed_path))) == _signature(onnx.load(str(fresh_path))), REGENERATE
    fresh, committed = RecurrentModel(fresh_path), RecurrentModel(committed_path)
    rng = np.random.default_rng(6)
    data = [random_inputs(fresh.contract, 5, rng) for _ in range(3)]
    constants = [random_constants(fresh.contract, rng) for _ in data]
    for inputs, k in zip(data, constants, strict=True):
        a, b = unpadded_run(fresh, inputs, k), unpadded_run(committed, inputs, k)
        for got, want in zip(b, a, strict=True):
            for key in want:
                np.testing.assert_allclose(got[key], want[key], atol=1e-6, err_msg=REGENERATE)
