"""``carryover client``: a terminal client for token LMs, and a file mode for feature models.

Interactive (token LMs): type text, Enter sends it (with the newline) through the session and
shows the model's top next-character predictions; ``:gen N`` continues what the session has read
by N characters, generated on the server (greedy, streamed; the session keeps them), ``:reset``
brings the session back to step 0, ``:quit`` (or end of input) leaves. The session persists on
the server: ``--session ID`` resumes it later.

File mode: ``--input x.npy`` (``[T, F]`` float32) is stepped through a session in chunks of
``--chunk`` steps; the outputs are written to ``--output`` (``.npz``, one array per output).

Errors (no server, unknown model or session, a bad command) are one line each, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from service.client import CarryoverClientError, Client, GeneratedToken, Session

DEFAULT_GEN = 40
HELP = "Type text; Enter sends it. :gen N, :reset, :quit"
QUIET_LOGGERS = ("httpx", "httpcore", "websockets")  # their INFO lines (one per request) are not for this screen


class UsageError(ValueError):
    """A command line the client cannot run (shown as one line; the session is untouched)."""


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


def gen_count(line: str) -> int:
    """N of ``:gen N`` (default 40); raises :class:`UsageError` for anything else."""
    words = line.split()
    if len(words) == 1:
        return DEFAULT_GEN
    if len(words) == 2 and words[1].isdigit() and int(words[1]) > 0:
        return int(words[1])
    raise UsageError(f"usage: :gen N (N a whole number of characters ≥ 1), not {line!r}")


def describe(error: CarryoverClientError) -> str:
    """One line for a server or transport error."""
    if error.status == 0:
        return f"cannot reach the server: {error.detail}"
    return f"{error.code}: {error.detail}"


class Terminal:
    """The interactive loop's state: the session, its model, and the last logits row it knows
    (``None`` when it knows none: after a reset, or right after a server-side generation)."""

    def __init__(self, session: Session, model: dict[str, Any], out: TextIO) -> None:
        self.session, self.model, self.out = session, model, out
        self.vocab: str = model["vocab"]
        self.index = {c: i for i, c in enumerate(self.vocab)}
        self.input_name: str = model["inputs"][0]["name"]
        self.output_name: str = model["outputs"][0]["name"]
        self.last: np.ndarray | None = None
        self.server_generates = True  # until the server says it has no /generate
        self.mid_line = False  # a generation is printing characters on the current line

    def say(self, text: str, end: str = "\n") -> None:
        print(text, file=self.out, end=end, flush=True)
        self.mid_line = end == "" and (bool(text) or self.mid_line)

    def error(self, text: str) -> None:
        """One line, on a line of its own."""
        self.say(("\n" if self.mid_line else "") + text)

    def command(self, line: str) -> bool:
        """Run one input line; False to leave."""
        if line == ":quit":
            return False
        if line == ":reset":
            self.session.reset()
            self.last = None  # the old predictions belong to the old state
            self.say("reset: step 0")
        elif line == ":gen" or line.startswith(":gen "):
            self.generate(gen_count(line))
        elif line.startswith(":") and line[1:2].isalpha():
            raise UsageError(f"unknown command {line.split()[0]!r}; commands: :gen N, :reset, :quit")
        else:
            self.feed(line + "\n")
        return True

    def feed(self, text: str) -> None:
        ids = [self.index.get(c, self.model["unk_id"]) for c in text]
        self.last = self.session.step({self.input_name: ids})[self.output_name][-1]
        self.say(f"[step {self.session.step_count}] next: {top_predictions(self.last, self.vocab)}")

    def generate(self, count: int) -> None:
        if self.session.step_count == 0:
            raise UsageError("nothing to continue yet: type some text first")
        if self.server_generates:
            try:
                self._generate_on_server(count)
                return
            except CarryoverClientError as e:
                if not (e.status == 404 and e.code == "not_found"):  # a route 404: a server without /generate
                    raise
                self.server_generates = False
        self._generate_here(count)

    def _generate_on_server(self, count: int) -> None:
        for event in self.session.generate("", max_tokens=count, temperature=0.0):
            if isinstance(event, GeneratedToken):
                self.say(event.text, end="")
        self.say("")
        self.last = None  # the reply carries no logits after the last token

    def _generate_here(self, count: int) -> None:
        """Greedy, one request per character: for servers without server-side generation."""
        if self.last is None:  # e.g. a resumed session: its last logits are not known here
            raise UsageError("type some text first: this server cannot continue what it read before")
        for _ in range(count):
            token = int(np.argmax(self.last))
            self.say(self.vocab[token], end="")
            self.last = self.session.step({self.input_name: [token]})[self.output_name][-1]
        self.say("")


def interactive(session: Session, model: dict[str, Any], stdin: Any = sys.stdin, out: Any = sys.stdout) -> None:
    """The interactive loop over ``stdin``; errors are one line each and the loop goes on."""
    terminal = Terminal(session, model, out)
    terminal.say(f"session {session.id} (model {session.model}, step {session.step_count}). {HELP}")
    for raw in stdin:
        try:
            if not terminal.command(raw.rstrip("\n")):
                break
        except UsageError as e:
            terminal.error(str(e))
        except CarryoverClientError as e:
            terminal.error(describe(e))


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


def _run(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
    with Client(args.url, retries=args.retries) as client:
        models = {m["name"]: m for m in client.models()}
        session = client.session(args.session) if args.session else client.create(args.model)
        model = models[session.model]
        if args.input:
            return file_mode(session, model, args.input, args.output, args.chunk)
        if model["kind"] != "token_lm":
            print(f"model {session.model!r} is not a token LM: use --input/--output", file=sys.stderr)
            return 2
        interactive(session, model, stdin, out)
        return 0


def run_client(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """``carryover client``: 0 on success, 1 with one line on stderr for an error."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _run(args, stdin or sys.stdin, out or sys.stdout)
    except CarryoverClientError as e:
        problem = describe(e) if e.status else f"cannot reach the server at {args.url}: {e.detail}"
    except (OSError, ValueError) as e:  # e.g. file mode: a missing or unreadable .npy
        problem = str(e)
    except KeyboardInterrupt:
        return 130
    print(f"carryover client: {problem}", file=sys.stderr)
    return 1


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
    parser.add_argument("--retries", type=int, default=2, help="retries of a request after a 503 or lost connection")
    parser.set_defaults(func=run_client)
