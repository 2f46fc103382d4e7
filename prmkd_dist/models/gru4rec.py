"""GRU4Rec (Hidasi et al., 2016) as a sequential student over left-padded histories.

A plain GRU over a left-padded batch would run through the leading padding: even with zero input the
GRU's biases move the state away from zero, so the same history would encode differently depending
on how much padding precedes it. Instead each row is rotated so its real items start at step 0, run
as a packed sequence (the GRU stops at each row's own length, and skips the padding's compute), and
rotated back. Hidden states at padded positions are zero.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from prmkd_dist.constants import PAD_ID
from prmkd_dist.models.base import SequentialStudent


class GRU4Rec(SequentialStudent):
    """GRU sequential recommender with tied output.

    Args:
        num_items: catalog size C.
        dim: item embedding width d (= output width; scores are ``h @ E.T``).
        max_len: longest history the trainer feeds (the GRU itself has no length limit; kept for the
            shared student interface).
        num_layers: stacked GRU layers (dropout is applied between them when > 1).
        dropout: dropout on the item embeddings and between GRU layers.
        hidden: GRU state width (default ``dim``); projected back to ``dim`` when different.
        device: where the parameters are created.
    """

    registry_name = "gru4rec"

    def __init__(self, num_items: int, dim: int = 64, max_len: int = 200, num_layers: int = 1,
                 dropout: float = 0.2, hidden: int | None = None, device=None):
        super().__init__(num_items, dim, max_len, device)
        hidden = dim if hidden is None else hidden
        if num_layers < 1 or hidden < 1:
            raise ValueError(f"GRU4Rec: num_layers and hidden must be >= 1, got {num_layers}, {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GRU4Rec: dropout must be in [0, 1), got {dropout}")
        self.hparams = dict(dim=dim, max_len=max_len, num_layers=num_layers, dropout=dropout, hidden=hidden)
        self.emb_drop = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, hidden, num_layers=num_layers, batch_first=True,
                          dropout=dropout if num_layers > 1 else 0.0, device=device)
        self.proj = nn.Linear(hidden, dim, device=device) if hidden != dim else nn.Identity()

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, d]; position l depends on items <= l only; zeros at padding."""
        if history.dim() != 2:
            raise ValueError(f"GRU4Rec.encode: history must be [B, L], got shape {tuple(history.shape)}")
        b, l = history.shape
        valid = history != PAD_ID
        lengths = valid.sum(dim=1)
        x = self.emb_drop(self.embed_items(history))
        # rotate row b left by (L - n_b): real items move to steps 0..n_b-1 (right padding for packing)
        steps = torch.arange(l, device=history.device)
        to_front = (steps[None, :] + (l - lengths)[:, None]) % l  # [B, L] source index of step t
        x = x.gather(1, to_front.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        # packing needs length >= 1; an empty row then runs one step on its zero (padding) embedding,
        # whose output is masked away below
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=l)  # zeros beyond each length
        # rotate back: step t of the padded form is step (t - (L - n_b)) mod L of the packed form
        back = (steps[None, :] - (l - lengths)[:, None]) % l
        out = out.gather(1, back.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        return self.proj(out) * valid.unsqueeze(-1)
