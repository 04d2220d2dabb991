"""Small PyTorch models the tests export, with fixed seeds so a factory always returns the same
weights (``carryover verify --torch-module tests.models:gru_stacked`` relies on that).

Imports torch: only the exporter's tests (``tests/model_export/``) use this module. The server tests
run from the committed exports of these specs, written by ``python -m tests.make_models``."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from model_export.cells import RecurrentNet

SPECS: dict[str, dict[str, Any]] = {
    "gru_stacked": dict(cell="gru", input_size=4, hidden_size=8, num_layers=2, output_size=3),
    "lstm": dict(cell="lstm", input_size=4, hidden_size=6, num_layers=1, input_projection=5),
    "lstm_stacked": dict(cell="lstm", input_size=3, hidden_size=5, num_layers=2, output_size=2),
    "token_gru": dict(
        cell="gru",
        hidden_size=8,
        num_layers=2,
        vocab_size=11,
        embedding_dim=4,
        output_size=11,
        vocab="abcdefghij\ufffd",
        unk_id=10,
    ),
}


def build(name: str) -> RecurrentNet:
    torch.manual_seed(zlib.crc32(name.encode()))
    model = RecurrentNet(**SPECS[name])
    with torch.no_grad():  # larger weights than the default init, so errors are not hidden by tiny values
        for p in model.parameters():
            p.mul_(2.0)
    return model.eval()


def gru_stacked() -> RecurrentNet:
    return build("gru_stacked")


def lstm() -> RecurrentNet:
    return build("lstm")
