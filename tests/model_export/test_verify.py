"""``carryover verify``: passes on good exports, FAILS on the T-frozen trap."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import cast

import onnx
import pytest
import torch
from torch import Tensor, nn

from model_export.cells import gru_step
from model_export.examples import attention_decoder
from model_export.export import export_cell
from model_export.verify import verify_model
from service.cli import main
from service.engine.metadata import METADATA_KEY
from service.engine.model import RecurrentModel
from tests.conftest import Exported
from tests.make_models import committed_example


class TracedLoopGRU(nn.Module):
    """The trap: a Python time loop. Tracing unrolls it to the example's T, yet with
    ``dynamic_axes`` the ONNX input still *claims* a dynamic T."""

    def __init__(self, keep_t_symbolic: bool = True) -> None:
        super().__init__()
        self.keep_t_symbolic = keep_t_symbolic
        torch.manual_seed(3)
        self.rnn = nn.GRU(4, 6, batch_first=True)

    def forward(self, x: Tensor, mask: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        h = h0[0]
        w = cast(
            tuple[Tensor, Tensor, Tensor, Tensor],
            (self.rnn.weight_ih_l0, self.rnn.weight_hh_l0, self.rnn.bias_ih_l0, self.rnn.bias_hh_l0),
        )
        ys = []
        for t in range(x.shape[1]):
            m = mask[:, t].unsqueeze(-1)
            h = torch.where(m, gru_step(x[:, t], h, *w), h)
            ys.append(torch.where(m, h, torch.zeros_like(h)))
        y = torch.stack(ys, 1)
        # Slicing by the traced size keeps T symbolic in the graph's shapes, so the loader's
        # shape checks cannot see that the loop itself was unrolled to the example length.
        return (y[:, : x.shape[1]] if self.keep_t_symbolic else y), h.unsqueeze(0)


def export_t_frozen(path: Path, example_steps: int = 5, keep_t_symbolic: bool = True) -> Path:
    args = (torch.randn(2, example_steps, 4), torch.ones(2, example_steps, dtype=torch.bool), torch.zeros(1, 2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TracedLoopGRU(keep_t_symbolic),
            args,
            str(path),
            dynamo=False,
            input_names=["x", "mask", "h0"],
            output_names=["y", "hn"],
            dynamic_axes={
                "x": {0: "B", 1: "T"},
                "mask": {0: "B", 1: "T"},
                "h0": {1: "B"},
                "y": {0: "B", 1: "T"},
                "hn": {1: "B"},
            },
        )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(
        {
            "version": 1,
            "inputs": ["x"],
            "outputs": ["y"],
            "mask": "mask",
            "state": [{"input": "h0", "output": "hn", "batch_axis": 1}],
        }
    )
    onnx.save(model, str(path))
    return path


def test_loading_rejects_a_t_frozen_export_whose_output_shows_it(tmp_path: Path) -> None:
    from service.errors import ModelContractError

    path = export_t_frozen(tmp_path / "frozen.onnx", keep_t_symbolic=False)
    with pytest.raises(ModelContractError, match="output 'y' axis 1 \\(T\\) is fixed to 5"):
        RecurrentModel(path)


def test_verify_fails_on_a_t_frozen_export(tmp_path: Path) -> None:
    path = export_t_frozen(tmp_path / "frozen.onnx")
    model = RecurrentModel(path, warm_up=False)  # it loads: its inputs and outputs claim dynamic B and T
    report = verify_model(model)
    assert not report.ok
    assert "FAILED" in report.render()


def test_warm_up_rejects_a_t_frozen_export(tmp_path: Path) -> None:
    from service.errors import ModelContractError

    with pytest.raises(ModelContractError, match="failed its warm-up run at B=1, T=1"):
        RecurrentModel(export_t_frozen(tmp_path / "frozen.onnx"))


def test_verify_cli_exits_non_zero_on_a_t_frozen_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export_t_frozen(tmp_path / "frozen.onnx")
    assert main(["verify", str(path)]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["gru_stacked", "lstm", "lstm_stacked", "token_gru"])
@pytest.mark.parametrize("form", ["sequence", "step"])
def test_verify_passes_on_every_export(exported: dict[str, Exported], name: str, form: str) -> None:
    report = verify_model(RecurrentModel(getattr(exported[name], form)), seed=11)
    assert report.ok, report.render()
    assert report.layouts == {"right", "left", "holes", "empty"}
    assert 1 in report.batch_sizes and max(report.batch_sizes) > 1
    assert max(report.worst_output_error, report.worst_state_error) <= 1e-5


def test_verify_cli_against_pytorch(exported: dict[str, Exported], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(exported["gru_stacked"].sequence), "--torch-module", "tests.models:gru_stacked"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "worst |error| vs PyTorch" in out


def test_verify_catches_a_module_that_is_not_the_export(exported: dict[str, Exported]) -> None:
    from tests.models import lstm

    model = RecurrentModel(exported["lstm"].sequence)
    other = lstm()
    with torch.no_grad():
        other.head = None
        cast(Tensor, other.rnn.bias_hh_l0).add_(0.5)
    report = verify_model(model, torch_module=other)
    assert not report.ok and report.worst_torch_error is not None and report.worst_torch_error > 1e-3


def test_custom_cell_example_exports_and_verifies(tmp_path: Path) -> None:
    from model_export.examples.leaky_cell import build

    for form in ("sequence", "step"):
        path = export_cell(build(), tmp_path / f"leaky_{form}.onnx", form)
        report = verify_model(RecurrentModel(path), torch_module=build())
        assert report.ok, report.render()
        assert [t.name for t in RecurrentModel(path).contract.outputs] == ["score", "hidden"]


def test_verify_cli_on_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--sequences", "4", "--max-len", "20"]) == 0
    assert "verify charlm: OK" in capsys.readouterr().out


def test_verify_cli_reports_a_broken_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export_t_frozen(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    assert main(["verify", str(path)]) == 1
    assert "no 'carryover' metadata" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["sequence", "step"])
def test_verify_gives_each_sequence_its_own_constants(form: str) -> None:
    """A model with per-session constants: every sequence gets a memory of its own length, padded
    per batch; chunked, padded runs and the PyTorch module agree with the unpadded runs."""
    model = RecurrentModel(getattr(committed_example("attention_decoder"), form))
    report = verify_model(model, sequences=5, max_len=12, rounds=2, torch_module=attention_decoder.build())
    assert report.ok, report.failures
    assert report.worst_torch_error is not None and report.worst_torch_error < 1e-5


def test_inspect_and_annotate_a_model_with_constants_but_no_metadata(tmp_path: Path) -> None:
    """The flags ``carryover inspect`` prints for a bare attention decoder are what
    ``model_export.annotate`` writes into it: the same contract as the exported metadata."""
    from model_export.annotate import annotate

    bare = onnx.load(str(committed_example("attention_decoder").sequence))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert main(["inspect", str(tmp_path / "bare.onnx")]) == 0
    annotated = RecurrentModel(annotate(tmp_path / "bare.onnx", tmp_path / "annotated.onnx"))
    (c,) = annotated.contract.constants
    assert (c.name, c.batch_axis, c.length_axis, c.mask) == ("memory", 0, 1, "memory_mask")
