"""Keras 3 models → carryover models: ``python -m model_export.keras IN.keras OUT.onnx [--form step]``.

Keras runs with the torch backend (``KERAS_BACKEND=torch``; no TensorFlow). The model must be a
chain (``Sequential`` or a single-path functional model) of ``Embedding``, ``Masking``,
``SimpleRNN`` / ``GRU`` (either ``reset_after``) / ``LSTM`` (stacked, ``return_sequences``,
``stateful``), ``Dense`` / ``TimeDistributed(Dense)``, ``Dropout`` and ``Activation`` layers.
Their weights are read and mapped onto the export cells of ``model_export.cells`` (Keras orders
the GRU gates z, r, h; PyTorch r, z, n; the LSTM order i, f, c/g, o is the same), and the
result is exported like any other cell (``model_export.export``).

Names: the data input keeps the Keras ``Input``'s name, the output is the last layer's name,
and each recurrent layer ``L`` has the states ``L_h0 -> L_hn`` (and ``L_c0 -> L_cn``), ``[B,
units]``. Anything else is refused with a ``ModelContractError`` that names the layer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from model_export.cells import DataSpec
from model_export.export import export_cell
from model_export.keras_layers import (
    ACTIVATIONS,
    ActivationStep,
    DenseStep,
    EmbeddingStep,
    KerasStep,
    KerasStepNet,
    MaskingStep,
    RecurrentKind,
    RecurrentStep,
)
from service.engine.metadata import Form
from service.errors import ModelContractError

RECURRENT = ("SimpleRNN", "GRU", "LSTM")


def import_keras() -> ModuleType:
    """Keras with the torch backend (set before the first import; refused if another is active)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    module: ModuleType = keras
    if keras.backend.backend() != "torch":
        raise ModelContractError(
            f"Keras runs with the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch before importing keras"
        )
    return module


def load_keras_model(path: str | Path) -> Any:
    """A ``.keras`` file, loaded for inference (no optimizer state)."""
    return import_keras().saving.load_model(str(path), compile=False)


