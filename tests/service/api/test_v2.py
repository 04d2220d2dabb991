"""``/v2`` (Open Inference Protocol + Triton's sequence extension) end to end, with the real
``tritonclient[http]`` as the client: a real uvicorn, real Redis, real ONNX Runtime."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model_export.verify import random_inputs
from service.api.problems import v2_response
from service.api.v2 import sequence_session_id
from service.api.v2_tensors import HEADER_LENGTH, encode_reply, parse_infer
from service.engine.model import RecurrentModel
from service.errors import InvalidInput
from service.keys import key_line, new_key
from service.sequences import is_derived_id
from service.sessions import is_session_id
from tests.engines import assert_matches_offline, offline
from tests.live_server import API_MODELS, LiveServer, live_server
from tests.redis_fixture import RedisServer


@pytest.fixture
def client(api_server: LiveServer) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(api_server.url.removeprefix("http://"), network_timeout=30.0)
    yield c
    c.close()


@pytest.fixture
def models(loaded: dict[str, RecurrentModel]) -> dict[str, RecurrentModel]:
    return {name: loaded[key] for name, key in API_MODELS.items()}


# -- helpers --------------------------------------------------------------------------------------
def tensor(name: str, array: np.ndarray, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), triton.np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def infer(
    client: triton.InferenceServerClient,
    model: str,
    inputs: dict[str, np.ndarray],
    binary: bool = True,
    batch_axis: bool = True,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """One request of ``[T, ...]`` inputs (sent as ``[1, T, ...]`` unless ``batch_axis`` is
    False); the ``[T, ...]`` outputs."""
    sent = [tensor(k, v[None] if batch_axis else v, binary) for k, v in inputs.items()]
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("y", "logits") if n in OUTPUT[model]]
    result = client.infer(model, sent, outputs=outputs, **kwargs)
    return {k: result.as_numpy(k)[0] if batch_axis else result.as_numpy(k) for k in OUTPUT[model]}


OUTPUT = {"gru": ("y",), "tokens": ("logits",), "lstm_step": ("y",)}


def split(inputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    cuts = np.cumsum(sizes)[:-1]
    return [
        dict(zip(inputs, parts, strict=True))
        for parts in zip(*(np.split(v, cuts) for v in inputs.values()), strict=True)
    ]


def joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sequence_state(server: LiveServer, model: str, sequence: int | str) -> dict[str, np.ndarray]:
    """A sequence is a session: its state, exported through /v1 under its session id."""
    r = httpx.get(f"{server.url}/v1/sessions/{sequence_session_id(model, sequence)}/state", timeout=30)
    assert r.status_code == 200, r.text
    archive = np.load(io.BytesIO(r.content), allow_pickle=False)
    return {k: archive[k] for k in archive.files}


def error_of(excinfo: pytest.ExceptionInfo[InferenceServerException]) -> tuple[str, str]:
    return str(excinfo.value.status()), str(excinfo.value.message())


# -- health and metadata --------------------------------------------------------------------------
def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "carryover"
    assert {"sequence", "binary_tensor_data"} <= set(meta["extensions"])


def test_model_metadata_in_the_protocols_terms(client: triton.InferenceServerClient) -> None:
    gru = client.get_model_metadata("gru")
    assert gru["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, -1, 4]}]
    assert gru["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, -1, 3]}]
    assert gru["versions"] == ["1"]
    assert client.get_model_metadata("gru", model_version="1") == gru
    tokens = client.get_model_metadata("tokens")
    assert tokens["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": [1, -1]}]
    assert client.is_model_ready("tokens")
    assert client.is_model_ready("gru", model_version="1")
    assert not client.is_model_ready("nope")
    for model, version in (("nope", ""), ("gru", "2")):
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata(model, model_version=version)
        assert error_of(e)[0] == "404"


# -- sequences ------------------------------------------------------------------------------------
def test_interleaved_sequences_match_the_offline_reference(
    client: triton.InferenceServerClient, api_server: LiveServer, models: dict[str, RecurrentModel]
) -> None:
    """An int and a string sequence, interleaved, one in binary and one in JSON, split into
    requests of uneven length: each equals its whole sequence run alone."""
    rng = np.random.default_rng(12)
    model = models["gru"]
    a, b = random_inputs(model.contract, 12, rng), random_inputs(model.contract, 9, rng)
    a_parts, b_parts = split(a, [5, 1, 6]), split(b, [2, 4, 3])
    a_ids, b_ids = 4_000_000_000_123, "user-7/chat"  # a uint64 above 2**32; a string outside the id rule
    out_a, out_b = [], []
    for i, (pa, pb) in enumerate(zip(a_parts, b_parts, strict=True)):
        out_a.append(infer(client, "gru", pa, binary=True, sequence_id=a_ids, sequence_start=i == 0))
        out_b.append(infer(client, "gru", pb, binary=False, sequence_id=b_ids, sequence_start=i == 0))
    assert_matches_offline(model, a, joined(out_a), sequence_state(api_server, "gru", a_ids))
    assert_matches_offline(model, b, joined(out_b), sequence_state(api_server, "gru", b_ids))


def test_token_lm_with_and_without_the_batch_axis(
    client: triton.InferenceServerClient, models: dict[str, RecurrentModel]
) -> None:
    """INT64 ``[1, T]`` token ids, then ``[T]`` (no batch axis): outputs come back in kind."""
    tokens = {"tokens": np.array([1, 4, 2, 9, 0, 3, 3], dtype=np.int64)}
    first, second = split(tokens, [4, 3])
    out = [
        infer(client, "tokens", first, sequence_id="lm", sequence_start=True),
        infer(client, "tokens", second, batch_axis=False, sequence_id="lm", sequence_end=True),
    ]
    ref, _ = offline(models["tokens"], tokens)
    np.testing.assert_allclose(joined(out)["logits"], ref["logits"], atol=1e-5, rtol=0)


def test_sequence_start_restarts_a_sequence(
    client: triton.InferenceServerClient, api_server: LiveServer, models: dict[str, RecurrentModel]
) -> None:
    rng = np.random.default_rng(3)
    model = models["gru"]
    infer(client, "gru", random_inputs(model.contract, 6, rng), sequence_id=99, sequence_start=True)
    fresh = random_inputs(model.contract, 4, rng)
    out = infer(client, "gru", fresh, sequence_id=99, sequence_start=True)  # from the initial state again
    assert_matches_offline(model, fresh, out, sequence_state(api_server, "gru", 99))


def test_sequence_end_releases_the_sequence(client: triton.InferenceServerClient, api_server: LiveServer) -> None:
    x = {"x": np.ones((2, 4), np.float32)}
    infer(client, "gru", x, sequence_id=5, sequence_start=True)
    result = client.infer("gru", [tensor("x", x["x"][None])], sequence_id=5, sequence_end=True)
    assert result.get_response()["parameters"] == {"sequence_id": 5, "sequence_step": 4}
    r = httpx.get(f"{api_server.url}/v1/sessions/{sequence_session_id('gru', 5)}", timeout=30)
    assert r.status_code == 404
    with pytest.raises(InferenceServerException) as e:
        infer(client, "gru", x, sequence_id=5)  # no sequence_start: not active
    status, message = error_of(e)
    assert status == "404" and "sequence_start" in message


def test_sequences_are_per_model(client: triton.InferenceServerClient, models: dict[str, RecurrentModel]) -> None:
    """The same sequence id on two models names two sequences (as in Triton)."""
    x = random_inputs(models["gru"].contract, 3, np.random.default_rng(1))
    infer(client, "gru", x, sequence_id="shared", sequence_start=True)
    out = infer(client, "lstm_step", x, sequence_id="shared", sequence_start=True, sequence_end=True)
    ref, _ = offline(models["lstm_step"], x)
    np.testing.assert_allclose(out["y"], ref["y"], atol=1e-5, rtol=0)


def test_a_call_without_a_sequence_is_stateless(
    client: triton.InferenceServerClient, redis_server: RedisServer, models: dict[str, RecurrentModel]
) -> None:
    x = random_inputs(models["gru"].contract, 5, np.random.default_rng(8))
    with redis_server.client() as r:
        keys = set(r.scan_iter())
        for sequence_id in (0, ""):
            out = infer(client, "gru", x, sequence_id=sequence_id)
            ref, _ = offline(models["gru"], x)
            np.testing.assert_allclose(out["y"], ref["y"], atol=1e-5, rtol=0)
        # Nothing stored (earlier tests' keys may expire meanwhile: a count could drop by one).
        assert set(r.scan_iter()) <= keys


def test_a_sequence_moves_between_replicas(
    client: triton.InferenceServerClient, redis_server: RedisServer, models: dict[str, RecurrentModel]
) -> None:
    """Its state is in Redis: a second server (a replica, or this one restarted) continues it."""
    model = models["gru"]
    x = random_inputs(model.contract, 7, np.random.default_rng(21))
    first, rest = split(x, [3, 4])
    out = [infer(client, "gru", first, sequence_id=314, sequence_start=True)]
    with live_server(redis_server.url, models) as other:
        replica = triton.InferenceServerClient(other.url.removeprefix("http://"), network_timeout=30.0)
        out.append(infer(replica, "gru", rest, sequence_id=314))
        state = sequence_state(other, "gru", 314)
        replica.close()
    assert_matches_offline(model, x, joined(out), state)


def test_compressed_request_and_reply_options(
    client: triton.InferenceServerClient, models: dict[str, RecurrentModel]
) -> None:
    x = random_inputs(models["gru"].contract, 3, np.random.default_rng(5))
    result = client.infer("gru", [tensor("x", x["x"][None])], request_compression_algorithm="gzip")
    ref, _ = offline(models["gru"], x)
    np.testing.assert_allclose(result.as_numpy("y")[0], ref["y"], atol=1e-5, rtol=0)


def test_with_api_keys_sequences_belong_to_their_key(
    tmp_path: Path, redis_server: RedisServer, models: dict[str, RecurrentModel]
) -> None:
    """Models and inference take the Bearer key (health and server metadata stay open); a
    sequence is namespaced by its key: another key's sequence 1 is a different sequence."""
    alice, bob = new_key(), new_key()
    keys = tmp_path / "keys"
    keys.write_text(key_line("alice", alice) + "\n" + key_line("bob", bob) + "\n")
    x = random_inputs(models["gru"].contract, 3, np.random.default_rng(4))
    with live_server(redis_server.url, models, api_keys_file=keys) as server:
        c = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=30.0)
        assert c.is_server_live() and c.is_server_ready() and c.get_server_metadata()["name"] == "carryover"
        with pytest.raises(InferenceServerException) as e:
            c.get_model_metadata("gru")
        assert error_of(e)[0] == "401"
        r = httpx.post(f"{server.url}/v2/models/gru/infer", content=b"{}", timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and set(r.json()) == {"error"}
        as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
        assert c.get_model_metadata("gru", headers=as_alice)["name"] == "gru"
        infer(c, "gru", x, sequence_id=1, sequence_start=True, headers=as_alice)
        with pytest.raises(InferenceServerException) as e:
            infer(c, "gru", x, sequence_id=1, headers=as_bob)
        assert error_of(e)[0] == "404"
        infer(c, "gru", x, sequence_id=1, sequence_end=True, headers=as_alice)
        c.close()


# -- bad requests ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "inputs", "status", "words"),
    [
        ("nope", {"x": np.zeros((1, 2, 4), np.float32)}, "404", "not served"),
        ("gru", {"x": np.zeros((1, 2, 4), np.float64)}, "400", "datatype FP64"),
        ("gru", {"x": np.zeros((1, 2, 5), np.float32)}, "400", "shape [1, 2, 5]"),
        ("gru", {"x": np.zeros((2, 2, 4), np.float32)}, "400", "one sequence per request"),
        ("gru", {"z": np.zeros((1, 2, 4), np.float32)}, "400", "unknown input 'z'"),
        ("gru", {"x": np.zeros((1, 0, 4), np.float32)}, "400", "empty"),
        ("tokens", {"tokens": np.array([[1, 400]], np.int64)}, "400", "out of range"),
        ("lstm_step", {"x": np.full((1, 1, 4), np.nan, np.float32)}, "400", "NaN"),
    ],
)
def test_bad_requests_get_the_protocols_errors(
    client: triton.InferenceServerClient, model: str, inputs: dict[str, np.ndarray], status: str, words: str
) -> None:
    for binary in (True, False):
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, [tensor(k, v, binary) for k, v in inputs.items()])
        got, message = error_of(e)
        assert got == status and words in message, message


