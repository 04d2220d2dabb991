"""Example: an attention decoder with per-session constants (Bahdanau additive attention).

A GRU decoder that, at every step, attends over a fixed memory: the encoder outputs of the
session's source sequence, given once when the session is created and of a different length in
every session. The score of memory position j is ``v^T tanh(W_q h + W_k m_j)`` with the previous
hidden state ``h`` as the query (Bahdanau et al., 2015); a softmax over the positions the memory
mask marks real gives the weights, their weighted sum of the memory the context, and the context
is concatenated with the step's token embedding as the GRU's input (and with the new state as
the head's input). It is a token LM, so it also generates.

The memory is a per-session constant (``memory`` ``[L, 10]`` per session, ``memory_mask`` its
``[B, L]`` mask): the runtime pads the memories of a batch to the longest and sets the mask, and
padded positions get weight exactly 0, so each session sees its own memory, unpadded.

    python -m model_export.examples.attention_decoder /tmp/attn.onnx [sequence|step]
    carryover serve --model attn=/tmp/attn.onnx
    curl -s --json '{"model": "attn", "constants": {"memory": [[0.1, ...10 floats], [...]]}}' \\
        localhost:8000/v1/sessions
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from model_export.cells import CellSpec, ConstantSpec, DataSpec, StateSpec, gru_step
from model_export.export import export_both, export_cell
from service.engine.metadata import Form

VOCAB = "abcdefghij?"
MEMORY_DIM = 10
NEG = -1e9  # masked score: exp(NEG - max) is exactly 0 in float32, so padding gets weight 0


class AttentionDecoder(nn.Module):
    def __init__(self, embed: int = 6, hidden: int = 12, attention: int = 8) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(len(VOCAB), embed)
        self.w_q = nn.Linear(hidden, attention, bias=False)
        self.w_k = nn.Linear(MEMORY_DIM, attention)
        self.v = nn.Linear(attention, 1, bias=False)
        self.cell = nn.GRUCell(embed + MEMORY_DIM, hidden)
        self.head = nn.Linear(hidden + MEMORY_DIM, len(VOCAB))

    def spec(self) -> CellSpec:
        return CellSpec(
            inputs=(DataSpec("tokens", (), torch.int64),),
            outputs=(DataSpec("logits", (len(VOCAB),)),),
            states=(StateSpec("h", "h_next", (-1, self.hidden)),),
            kind="token_lm",
            vocab=VOCAB,
            unk_id=len(VOCAB) - 1,
            constants=(ConstantSpec("memory", ("B", "L", MEMORY_DIM), mask="memory_mask"),),
        )

    def initial_state(self, batch_size: int) -> tuple[Tensor, ...]:
        return (torch.zeros(batch_size, self.hidden),)

    def attend(self, h: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """The context ``[B, D]``: the memory weighted by the masked softmax of the scores."""
        scores = self.v(torch.tanh(self.w_q(h)[:, None, :] + self.w_k(memory))).squeeze(-1)  # [B, L]
        weights = torch.softmax(torch.where(memory_mask, scores, torch.full_like(scores, NEG)), dim=-1)
        return (weights[:, :, None] * memory).sum(dim=1)

    def forward(self, tokens: Tensor, h: Tensor, memory: Tensor, memory_mask: Tensor) -> tuple[Tensor, Tensor]:
        context = self.attend(h, memory, memory_mask)
        c = self.cell
        new = gru_step(
            torch.cat([self.embed(tokens), context], dim=-1), h, c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh
        )
        return self.head(torch.cat([new, context], dim=-1)), new


def build() -> AttentionDecoder:
    """Deterministic weights (scaled up, so errors are not hidden by tiny values)."""
    torch.manual_seed(13)
    model = AttentionDecoder()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    return model.eval()


def reference(tokens: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
    """One session alone, unpadded: its tokens ``[T]`` over its memory ``[L, D]`` from h = 0
    (what the service must equal however it splits, pads and batches) → (logits [T, V], h [H])."""
    cell = build()
    (h,) = cell.initial_state(1)
    mask = torch.ones((1, memory.shape[0]), dtype=torch.bool)
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[0]):
            logits, h = cell(tokens[t : t + 1], h, memory[None], mask)
            out.append(logits[0])
    return torch.stack(out), h[0]


def export(path: str | Path, form: Form = "sequence") -> Path:
    return export_cell(build(), path, form)


def export_forms(sequence_path: str | Path, step_path: str | Path) -> tuple[Path, Path]:
    """Both forms from one trace."""
    return export_both(build(), sequence_path, step_path)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "attention_decoder.onnx"
    print(export(target, "step" if sys.argv[2:] == ["step"] else "sequence"))
