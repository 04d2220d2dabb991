"""The ``carryover`` command: ``serve`` (its flags derived from ``Settings``, see ``serve.py``),
``verify``, ``inspect``, ``bench``, ``client`` and ``keys``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.config import BUNDLED_MODEL, model_flags
from service.engine.metadata import FlagDeclaration
from service.errors import EmbeddedRedisError, ModelContractError, StartupError, UnknownSetting


def _flags(args: argparse.Namespace) -> FlagDeclaration:
    """``--state``/``--mask``/``--form``/``--constant`` of a one-model command (a ``MODEL=`` prefix
    must name it)."""
    name = args.model.stem
    return model_flags(name, [name], args.state or [], args.mask or [], args.form or [], args.constant or [])


def _verify(args: argparse.Namespace) -> int:
    from model_export.verify import load_torch_module, verify_model
    from service.engine.model import RecurrentModel

    try:
        model = RecurrentModel(args.model, flags=_flags(args), providers=args.providers)
    except ModelContractError as e:
        print(f"verify {args.model}: FAILED\n  the model breaks the contract: {e}")
        return 1
    module = load_torch_module(args.torch_module) if args.torch_module else None
    keras_model = None
    if args.keras:
        from model_export.keras import load_keras_model

        keras_model = load_keras_model(args.keras)
    report = verify_model(
        model,
        sequences=args.sequences,
        max_len=args.max_len,
        seed=args.seed,
        tolerance=args.tolerance,
        torch_module=module,
        keras_model=keras_model,
    )
    print(report.render())
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from service.engine.inspect import inspect_signature, render
    from service.engine.metadata import METADATA_KEY
    from service.engine.model import RecurrentModel

    try:
        graph = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own Fail/InvalidGraph/NoSuchFile types
        print(f"inspect {args.model}: cannot be loaded by ONNX Runtime: {e}")
        return 1
    metadata = graph.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    found = inspect_signature(graph)
    print(render(found, args.model, args.model.stem, metadata))
    if metadata is None and not found.pairs:
        return 1
    flags = found.declaration()
    try:
        model = RecurrentModel(args.model, flags=flags)
    except ModelContractError as e:
        print(f"  check: the loader refuses it: {e}")
        return 1
    shapes = ", ".join(f"{t.name} [B, T, {', '.join(map(str, t.shape))}]" for t in model.contract.outputs)
    print(f"  check: loads and runs at B=1, 2 and T=1, 3 ({model.contract.form} form; outputs {shapes})")
    for c in model.contract.constants:
        print(f"  constant {c.name} {c.describe()['shape']} per session (mask {c.mask}): given at session creation")
    return 0


# bench/ modules with a main(argv): runnable from a source checkout as `carryover bench NAME`
BENCHMARKS = (
    "engine",
    "api",
    "generate",
    "constants",
    "loadgen",
    "run_all",
    "scale",
    "ab",
    "memory",
    "gpu",
    "soak",
    "chaos",
)


def _bench(args: argparse.Namespace) -> int:
    checkout = Path(__file__).resolve().parents[1]  # the repository root of an editable install
    if (checkout / "bench" / f"{args.which}.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        module = importlib.import_module(f"bench.{args.which}")
    except ModuleNotFoundError:
        print("carryover bench runs from a source checkout (the bench/ folder is not installed)", file=sys.stderr)
        return 2
    module.main(args.rest)
    return 0


def _keys_add(args: argparse.Namespace) -> int:
    from service.keys import KeyFileError, key_line, new_key

    key = new_key()
    try:
        line = key_line(args.name, key)
    except KeyFileError as e:
        print(f"carryover keys add: {e}", file=sys.stderr)
        return 2
    if args.file is not None:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        with args.file.open("a") as f:
            if f.tell() and not args.file.read_text().endswith("\n"):
                f.write("\n")
            f.write(line + "\n")
    print(f"API key for {args.name} (shown once; the server stores only its hash):\n  {key}")
    if args.file is not None:
        print(f"added to {args.file} (a running server picks it up within a second, or on SIGHUP):\n  {line}")
    else:
        print(f"add this line to the server's --api-keys-file:\n  {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carryover", description="Streaming inference for recurrent models.")
    sub = parser.add_subparsers(dest="command", required=True)

    verify = sub.add_parser(
        "verify",
        help="check the carry invariant of an exported model",
        description="Run random chunkings and paddings of random sequences and compare "
        "with the unpadded B=1 run (and PyTorch with --torch-module, Keras with --keras).",
    )
    verify.add_argument(
        "model", type=Path, nargs="?", default=BUNDLED_MODEL, help="ONNX file (default: bundled char LM)"
    )
    verify.add_argument("--torch-module", help="package.module:factory returning the exported nn.Module")
    verify.add_argument("--keras", type=Path, metavar="MODEL.keras", help="the Keras model the ONNX was converted from")
    verify.add_argument(
        "--state", action="append", metavar="IN:OUT[:AXIS]", help="state pair for models without metadata"
    )
    verify.add_argument("--mask", action="append", metavar="NAME", help="mask input of a model without metadata")
    verify.add_argument(
        "--constant",
        action="append",
        metavar="INPUT:BATCH_AXIS:LENGTH_AXIS:MASK",
        help="per-session constant input of a model without metadata",
    )
    verify.add_argument(
        "--form", action="append", choices=["sequence", "step"], help="form of a model without metadata"
    )
    verify.add_argument("--providers", nargs="+", help="execution providers, e.g. cuda cpu")
    verify.add_argument("--sequences", type=int, default=8)
    verify.add_argument("--max-len", type=int, default=40)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--tolerance", type=float, default=1e-5)
    verify.set_defaults(func=_verify)

    inspect = sub.add_parser(
        "inspect",
        help="show a model's inputs, outputs and guessed contract, with the serve flags it needs",
        description="Lists the graph's inputs and outputs; for a model without carryover metadata, "
        "the state pairs, mask and form found, the exact serve command and the metadata to annotate.",
    )
    inspect.add_argument("model", type=Path, help="ONNX file")
    inspect.set_defaults(func=_inspect)

    bench = sub.add_parser(
        "bench",
        help=f"run a benchmark ({' | '.join(BENCHMARKS)}), from a source checkout",
        description="Runs bench/NAME.py; arguments after the name go to it (e.g. carryover bench engine --steps 8 32).",
    )
    bench.add_argument("which", choices=BENCHMARKS)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    bench.set_defaults(func=_bench)

    keys = sub.add_parser("keys", help="manage API keys", description="Create API keys for --api-keys-file.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser(
        "add",
        help="print a new key and its key-file line",
        description="Print a new random key and its NAME:SHA256HEX line for the key file.",
    )
    add.add_argument("name", help="a name for the key (1-64 of A-Z a-z 0-9 . _ -)")
    add.add_argument("--file", type=Path, metavar="PATH", help="append the line to this key file")
    add.set_defaults(func=_keys_add)

    from service.client.terminal import add_client_parser
    from service.serve import add_serve_parser

    add_serve_parser(sub)
    add_client_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (UnknownSetting, ValidationError, SettingsError) as e:
        # bad configuration: say what is wrong, as argparse does for a bad flag
        print(f"carryover {args.command}: {e}", file=sys.stderr)
        return 2
    except (StartupError, EmbeddedRedisError, ModelContractError) as e:
        # cannot start: one line, no traceback (the cause is the user's to fix, not a bug)
        print(f"carryover {args.command}: {e}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
