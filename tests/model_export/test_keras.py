"""Keras 3 models → carryover: one parity test per layer type against Keras itself (``predict`` on
padded, masked batches and a stateful twin in chunks), Keras's own masks, and what is refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from model_export.export import export_both
from model_export.keras import import_keras, to_step_net
from model_export.keras_layers import ACTIVATIONS
from model_export.verify import unpadded_run, verify_model
from service.engine.model import RecurrentModel
from service.errors import ModelContractError

keras = import_keras()  # sets KERAS_BACKEND=torch before Keras is first imported
layers = keras.layers
BIAS = "random_normal"  # Keras starts biases at zero: random ones make the gate mapping visible


def numpy(x: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def features(batch: int | None = None) -> Any:
    return keras.Input(batch_shape=(batch, None, 3), name="features")


def build_simple_rnn() -> Any:
    x = inp = features()
    x = layers.Masking(0.0)(x)
    x = layers.SimpleRNN(5, return_sequences=True, bias_initializer=BIAS, name="rnn")(x)
    return keras.Model(inp, layers.Dense(2, name="score")(x))


def build_gru() -> Any:  # reset_after=True (the default), stacked, TimeDistributed head
    x = inp = features()
    x = layers.Masking(0.0)(x)
    x = layers.GRU(4, return_sequences=True, bias_initializer=BIAS, name="gru_a")(x)
    x = layers.GRU(6, return_sequences=True, bias_initializer=BIAS, name="gru_b")(x)
    return keras.Model(inp, layers.TimeDistributed(layers.Dense(2), name="y")(x))


def build_gru_reset_before() -> Any:
    x = inp = features()
    x = layers.Masking(0.0)(x)
    x = layers.GRU(5, return_sequences=True, reset_after=False, bias_initializer=BIAS, name="gru")(x)
    return keras.Model(inp, layers.Dense(3, activation="tanh", name="y")(x))


def build_lstm() -> Any:  # tokens with Embedding(mask_zero), the last layer returns its last output
    model = keras.Sequential(
        [
            keras.Input((None,), dtype="int32", name="tokens"),
            layers.Embedding(9, 4, mask_zero=True, name="embed"),
            layers.LSTM(5, return_sequences=True, bias_initializer=BIAS, name="lstm_a"),
            layers.Dropout(0.5),
            layers.LSTM(3, bias_initializer=BIAS, name="lstm_b"),
            layers.Dense(4, activation="softmax", name="probs"),
        ],
        name="token_model",
    )
    return model


BUILDERS: dict[str, Callable[[], Any]] = {
    "simple_rnn": build_simple_rnn,
    "gru": build_gru,
    "gru_reset_before": build_gru_reset_before,
    "lstm": build_lstm,
}


def built(name: str) -> Any:
    keras.utils.set_random_seed(sum(map(ord, name)))
    return BUILDERS[name]()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, RecurrentModel, RecurrentModel]]:
    """Each Keras model with its served sequence- and step-form conversions (one trace each)."""
    root = tmp_path_factory.mktemp("keras")
    out = {}
    for name in BUILDERS:
        model = built(name)
        seq, step = export_both(to_step_net(model), root / f"{name}.onnx", root / f"{name}_step.onnx")
        out[name] = (model, RecurrentModel(seq, name=name), RecurrentModel(step, name=f"{name}_step"))
    return out


@pytest.mark.parametrize("name", list(BUILDERS))
def test_served_model_equals_keras(converted: dict[str, tuple[Any, RecurrentModel, RecurrentModel]], name: str) -> None:
    keras_model, sequence, step = converted[name]
    for served in (sequence, step):
        report = verify_model(served, sequences=5, max_len=20, rounds=2, keras_model=keras_model)
        assert report.ok, report.render()
        assert report.worst_keras_error is not None and report.worst_keras_error <= 1e-5


def test_names_follow_the_keras_model(converted: dict[str, tuple[Any, RecurrentModel, RecurrentModel]]) -> None:
    gru, tokens = converted["gru"][1].contract, converted["lstm"][1].contract
    assert [t.name for t in gru.inputs] == ["features"] and [t.name for t in gru.outputs] == ["y"]
    assert [(s.input, s.output, s.shape, s.batch_axis) for s in gru.states] == [
        ("gru_a_h0", "gru_a_hn", (4,), 0),
        ("gru_b_h0", "gru_b_hn", (6,), 0),
    ]
    assert tokens.inputs[0].name == "tokens" and tokens.inputs[0].dtype == np.int64 and tokens.inputs[0].shape == ()
    assert [t.name for t in tokens.outputs] == ["probs"]
    assert [s.input for s in tokens.states] == ["lstm_a_h0", "lstm_a_c0", "lstm_b_h0", "lstm_b_c0"]


def _predict(model: Any, x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.asarray(model.predict(x[None], verbose=0))[0]
    return out


@pytest.mark.parametrize(("name", "masked"), [("gru", 0.0), ("lstm", 0)])
def test_a_real_step_equal_to_the_mask_value_is_carried_like_keras(
    converted: dict[str, tuple[Any, RecurrentModel, RecurrentModel]], name: str, masked: float
) -> None:
    """Keras carries the state over ANY step that its mask marks, padding or not; the served model
    does too (the mask is recomputed from the data inside each step), so such a step leaves the
    state as it was and repeats the last output, exactly as ``predict`` does."""
    keras_model, served, _ = converted[name]
    rng = np.random.default_rng(5)
    t = served.contract.inputs[0]
    x = rng.integers(1, 9, size=6) if t.dtype.kind in "iu" else rng.standard_normal((6, 3))
    x = x.astype(t.dtype)
    x[2] = x[4] = masked
    outputs, state = unpadded_run(served, {t.name: x})
    out = outputs[served.contract.outputs[0].name]
    expected = _predict(keras_model, x)
    np.testing.assert_allclose(out if expected.ndim == out.ndim else out[-1], expected, atol=1e-5, rtol=0)
    _, state_without = unpadded_run(served, {t.name: np.delete(x, [2, 4], axis=0)})
    for k, v in state_without.items():
        np.testing.assert_allclose(state[k], v, atol=1e-6, rtol=0)
    if name == "gru":  # return_sequences: a carried step repeats the previous output
        np.testing.assert_array_equal(out[2], out[1])


def test_stateful_keras_in_chunks_equals_one_served_call(
    converted: dict[str, tuple[Any, RecurrentModel, RecurrentModel]],
) -> None:
    from model_export.keras_verify import stateful_twin

    keras_model, served, _ = converted["gru_reset_before"]
    twin = stateful_twin(keras_model)
    x = np.random.default_rng(3).standard_normal((11, 3)).astype(np.float32)
    chunks = [numpy(twin(x[None, a:b], training=False))[0] for a, b in [(0, 4), (4, 5), (5, 11)]]
    outputs, state = unpadded_run(served, {"features": x})
    np.testing.assert_allclose(np.concatenate(chunks), outputs["y"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(numpy(twin.layers[-2].states[0])[0], state["gru_h0"], atol=1e-5, rtol=0)


def test_verify_fails_against_another_keras_model(
    converted: dict[str, tuple[Any, RecurrentModel, RecurrentModel]],
) -> None:
    keras.utils.set_random_seed(99)
    other = build_gru()  # same architecture, other weights
    report = verify_model(converted["gru"][1], sequences=3, max_len=10, rounds=1, keras_model=other)
    assert not report.ok and "differs from Keras" in report.render()


def test_gate_orders_by_weights() -> None:
    """Keras orders GRU gates (z, r, h) and PyTorch (r, z, n); LSTM i, f, c, o is i, f, g, o."""
    keras.utils.set_random_seed(4)
    for layer in (layers.GRU(2, bias_initializer=BIAS), layers.LSTM(2, bias_initializer=BIAS)):
        model = keras.Sequential([keras.Input((None, 3)), layer])
        net = to_step_net(model)
        step = net._steps[0]
        kernel = numpy(layer.cell.kernel)
        if isinstance(layer, layers.GRU):
            np.testing.assert_array_equal(cast(torch.Tensor, step.w_ih).detach().numpy()[:2], kernel[:, 2:4].T)  # r
            np.testing.assert_array_equal(cast(torch.Tensor, step.w_ih).detach().numpy()[2:4], kernel[:, :2].T)  # z
        else:
            np.testing.assert_array_equal(cast(torch.Tensor, step.w_ih).detach().numpy(), kernel.T)


def test_dense_activations_match_keras() -> None:
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32) * 3
    for name, fn in ACTIVATIONS.items():
        expected = numpy(keras.activations.get(name)(x))
        np.testing.assert_allclose(fn(torch.from_numpy(x)).numpy(), expected, atol=1e-6, rtol=1e-6, err_msg=name)


def chain(*body: Any, inp: Any = None) -> Any:
    inp = inp if inp is not None else features()
    x = inp
    for layer in body:
        x = layer(x)
    return keras.Model(inp, x)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (lambda: chain(layers.GRU(3, activation="relu", name="fast")), ["'fast'", "'relu'"]),
        (lambda: chain(layers.LSTM(3, recurrent_activation="hard_sigmoid", name="l")), ["'l'", "hard_sigmoid"]),
        (lambda: chain(layers.SimpleRNN(3, activation="relu", name="s")), ["'s'", "relu"]),
        (lambda: chain(layers.Bidirectional(layers.GRU(3), name="both")), ["'both'", "Bidirectional"]),
        (lambda: chain(layers.Conv1D(3, 2, name="conv"), layers.GRU(3)), ["'conv'", "Conv1D"]),
        (lambda: chain(layers.GRU(3, go_backwards=True, name="back")), ["'back'", "go_backwards"]),
        (lambda: chain(layers.GRU(3, name="a"), layers.Dense(2, activation="mish", name="d")), ["'d'", "mish"]),
        (lambda: chain(layers.Dense(3, name="only")), ["no SimpleRNN, GRU or LSTM"]),
        (
            lambda: chain(layers.GRU(3, name="last_only"), layers.RepeatVector(2), layers.GRU(3)),
            ["RepeatVector"],
        ),
    ],
)
def test_unsupported_models_are_refused_naming_the_layer(model: Callable[[], Any], words: list[str]) -> None:
    with pytest.raises(ModelContractError) as info:
        to_step_net(model())
    for word in words:
        assert word in str(info.value)


def test_branches_are_refused() -> None:
    inp = features()
    a, b = layers.GRU(3, return_sequences=True)(inp), layers.GRU(3, return_sequences=True)(inp)
    with pytest.raises(ModelContractError, match="only chains convert"):
        to_step_net(keras.Model(inp, layers.Add(name="sum")([a, b])))


def test_cli_converts_a_keras_file_and_verify_checks_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from model_export.keras import main as convert_main
    from service.cli import main

    model = built("lstm")
    model.save(tmp_path / "m.keras")
    assert convert_main([str(tmp_path / "m.keras"), str(tmp_path / "m.onnx"), "--form", "step"]) == 0
    assert RecurrentModel(tmp_path / "m.onnx").contract.form == "step"
    code = main(["verify", str(tmp_path / "m.onnx"), "--keras", str(tmp_path / "m.keras"), "--sequences", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "vs Keras" in out
    bad = chain(layers.GRU(3, activation="relu", name="fast"))
    bad.save(tmp_path / "bad.keras")
    assert convert_main([str(tmp_path / "bad.keras"), str(tmp_path / "bad.onnx")]) == 1
    assert "'fast'" in capsys.readouterr().err