def test_a_bad_request_leaves_the_sequence_as_it_was(
    client: triton.InferenceServerClient, api_server: LiveServer, models: dict[str, RecurrentModel]
) -> None:
    """Even with ``sequence_start``: the inputs are checked before the sequence is reset."""
    model = models["gru"]
    x = random_inputs(model.contract, 4, np.random.default_rng(2))
    out = infer(client, "gru", x, sequence_id="keep", sequence_start=True)
    bad = tensor("x", np.zeros((1, 2, 4), np.float64))
    for kwargs in ({"sequence_start": True}, {}, {"outputs": [triton.InferRequestedOutput("nope")]}):
        with pytest.raises(InferenceServerException) as e:
            client.infer("gru", [bad], sequence_id="keep", **kwargs)
        assert error_of(e)[0] == "400"
    assert_matches_offline(model, x, out, sequence_state(api_server, "gru", "keep"))


def test_raw_bodies_and_unrouted_paths(api_server: LiveServer) -> None:
    """Binary data with no Content-Type at all; malformed bodies and unknown paths: ``{"error"}``."""
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 4)
    head = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, 2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}]}
    )
    with httpx.Client(base_url=api_server.url, timeout=30) as http:
        r = http.post("/v2/models/gru/infer", content=head + x.tobytes(), headers={HEADER_LENGTH: str(len(head))})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["outputs"][0]["shape"] == [1, 2, 3]
        for path, body, headers, status in [
            ("/v2/models/gru/infer", b"{not json", {}, 400),
            ("/v2/models/gru/infer", b"", {}, 400),
            ("/v2/models/gru/infer", head + x.tobytes()[:7], {HEADER_LENGTH: str(len(head))}, 400),
            ("/v2/models/gru/infer", head + x.tobytes(), {HEADER_LENGTH: "9999"}, 400),
            ("/v2/models/gru/infer", gzip.compress(head), {"content-encoding": "br"}, 400),
            ("/v2/models/gru/infer", b'{"inputs": [], "parameters": {"sequence_id": -1}}', {}, 400),
            ("/v2/models/gru/versions/3/infer", head, {}, 404),
            ("/v2/nowhere", b"", {}, 404),
            ("/v2/models/gru/infer", b" " * (300 * 1024), {}, 413),  # over the server's max_body_bytes
        ]:
            r = http.post(path, content=body, headers=headers)
            assert r.status_code == status, (path, r.text)
            assert set(r.json()) == {"error"} and r.json()["error"], r.text
        r = http.post(
            "/v2/models/gru/infer",
            json={
                "inputs": [{"name": "x", "shape": [1, 1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
                "parameters": {"sequence_id": 1 << 64},
            },
        )
        assert r.status_code == 400 and "64-bit" in r.json()["error"]


# -- the tensor codec and the error shape, directly ------------------------------------------------
def test_binary_tensors_round_trip_every_datatype() -> None:
    arrays = [
        np.array([[True, False, True]]),
        np.arange(6, dtype=np.uint8).reshape(2, 3),
        np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        np.array([1.5, -2.25], dtype=np.float16),
        np.array([[0.1, 0.2]], dtype=np.float64),
    ]
    content, headers = encode_reply({"model_name": "m"}, [(f"t{i}", a, True) for i, a in enumerate(arrays)])
    reply = orjson.loads(content[: int(headers[HEADER_LENGTH])])
    # A reply's outputs, sent back as a request's inputs, decode to the same arrays.
    request = {"inputs": [{**o, "name": o["name"]} for o in reply["outputs"]]}
    head = orjson.dumps(request)
    parsed = parse_infer(head + content[int(headers[HEADER_LENGTH]) :], str(len(head)))
    for got, want in zip(parsed.inputs, arrays, strict=True):
        assert got.array.dtype == want.dtype and got.array.shape == want.shape
        np.testing.assert_array_equal(got.array, want)
    as_json, headers = encode_reply({}, [("b", arrays[0], False)])
    assert headers["Content-Type"] == "application/json"
    assert orjson.loads(as_json)["outputs"][0]["data"] == [True, False, True]


def test_json_data_must_fit_its_datatype() -> None:
    def one(data: Any, datatype: str, shape: list[int]) -> np.ndarray:
        body = orjson.dumps({"inputs": [{"name": "a", "shape": shape, "datatype": datatype, "data": data}]})
        return parse_infer(body, None).inputs[0].array

    assert one([[1, 2], [3, 4]], "INT32", [2, 2]).dtype == np.int32  # nested data is accepted too
    assert one([1, 2], "FP32", [2]).dtype == np.float32
    for data, datatype, shape in [
        ([1.5], "INT64", [1]),
        ([True], "FP32", [1]),
        ([1, 2], "FP32", [3]),
        ([300], "INT8", [1]),
        (["a"], "FP32", [1]),
        ([1], "BYTES", [1]),
    ]:
        with pytest.raises(InvalidInput):
            one(data, datatype, shape)


def test_sequence_ids_never_collide_with_client_ids() -> None:
    ids = {
        sequence_session_id(m, s) for m in ("gru", "my model/v1") for s in (5, "5", "x" * 200, "a b", "s5", 2**64 - 1)
    }
    assert len(ids) == 12
    for i in ids:
        assert i.startswith("~v2.") and not is_session_id(i) and is_derived_id(i) and len(i) <= 128


def test_v2_errors_say_when_to_retry() -> None:
    r = v2_response(503, "store down")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert v2_response(422, "bad").status_code == 400
    assert orjson.loads(bytes(r.body)) == {"error": "store down"}