def layer_chain(model: Any) -> list[Any]:
    """The model's layers from input to output; refuses branches, merges and several inputs."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelContractError(
            f"Keras model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "only single-input, single-output chains convert"
        )
    chain: list[Any] = []
    tensor = model.outputs[0]
    while True:
        history = tensor._keras_history
        layer = history.operation
        if type(layer).__name__ == "InputLayer":
            break
        # Keras passes the propagated mask as a ``mask=`` keyword tensor: the chain is the positional one.
        arguments = layer._inbound_nodes[history.node_index].arguments
        keras_tensor = type(tensor)
        extra = [k for k, v in arguments.kwargs.items() if k != "mask" and isinstance(v, keras_tensor)]
        if len(arguments.args) != 1 or extra or not isinstance(arguments.args[0], keras_tensor):
            raise ModelContractError(f"layer {layer.name!r} takes more than one input; only chains convert")
        chain.append(layer)
        tensor = arguments.args[0]
    return chain[::-1]


def _activation(layer: Any, fn: Any, *, allowed: tuple[str, ...] | None = None) -> str:
    keras = import_keras()
    name = keras.activations.serialize(fn) if fn is not None else "linear"
    if not isinstance(name, str) or name not in (allowed or tuple(ACTIVATIONS)):
        supported = ", ".join(allowed or sorted(ACTIVATIONS))
        raise ModelContractError(f"layer {layer.name!r}: activation {name!r} is not supported (supported: {supported})")
    return name


def _numpy(variable: Any) -> np.ndarray:
    return np.asarray(import_keras().ops.convert_to_numpy(variable), dtype=np.float32)


def _gru_order(a: np.ndarray, units: int) -> np.ndarray:
    """Keras's GRU blocks (z, r, h) along the last axis → PyTorch's (r, z, n)."""
    z, r, h = (a[..., i * units : (i + 1) * units] for i in range(3))
    return np.concatenate([r, z, h], axis=-1)


def _recurrent(layer: Any) -> RecurrentStep:
    kind_name = type(layer).__name__
    cell = layer.cell
    if getattr(layer, "go_backwards", False):
        raise ModelContractError(f"layer {layer.name!r}: go_backwards=True cannot be streamed step by step")
    if getattr(layer, "return_state", False):
        raise ModelContractError(f"layer {layer.name!r}: return_state=True is not supported (states are served)")
    _activation(layer, cell.activation, allowed=("tanh",))
    if kind_name != "SimpleRNN":
        _activation(layer, cell.recurrent_activation, allowed=("sigmoid",))
    units = int(cell.units)
    kernel, recurrent = _numpy(cell.kernel), _numpy(cell.recurrent_kernel)
    bias = _numpy(cell.bias) if cell.use_bias else None
    b_hh: np.ndarray | None = None
    kind: RecurrentKind
    if kind_name == "SimpleRNN":
        kind, b_ih = "simple", bias if bias is not None else np.zeros(units, np.float32)
    elif kind_name == "LSTM":
        kind, b_ih = "lstm", bias if bias is not None else np.zeros(4 * units, np.float32)
    else:
        kernel, recurrent = _gru_order(kernel, units), _gru_order(recurrent, units)
        if bias is None:
            bias = np.zeros((2, 3 * units) if cell.reset_after else 3 * units, np.float32)
        bias = _gru_order(bias, units)
        if cell.reset_after:
            kind, b_ih, b_hh = "gru", bias[0], bias[1]
        else:
            kind, b_ih = "gru_reset_before", bias
    return RecurrentStep(
        layer.name, kind, kernel.T, recurrent.T, b_ih, b_hh, return_sequences=bool(layer.return_sequences)
    )


def _dense(layer: Any, owner: Any) -> DenseStep:
    bias = _numpy(layer.bias) if layer.use_bias else None
    return DenseStep(_numpy(layer.kernel), bias, _activation(owner, layer.activation))


def _step(layer: Any) -> tuple[KerasStep, int | None]:
    """The converted layer and its output width (None: unchanged)."""
    kind = type(layer).__name__
    if kind in RECURRENT:
        return _recurrent(layer), int(layer.cell.units)
    if kind == "Dense":
        return _dense(layer, layer), int(layer.units)
    if kind == "TimeDistributed" and type(layer.layer).__name__ == "Dense":
        return _dense(layer.layer, layer), int(layer.layer.units)
    if kind == "Embedding":
        return EmbeddingStep(_numpy(layer.embeddings), bool(layer.mask_zero)), int(layer.output_dim)
    if kind == "Masking":
        return MaskingStep(float(layer.mask_value)), None
    if kind == "Dropout":
        return ActivationStep("linear"), None
    if kind == "Activation":
        return ActivationStep(_activation(layer, layer.activation)), None
    raise ModelContractError(
        f"layer {layer.name!r} ({kind}) is not supported; supported: Embedding, Masking, SimpleRNN, GRU, LSTM, "
        "Dense, TimeDistributed(Dense), Dropout, Activation"
    )


def to_step_net(model: Any) -> KerasStepNet:
    """The Keras model as a ``StepCell`` with the same weights (see the module doc)."""
    chain = layer_chain(model)
    source = model.inputs[0]
    tokens = type(chain[0]).__name__ == "Embedding"
    if len(source.shape) != (2 if tokens else 3):
        raise ModelContractError(
            f"input {source.name!r} has shape {tuple(source.shape)}; expected (batch, time"
            f"{')' if tokens else ', features)'}"
        )
    data = DataSpec(source.name, () if tokens else (int(source.shape[-1]),), torch.int64 if tokens else torch.float32)
    width = 0 if tokens else int(source.shape[-1])
    steps: list[KerasStep] = []
    last_sequence_end = False
    for layer in chain:
        if last_sequence_end and type(layer).__name__ in RECURRENT:
            raise ModelContractError(
                f"layer {layer.name!r} follows a recurrent layer with return_sequences=False; "
                "only the last recurrent layer may return its last output alone"
            )
        step, out = _step(layer)
        if isinstance(step, RecurrentStep) and not step.return_sequences:
            last_sequence_end = True
        steps.append(step)
        width = out if out is not None else width
    if not any(isinstance(step, RecurrentStep) for step in steps):
        raise ModelContractError(f"Keras model {model.name!r} has no SimpleRNN, GRU or LSTM layer: nothing to carry")
    return KerasStepNet(data, chain[-1].name, steps, width)


def convert(model: Any, out: str | Path, form: Form = "sequence") -> Path:
    """Convert a Keras model (in memory, or the path of a ``.keras`` file) to ``out``."""
    if isinstance(model, str | Path):
        model = load_keras_model(model)
    return export_cell(to_step_net(model), out, form)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_export.keras", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="the .keras file")
    parser.add_argument("out", type=Path, help="the ONNX file to write")
    parser.add_argument("--form", choices=["sequence", "step"], default="sequence")
    args = parser.parse_args(argv)
    try:
        path = convert(args.model, args.out, args.form)
    except ModelContractError as e:
        print(f"cannot convert {args.model}: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
