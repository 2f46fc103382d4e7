"""Caser (Tang & Wang, 2018): convolutional sequence embedding, as a causal sliding-window student.

The paper encodes one window of the last ``max_len`` items per training example. Here the window
slides over the whole left-padded history, so ``encode`` returns ``[B, L, d]`` where position l is
Caser's encoding of the ``max_len`` items ending at l (slots before the history are zero embeddings,
exactly like padding). Training can then use every position, as with the other students, for one
convolution pass instead of L separate windows.

Departures from the paper:
- no user embedding: the score is ``z @ W.T + b`` instead of ``[z; P_u] @ W.T + b``. A user table would
  tie the model to the users seen in training; without it the student scores any history, including
  unseen users, which is what a distilled serving model needs.
- the output embeddings W [C, d] are a second table, not tied to the input table (as in the paper). It
  lives in its own TorchRec EmbeddingCollection so that TorchRec's planner shards it like the input
  table (it is as large); the bias [C] is a plain parameter: FBGEMM tables need a width that is a
  multiple of 4, and C floats are small enough to replicate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prmkd_dist.constants import PAD_ID
from prmkd_dist.models.base import SequentialStudent, item_embedding_collection

OUTPUT_TABLE = "item_out"
OUTPUT_FEATURE = "item_out_ids"


class Caser(SequentialStudent):
    """Convolutional sequence embedding recommender (user-independent, sliding window).

    Args:
        num_items: catalog size C.
        dim: item embedding width d and output width.
        max_len: window length (the paper's L, typically 5): the number of recent items one
            encoding sees. Histories may be longer; the window slides over them.
        num_h_filters: horizontal filters per height h = 1..max_len.
        num_v_filters: vertical filters.
        dropout: dropout on the concatenated convolution features.
        device: where the parameters are created.
    """

    registry_name = "caser"

    def __init__(self, num_items: int, dim: int = 64, max_len: int = 5, num_h_filters: int = 16,
                 num_v_filters: int = 4, dropout: float = 0.5, device=None):
        super().__init__(num_items, dim, max_len, device)
        if num_h_filters < 0 or num_v_filters < 0 or num_h_filters + num_v_filters == 0:
            raise ValueError(f"Caser: need num_h_filters, num_v_filters >= 0 and not both 0, "
                             f"got {num_h_filters}, {num_v_filters}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Caser: dropout must be in [0, 1), got {dropout}")
        self.hparams = dict(dim=dim, max_len=max_len, num_h_filters=num_h_filters,
                            num_v_filters=num_v_filters, dropout=dropout)
        self.num_h_filters = num_h_filters
        self.num_v_filters = num_v_filters
        # horizontal filter of height h = Conv1d over time with the embedding as channels
        self.h_convs = nn.ModuleList(
            nn.Conv1d(dim, num_h_filters, kernel_size=h, device=device) for h in range(1, max_len + 1)
        ) if num_h_filters else nn.ModuleList()
        # vertical filters: a weighted sum of the window's rows, the same weights for every channel
        self.v_conv = nn.Conv1d(1, num_v_filters, kernel_size=max_len, device=device) if num_v_filters else None
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(num_v_filters * dim + num_h_filters * max_len, dim, device=device)
        self.out_ec = item_embedding_collection(num_items, dim, device, table=OUTPUT_TABLE, feature=OUTPUT_FEATURE)
        with torch.no_grad():
            nn.init.normal_(self.output_weight(), std=dim ** -0.5)
        self.out_bias = nn.Parameter(torch.zeros(num_items, device=device))

    def output_weight(self) -> torch.Tensor:
        """[C, d] output embeddings (own table, untied from the input table)."""
        return self.out_ec.embeddings[OUTPUT_TABLE].weight

    def output_bias(self) -> torch.Tensor:
        return self.out_bias

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, d]: position l encodes the window of ``max_len`` items ending
        at l (depends on items <= l only); zeros at padding."""
        if history.dim() != 2:
            raise ValueError(f"Caser.encode: history must be [B, L], got shape {tuple(history.shape)}")
        b, l = history.shape
        w = self.max_len
        valid = history != PAD_ID
        e = self.embed_items(history).transpose(1, 2)  # [B, d, L]
        e = F.pad(e, (w - 1, 0))  # the first windows reach before the history: zero rows, like padding
        feats = []
        if self.v_conv is not None:
            # [B*d, 1, L+w-1] -> [B*d, n_v, L]: window ending at l = conv output at l
            v = self.v_conv(e.reshape(b * self.dim, 1, l + w - 1))
            feats.append(v.view(b, self.dim, self.num_v_filters, l).permute(0, 3, 2, 1).reshape(b, l, -1))
        for h, conv in enumerate(self.h_convs, start=1):
            # conv output at t covers rows t..t+h-1 of the padded sequence; the window ending at l holds
            # the w-h+1 starts l..l+w-h (padded indexing): max-pool over exactly those
            c = F.relu(conv(e))  # [B, n_h, L+w-h]
            feats.append(F.max_pool1d(c, kernel_size=w - h + 1, stride=1).transpose(1, 2))  # [B, L, n_h]
        z = F.relu(self.fc(self.drop(torch.cat(feats, dim=-1))))
        return z * valid.unsqueeze(-1)

    def user_embedding(self, history: torch.Tensor) -> torch.Tensor:
        """[B, d]: only the last window matters, so scoring encodes ``max_len`` positions, not L."""
        return self.encode(history[:, -self.max_len:])[:, -1]
