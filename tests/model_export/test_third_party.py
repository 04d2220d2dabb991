"""Third-party exports (no metadata) served with flags alone: inspect finds their contract,
verify passes, annotate makes the flags unnecessary, and a live server's sessions equal the
torch modules' own runs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from model_export.annotate import annotate
from model_export.annotate import main as annotate_main
from service.app import load_models
from service.cli import main
from service.config import Settings
from service.engine.inspect import inspect_signature
from service.engine.model import RecurrentModel
from service.errors import ModelContractError
from tests.live_server import LiveServer, live_server
from tests.model_export.third_party import F, ThirdParty, export_third_party
from tests.redis_fixture import RedisServer
from tests.service.api.test_http import create, npz, outputs_of, step


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ThirdParty]:
    return export_third_party(tmp_path_factory.mktemp("third_party"))


def settings_for(models: dict[str, ThirdParty]) -> Settings:
    """Each model with its own ``MODEL=``-prefixed flags."""
    return Settings(
        models=[f"{name}={m.path}" for name, m in models.items()],
        state=[f"{name}={pair}" for name, m in models.items() for pair in m.state],
        mask=[f"{name}={m.mask}" for name, m in models.items() if m.mask],
    )


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, third_party: dict[str, ThirdParty]) -> Iterator[LiveServer]:
    with live_server(redis_server.url, load_models(settings_for(third_party))) as server:
        yield server


def test_inspect_finds_each_contract(third_party: dict[str, ThirdParty]) -> None:
    for name, m in third_party.items():
        found = inspect_signature(ort.InferenceSession(str(m.path), providers=["CPUExecutionProvider"]))
        assert [f"{i}:{o}:{a}" if a else f"{i}:{o}" for i, o, a in found.pairs] == m.state, name
        assert found.mask == (m.mask or ("mask" if name.startswith("loop") else None)), name
        assert found.form == ("sequence" if name.startswith("loop") else "step"), name


def test_symbolic_output_dims_are_measured_at_warm_up(third_party: dict[str, ThirdParty]) -> None:
    loop = third_party["loop_float"]
    shapes = {o.name: o.shape for o in ort.InferenceSession(str(loop.path)).get_outputs()}
    assert not isinstance(shapes["hn"][2], int) and not isinstance(shapes["y"][2], int)  # as the Loop leaves them
    model = RecurrentModel(loop.path, state_pairs=loop.state, warm_up=False)
    assert model.contract.outputs[0].shape == (3,) and model.contract.states[0].shape == (2, 6)


def test_cli_inspect_prints_the_serve_command_and_verify_takes_the_flags(
    third_party: dict[str, ThirdParty], capsys: pytest.CaptureFixture[str]
) -> None:
    m = third_party["loop_bool"]
    assert main(["inspect", str(m.path)]) == 0
    out = capsys.readouterr().out
    assert f"carryover serve --model loop_bool={m.path} --state loop_bool=h0:hn:1 --mask loop_bool=valid" in out
    assert "check: loads and runs" in out
    assert main(["verify", str(m.path), "--state", "h0:hn:1", "--mask", "valid", "--sequences", "4"]) == 0
    assert "verify loop_bool: OK" in capsys.readouterr().out
    assert main(["verify", str(m.path), "--state", "h0:hn:1", "--form", "step"]) == 1
    assert "breaks the contract" in capsys.readouterr().out


def test_annotate_makes_flags_unnecessary(third_party: dict[str, ThirdParty], tmp_path: Path) -> None:
    m = third_party["lstm_step"]
    with pytest.raises(ModelContractError, match="no 'carryover' metadata"):
        RecurrentModel(m.path)
    flagged = RecurrentModel(m.path, state_pairs=m.state).contract
    target = annotate(m.path, tmp_path / "annotated.onnx")  # the inspected guess, checked by loading
    assert RecurrentModel(target).contract == flagged
    assert annotate_main([str(target)]) == 1  # already annotated
    cells = third_party["cells_dynamo"]
    flags = [arg for pair in cells.state for arg in ("--state", pair)]
    assert annotate_main([str(cells.path), "-o", str(tmp_path / "cells.onnx"), *flags]) == 0
    assert RecurrentModel(tmp_path / "cells.onnx").contract.form == "step"


def test_per_model_flags_and_their_errors(third_party: dict[str, ThirdParty]) -> None:
    s = settings_for(third_party)
    assert s.model_flags("loop_bool").state == ("h0:hn:1",) and s.model_flags("loop_bool").mask == "valid"
    assert s.model_flags("cells_dynamo").mask is None
    shared = Settings(models=["a=x.onnx", "b=y.onnx"], state=["h0:hn", "b=h:hn:1"], form=["step"])
    assert shared.model_flags("a").state == ("h0:hn",) and shared.model_flags("b").state == ("h:hn:1",)
    assert shared.model_flags("b").form == "step"
    with pytest.raises(ModelContractError, match="names model 'c', which is not served"):
        Settings(models=["a=x.onnx"], state=["c=h0:hn"]).model_flags("a")
    with pytest.raises(ModelContractError, match="must be sequence or step"):
        Settings(models=["a=x.onnx"], form=["loop"]).model_flags("a")


async def _session(client: httpx.AsyncClient, name: str, m: ThirdParty, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(rng.integers(5, 20)), F)).astype(np.float32)
    sid = await create(client, model=name)
    cuts = sorted(rng.choice(np.arange(1, len(x)), size=2, replace=False).tolist())
    outs = []
    for chunk in np.split(x, cuts):
        r = await step(client, sid, {"x": chunk})
        assert r.status_code == 200, r.text
        outs.append(outputs_of(r)["y"])
    state = npz((await client.get(f"/v1/sessions/{sid}/state")).content)
    ref_y, ref_states = m.reference(x)
    np.testing.assert_allclose(np.concatenate(outs), ref_y, atol=1e-5, rtol=0)
    for k, v in ref_states.items():
        np.testing.assert_allclose(state[k], v, atol=1e-5, rtol=0)


async def test_served_with_flags_alone_equal_torch(served: LiveServer, third_party: dict[str, ThirdParty]) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        await asyncio.gather(*(_session(client, name, m, seed) for seed in range(4) for name, m in third_party.items()))
