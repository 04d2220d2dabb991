"""Train the bundled demo character-level LM and export it as package data.

    python -m model_export.train_charlm [--steps N] [--seed S] [--out service/models]

A stacked GRU trained with truncated back-propagation through time on the Python standard
library's own source (see ``charlm_data``), carrying the hidden state across windows exactly as
the service carries it across requests. Held-out bits per character are measured on files the
model never saw and written into the model card next to the ONNX file.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model_export.cells import RecurrentNet
from model_export.charlm_data import build_vocab, encode, package_files, read_text, split_stdlib
from model_export.charlm_eval import bits_per_char as bits_per_char_runtime
from model_export.export import export_cell
from service.engine.model import RecurrentModel

THIRD_PARTY = "pydantic"  # a runtime dependency of the service, so always installed beside it
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "service" / "models"


def stream_batches(ids: np.ndarray, streams: int, window: int) -> tuple[torch.Tensor, int]:
    """Lay the corpus out as ``streams`` contiguous rows; window k of every row is batch k."""
    per_row = len(ids) // streams
    rows = torch.from_numpy(ids[: per_row * streams].reshape(streams, per_row))
    return rows, (per_row - 1) // window


@torch.no_grad()
def bits_per_char(model: RecurrentNet, ids: np.ndarray, streams: int = 16, window: int = 256) -> float:
    """Stateful held-out cross-entropy in bits/char (the state carries across windows)."""
    model.eval()
    window = min(window, len(ids) // streams - 1)  # short texts: one window per row
    rows, n_windows = stream_batches(ids, streams, window)
    state = model.initial_state(streams)
    total, count = 0.0, 0
    for k in range(n_windows):
        chunk = rows[:, k * window : (k + 1) * window + 1]
        logits, *state_list = model.forward_sequence(chunk[:, :-1], *state)
        state = tuple(state_list)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += chunk[:, 1:].numel()
    model.train()
    return total / count / math.log(2)


def lr_schedule(
    opt: torch.optim.Optimizer, kind: str, peak: float, steps: int, warmup: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle (PyTorch's: cosine up from peak/25 and down to ~0, beta1 cycled 0.95-0.85) or a
    linear warm-up to ``peak`` then a cosine decay to zero, with beta1 fixed."""
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=steps, pct_start=warmup)
    warm = max(1, round(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embedding", type=int, default=48)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-3, help="peak learning rate")
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps spent warming up")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0: none)")
    p.add_argument("--beta2", type=float, default=0.99, help="Adam's second-moment decay")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW)")
    p.add_argument(
        "--shuffle-files",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train on the files in a seeded random order (else sorted by path: whole packages side by side)",
    )
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train under bfloat16 autocast (weights, optimizer and scoring stay float32; ~3x faster on a "
        "CPU with AVX512-BF16, the same recipe but slower elsewhere)",
    )
    p.add_argument("--no-export", action="store_true", help="score in PyTorch only (experiments)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (use 1 on a box others keep busy)")
    p.add_argument("--eval-chars", type=int, default=None, help="held-out characters to score (default: all)")
    p.add_argument("--train-chars", type=int, default=None, help="cap on training characters (tests use it)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    corpus = split_stdlib()
    train_files = list(corpus.train)
    if args.shuffle_files:  # the sorted order puts whole packages side by side in a row
        train_files = [train_files[i] for i in np.random.default_rng(args.seed).permutation(len(train_files))]
    train_text = read_text(train_files, args.train_chars)
    vocab = build_vocab(train_text)
    train_ids = encode(train_text, vocab)
    held_ids = encode(read_text(corpus.held_out, args.eval_chars), vocab)
    print(
        f"corpus: {len(corpus.train)} train files ({len(train_ids):,} chars), "
        f"{len(corpus.held_out)} held-out files; vocab {len(vocab)} (unk id {len(vocab) - 1})"
    )

    model = RecurrentNet(
        "gru",
        hidden_size=args.hidden,
        num_layers=args.layers,
        vocab_size=len(vocab),
        embedding_dim=args.embedding,
        output_size=len(vocab),
        vocab=vocab,
        unk_id=len(vocab) - 1,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.beta2), weight_decay=args.weight_decay)
    sched = lr_schedule(opt, args.schedule, args.lr, args.steps, args.warmup)
    rows, n_windows = stream_batches(train_ids, args.streams, args.window)
    state = model.initial_state(args.streams)
    started = time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step", mininterval=2.0)
    for step in bar:
        k = step % n_windows
        if k == 0:
            state = model.initial_state(args.streams)
        chunk = rows[:, k * args.window : (k + 1) * args.window + 1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, *new_state = model.forward_sequence(chunk[:, :-1], *state)
        state = tuple(s.detach().float() for s in new_state)
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(bpc=f"{loss.item() / math.log(2):.3f}")
    train_minutes = (time.time() - started) / 60
    chars_seen = args.steps * args.streams * args.window
    held_bpc = bits_per_char(model, held_ids)
    print(
        f"held-out bits/char: {held_bpc:.4f} over {len(held_ids):,} chars; trained on {chars_seen:,} chars "
        f"in {train_minutes:.1f} min ({chars_seen / (train_minutes * 60):,.0f} chars/s)"
    )
    if args.no_export:
        return

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_cell(model, args.out / "charlm.onnx", "sequence")
    runtime_bpc = bits_per_char_runtime(RecurrentModel(onnx_path), held_ids)
    print(f"held-out bits/char through the ONNX runtime: {runtime_bpc:.4f}")
    third_ids = encode(read_text(package_files(THIRD_PARTY), args.eval_chars), vocab)
    third_bpc = bits_per_char_runtime(RecurrentModel(onnx_path), third_ids)
    print(f"{THIRD_PARTY} bits/char through the ONNX runtime: {third_bpc:.4f} over {len(third_ids):,} chars")
    params = sum(p.numel() for p in model.parameters())
    card = {
        "held_out_bits_per_char": round(runtime_bpc, 4),
        "held_out_bits_per_char_torch": round(held_bpc, 4),
        "held_out_chars": len(held_ids),
        "held_out_files": len(corpus.held_out),
        "third_party_bits_per_char": round(third_bpc, 4),
        "third_party_chars": len(third_ids),
        "third_party": f"{THIRD_PARTY} {importlib.metadata.version(THIRD_PARTY)}",
        "train_files": len(corpus.train),
        "train_chars": len(train_ids),
        "chars_seen_in_training": chars_seen,
        "passes": round(chars_seen / len(train_ids), 2),
        "parameters": params,
        "train_minutes": round(train_minutes, 1),
        "chars_per_second": round(chars_seen / (train_minutes * 60)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
    }
    (args.out / "charlm.json").write_text(json.dumps(card, indent=2) + "\n")
    (args.out / "charlm.md").write_text(model_card(card, vocab, onnx_path))
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB) and its model card")


def model_card(card: dict[str, object], vocab: str, onnx_path: Path) -> str:
    a = card["args"]
    assert isinstance(a, dict)
    order = ", in a seeded random file order" if a["shuffle_files"] else ""
    decay = f", weight decay {a['weight_decay']}" if a["weight_decay"] else ""
    optimizer = f"Adam{'W' if decay else ''} (beta2 {a['beta2']}{decay})"
    schedule = "one-cycle" if a["schedule"] == "onecycle" else "linear warm-up + cosine"
    precision = "bfloat16 autocast (float32 weights)" if a.get("bf16") else "float32"
    return f"""# charlm — the bundled demo model

A character-level language model of Python source: a {a["layers"]}-layer GRU (hidden {a["hidden"]},
embedding {a["embedding"]}, {card["parameters"]:,} parameters) exported by `model_export` in the
*sequence* form of the carryover contract (`kind: token_lm`, {len(vocab)} ids, the last one,
U+FFFD, is the unknown character). File: `{onnx_path.name}`, {onnx_path.stat().st_size / 1e6:.2f} MB.

## Quality

**Held-out bits per character: {card["held_out_bits_per_char"]}** (target ≤ 1.6).

How it was measured: the standard library's `*.py` files of Python {card["python"]} are split
by file with a hash of the relative path; {card["held_out_files"]} files (about 5 %) are held out
and never trained on. All {card["held_out_chars"]:,} characters of the held-out files are read as
16 contiguous streams and scored statefully in windows of 256 (the state carries across windows,
as the service carries it across requests); bits/char = mean cross-entropy / ln 2, computed from
the exported ONNX file through carryover's runtime (`python -m model_export.charlm_eval`; PyTorch
on the same text: {card["held_out_bits_per_char_torch"]}). `tests/model_export/test_charlm.py`
re-measures a held-out sample through the runtime on every test run.

Third-party code: {card["third_party_bits_per_char"]} bits/char over the {card["third_party_chars"]:,} characters
of the `*.py` files of {card["third_party"]} (other authors, other style; measured the same way,
`python -m model_export.charlm_eval --third-party {str(card["third_party"]).split()[0]}`).

## Training

Data: {card["train_files"]} files, {card["train_chars"]:,} characters{order};
{card["chars_seen_in_training"]:,} characters seen ({card["passes"]} passes over it; truncated BPTT,
{a["streams"]} streams × windows of {a["window"]}, {a["steps"]} steps, {optimizer},
{schedule} schedule with {a["warmup"]:.0%} warm-up,
peak lr {a["lr"]}, gradient clip {a["clip"]}, {precision}, seed {a["seed"]}, {a["threads"]} CPU thread(s):
{card["train_minutes"]} minutes at {card["chars_per_second"]:,} chars/s, torch {card["torch"]}).

Reproduce: `python -m model_export.train_charlm --seed {a["seed"]} --steps {a["steps"]}` (the defaults
are this recipe; the experiments behind it: `bench/results/charlm_experiments.md`).

Intended use: a demo and a test fixture for the serving path, not a code-completion model.
"""


if __name__ == "__main__":
    main()
