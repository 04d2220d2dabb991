"""Write the ``carryover`` metadata into an ONNX file, so it serves with no flags.

    python -m model_export.annotate MODEL.onnx [-o OUT.onnx] [--state IN:OUT[:AXIS] ...]
        [--mask NAME] [--form sequence|step]

Without ``--state`` the pairs, mask and form that ``carryover inspect`` finds are used. The
declaration is checked first exactly as ``carryover serve`` would load it (contract and warm-up
runs), and the metadata written is the contract the loader built, so the annotated file loads to
the same contract without flags. The graph itself is left untouched (annotating changes the
file's bytes, hence its fingerprint: sessions made with the unannotated file do not carry over).
External weights are written to ``OUT.onnx.data`` beside the annotated file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

from service.engine.contract import ModelContract
from service.engine.inspect import inspect_signature
from service.engine.metadata import METADATA_KEY, FlagDeclaration, Form
from service.engine.model import RecurrentModel
from service.errors import ModelContractError


def contract_metadata(contract: ModelContract) -> dict[str, object]:
    """The metadata JSON that declares ``contract``."""
    meta: dict[str, object] = {
        "version": 1,
        "form": contract.form,
        "kind": contract.kind,
        "inputs": [t.name for t in contract.inputs],
        "outputs": [t.name for t in contract.outputs],
        "state": [
            {
                "input": s.input,
                "output": s.output,
                "batch_axis": s.batch_axis,
                **({"initial": s.initial} if s.initial else {}),
            }
            for s in contract.states
        ],
    }
    if contract.mask:
        meta["mask"] = contract.mask
    if contract.constants:
        meta["constants"] = [
            {"input": c.name, "batch_axis": c.batch_axis}
            | ({"length_axis": c.length_axis, "mask": c.mask} if c.mask else {})
            for c in contract.constants
        ]
    if contract.vocab is not None:
        meta["vocab"], meta["unk_id"] = "".join(contract.vocab), contract.unk_id
    return meta


def guessed_flags(path: Path) -> FlagDeclaration:
    """What ``carryover inspect`` finds in the file, as flags."""
    return inspect_signature(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])).declaration()


def annotate(path: str | Path, out: str | Path | None = None, flags: FlagDeclaration | None = None) -> Path:
    """Check ``flags`` (default: the inspected guess) against the model and write the metadata
    into ``out`` (default: in place). Raises :class:`ModelContractError` naming what is wrong."""
    path = Path(path)
    target = Path(out) if out is not None else path
    proto = onnx.load_model(str(path))
    if any(p.key == METADATA_KEY for p in proto.metadata_props):
        raise ModelContractError(f"{path} already has {METADATA_KEY!r} metadata; it needs no flags")
    external = _has_external_data(onnx.load_model(str(path), load_external_data=False))
    flags = flags if flags is not None and flags.state else _merge(guessed_flags(path), flags)
    model = RecurrentModel(path, flags=flags)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(contract_metadata(model.contract))
    # A model with external data (the dynamo exporter's default) keeps it beside the new file.
    onnx.save_model(proto, str(target), save_as_external_data=external, location=f"{target.name}.data")
    return target


def _merge(guess: FlagDeclaration, given: FlagDeclaration | None) -> FlagDeclaration:
    if given is None:
        return guess
    return FlagDeclaration(
        guess.state, given.mask or guess.mask, given.form or guess.form, given.constants or guess.constants
    )


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_export.annotate", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("-o", "--output", type=Path, help="write here instead of in place")
    parser.add_argument("--state", action="append", default=[], metavar="IN:OUT[:AXIS]")
    parser.add_argument("--mask", metavar="NAME")
    parser.add_argument("--form", choices=["sequence", "step"])
    parser.add_argument("--constant", action="append", default=[], metavar="INPUT:BATCH_AXIS:LENGTH_AXIS:MASK")
    args = parser.parse_args(argv)
    form: Form | None = args.form
    try:
        target = annotate(
            args.model, args.output, FlagDeclaration(tuple(args.state), args.mask, form, tuple(args.constant))
        )
    except ModelContractError as e:
        print(f"annotate {args.model}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {METADATA_KEY!r} metadata into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
