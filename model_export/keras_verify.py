"""``carryover verify --keras MODEL.keras``: the served model against Keras itself.

Two comparisons, both against the unpadded B = 1 runs that ``model_export.verify`` already
checked the padded, chunked batches against:

- Keras's own ``predict`` on ONE padded batch of all sequences, the padding scattered (right,
  left, holes) and written as Keras's mask value, so that Keras's masking carries the states
  through it (when the first layer makes the mask: ``Masking`` or ``Embedding(mask_zero=True)``;
  otherwise each sequence is predicted unpadded);
- a ``stateful=True`` twin of the model (same weights, batch 1) called chunk by chunk, random
  chunk sizes, comparing each chunk's outputs and, after the last chunk, every layer's states.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from model_export.keras import RECURRENT, import_keras, layer_chain
from service.engine.contract import ModelContract

Arrays = dict[str, np.ndarray]
InputsFn = Callable[[ModelContract, int, np.random.Generator], Arrays]


def keras_inputs(model: Any) -> InputsFn:
    """Random inputs the Keras model accepts: ids within its ``Embedding`` (never the masked id 0,
    which Keras carries over), or standard normals (never exactly a ``Masking`` value)."""
    first = layer_chain(model)[0]

    def make(contract: ModelContract, steps: int, rng: np.random.Generator) -> Arrays:
        out = {}
        for t in contract.inputs:
            if t.dtype.kind in "iu":
                low = 1 if getattr(first, "mask_zero", False) else 0
                out[t.name] = rng.integers(low, int(first.input_dim), size=(steps, *t.shape)).astype(t.dtype)
            else:
                out[t.name] = rng.standard_normal((steps, *t.shape)).astype(t.dtype)
        return out

    return make


def padding_value(model: Any) -> float | None:
    """What a padded step holds for Keras to mask it, or None if the first layer makes no mask."""
    first = layer_chain(model)[0]
    kind = type(first).__name__
    if kind == "Masking":
        return float(first.mask_value)
    if kind == "Embedding" and first.mask_zero:
        return 0.0
    return None


def stateful_twin(model: Any) -> Any:
    """The same model with ``stateful=True`` on every recurrent layer, batch 1, same weights."""
    keras = import_keras()
    source = model.inputs[0]

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if type(layer).__name__ in RECURRENT:
            config["stateful"] = True
        return layer.__class__.from_config(config)

    inp = keras.Input(batch_shape=(1, *source.shape[1:]), dtype=source.dtype, name=source.name)
    twin = keras.models.clone_model(model, input_tensors=inp, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def _returns_sequences(model: Any) -> bool:
    last = [layer for layer in layer_chain(model) if type(layer).__name__ in RECURRENT][-1]
    return bool(last.return_sequences)


def _err(a: Any, b: np.ndarray) -> float:
    a = np.asarray(import_keras().ops.convert_to_numpy(a), dtype=np.float64)
    return float(np.max(np.abs(a - b.astype(np.float64)), initial=0.0))


def compare_predict(model: Any, output: str, data: list[Arrays], refs: list[Arrays], rng: np.random.Generator) -> float:
    """Keras ``predict`` on one padded batch (see the module doc) against the reference outputs."""
    name = model.inputs[0].name
    pad = padding_value(model)
    sequences = _returns_sequences(model)
    if pad is None:  # no Keras mask: padding would be computed as data, so predict one by one
        return max(
            _err(_predict(model, d[name][None]), _keras_view(r[output], sequences))
            for d, r in zip(data, refs, strict=True)
        )
    width = max(d[name].shape[0] for d in data) + 3
    sample = data[0][name]
    batch = np.full((len(data), width, *sample.shape[1:]), pad, dtype=sample.dtype)
    positions = []
    for row, d in enumerate(data):
        positions.append(np.sort(rng.choice(width, size=d[name].shape[0], replace=False)))
        batch[row, positions[-1]] = d[name]
    got = np.asarray(import_keras().ops.convert_to_numpy(_predict(model, batch)))
    worst = 0.0
    for row, r in enumerate(refs):
        mine = got[row][positions[row]] if sequences else got[row][None]
        worst = max(worst, _err(mine, r[output] if sequences else r[output][-1:]))
    return worst


def _keras_view(ref: np.ndarray, sequences: bool) -> np.ndarray:
    """A reference ``[T, ...]`` as Keras returns it for one sequence: ``[1, T, ...]`` or the last step."""
    return ref[None] if sequences else ref[-1:]


def _predict(model: Any, batch: np.ndarray) -> Any:
    return model.predict(batch, batch_size=len(batch), verbose=0)


def compare_stateful(
    model: Any, output: str, data: list[Arrays], refs: list[tuple[Arrays, Arrays]], rng: np.random.Generator
) -> float:
    """The stateful twin, chunk by chunk, against the reference outputs and final states."""
    twin = stateful_twin(model)
    name = twin.inputs[0].name
    recurrent = [layer for layer in twin.layers if type(layer).__name__ in RECURRENT]
    sequences = _returns_sequences(model)
    worst = 0.0
    for d, (ref_out, ref_state) in zip(data, refs, strict=True):
        for layer in recurrent:
            layer.reset_state()
        offset, steps = 0, d[name].shape[0]
        while offset < steps:
            n = min(steps - offset, int(rng.integers(1, 10)))
            y = twin(d[name][None, offset : offset + n], training=False)
            worst = max(worst, _err(y, _keras_view(ref_out[output][offset : offset + n], sequences)))
            offset += n
        for layer in recurrent:
            names = ("h", "c") if type(layer).__name__ == "LSTM" else ("h",)
            for state, key in zip(layer.states, names, strict=True):
                worst = max(worst, _err(state, ref_state[f"{layer.name}_{key}0"][None]))
    return worst


def compare_with_keras(
    model: Any, contract: ModelContract, data: list[Arrays], refs: list[tuple[Arrays, Arrays]], seed: int = 0
) -> float:
    """Worst difference between the served reference runs and Keras (both comparisons)."""
    rng = np.random.default_rng(seed)
    output = contract.outputs[0].name
    predicted = compare_predict(model, output, data, [r[0] for r in refs], rng)
    return max(predicted, compare_stateful(model, output, data, refs, rng))
