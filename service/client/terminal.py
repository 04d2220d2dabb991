"""``carryover client``: a terminal client for token LMs, and a file mode for feature models.

Interactive (token LMs): type text, Enter sends it (with the newline) through the session and
shows the model's top next-character predictions; ``:gen N`` appends N greedy characters
(advancing the session), ``:reset`` clears it, ``:quit`` leaves. The session persists on the
server: ``--session ID`` resumes it later.

File mode: ``--input x.npy`` (``[T, F]`` float32) is stepped through a session in chunks of
``--chunk`` steps; the outputs are written to ``--output`` (``.npz``, one array per output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.client import Client, Session


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    out: np.ndarray = z / z.sum()
    return out


def show(ch: str) -> str:
    return {"\n": "\\n", "\t": "\\t", " ": "␠"}.get(ch, ch)


def top_predictions(logits: np.ndarray, vocab: str, k: int = 5) -> str:
    probs = softmax(logits)
    best = np.argsort(probs)[::-1][:k]
    return "  ".join(f"{show(vocab[i])!s:>2} {probs[i] * 100:4.1f}%" for i in best)


def interactive(session: Session, model: dict[str, Any], stdin: Any = sys.stdin, out: Any = sys.stdout) -> None:
    vocab: str = model["vocab"]
    unk: int = model["unk_id"]
    index = {c: i for i, c in enumerate(vocab)}
    name = model["inputs"][0]["name"]
    print(
        f"session {session.id} (model {session.model}, step {session.step_count}). "
        "Type text; Enter sends it. :gen N, :reset, :quit",
        file=out,
    )
    last: np.ndarray | None = None
    for raw in stdin:
        line = raw.rstrip("\n")
        if line == ":quit":
            break
        if line == ":reset":
            session.reset()
            print("reset: step 0", file=out)
            continue
        if line.startswith(":gen"):
            count = int(line.split()[1]) if len(line.split()) > 1 else 40
            if last is None:
                print("type some text first", file=out)
                continue
            text = []
            for _ in range(count):
                token = int(np.argmax(last))
                text.append(vocab[token])
                last = session.step({name: [token]})[model["outputs"][0]["name"]][-1]
            print("".join(text), file=out)
            continue
        ids = [index.get(c, unk) for c in line + "\n"]
        outputs = session.step({name: ids})
        last = outputs[model["outputs"][0]["name"]][-1]
        print(f"[step {session.step_count}] next: {top_predictions(last, vocab)}", file=out)


def file_mode(session: Session, model: dict[str, Any], source: Path, target: Path, chunk: int) -> int:
    if len(model["inputs"]) != 1:
        print("file mode needs a model with one input", file=sys.stderr)
        return 2
    data = np.load(source, allow_pickle=False)
    name = model["inputs"][0]["name"]
    results: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(data), chunk):
        for key, value in session.step({name: data[start : start + chunk]}).items():
            results.setdefault(key, []).append(value)
    arrays: dict[str, Any] = {k: np.concatenate(v) for k, v in results.items()}
    np.savez(target, **arrays)
    print(f"session {session.id}: {len(data)} steps (now at step {session.step_count}); outputs -> {target}")
    return 0


def run_client(args: argparse.Namespace) -> int:
    with Client(args.url) as client:
        models = {m["name"]: m for m in client.models()}
        session = client.session(args.session) if args.session else client.create(args.model)
        model = models[session.model]
        if args.input:
            return file_mode(session, model, args.input, args.output, args.chunk)
        if model["kind"] != "token_lm":
            print(f"model {session.model!r} is not a token LM: use --input/--output", file=sys.stderr)
            return 2
        interactive(session, model)
        return 0


def add_client_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "client",
        help="talk to a running server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model of a new session (default: the server's default)")
    parser.add_argument("--session", help="resume this session instead of creating one")
    parser.add_argument("--input", type=Path, help=".npy [T, F] to send through the session (file mode)")
    parser.add_argument("--output", type=Path, default=Path("outputs.npz"), help="where file mode writes outputs")
    parser.add_argument("--chunk", type=int, default=256, help="steps per request in file mode")
    parser.set_defaults(func=run_client)
