"""The student interface shared by every sequential student (SASRec, GRU4Rec, Caser, ...).

A student maps left-padded histories ``[B, L]`` (PAD_ID = -1 on the left, most recent item at the
right end) to hidden states ``[B, L, d]``. Scores over the catalog are ``hidden @ W.T (+ b)`` with the
output embedding ``W`` [C, d] (and optional bias ``b`` [C]): the logits' columns are the item ids.

Item embeddings live in a TorchRec ``EmbeddingCollection`` even on one process, so that the same
model is sharded by TorchRec's planner later without change. The lookup is jagged: padding is never
looked up (it is not a row of the table), and padded positions get a zero vector.
"""
from __future__ import annotations

import abc

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from prmkd_dist.constants import PAD_ID

ITEM_TABLE = "item"
HISTORY_FEATURE = "history"


def item_embedding_collection(num_items: int, dim: int, device: torch.device | str | None = None,
                              table: str = ITEM_TABLE, feature: str = HISTORY_FEATURE) -> EmbeddingCollection:
    ec = EmbeddingCollection(
        tables=[EmbeddingConfig(name=table, embedding_dim=dim, num_embeddings=num_items, feature_names=[feature])],
        device=torch.device(device) if device is not None else None,
    )
    return ec


def lookup_padded(ec: nn.Module, history: torch.Tensor, feature: str = HISTORY_FEATURE) -> torch.Tensor:
    """Embed a left-padded history [B, L] through a (possibly sharded) EmbeddingCollection.

    Returns [B, L, d] with zeros at PAD_ID positions. Works for the plain module and for the
    TorchRec-sharded one (both take a KeyedJaggedTensor and return {feature: JaggedTensor})."""
    mask = history != PAD_ID
    values = history[mask]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[feature], values=values, lengths=mask.sum(dim=1).to(torch.int32)
    )
    out = ec(kjt)
    emb = out[feature].values()
    dense = emb.new_zeros(history.shape[0], history.shape[1], emb.shape[-1])
    dense[mask] = emb  # jagged values are in row-major order of the mask: left padding is preserved
    return dense


class SequentialStudent(nn.Module, abc.ABC):
    """Base class of the sequential students. Subclasses implement ``encode``."""

    def __init__(self, num_items: int, dim: int, max_len: int, device=None):
        super().__init__()
        if num_items <= 0 or dim <= 0 or max_len <= 0:
            raise ValueError(f"num_items, dim, max_len must be > 0, got {num_items}, {dim}, {max_len}")
        self.num_items = num_items
        self.dim = dim
        self.max_len = max_len
        self.item_ec = item_embedding_collection(num_items, dim, device)
        # the EC initialises uniformly in +-sqrt(1/n); recsys transformers train better from N(0, 0.02)-ish
        with torch.no_grad():
            nn.init.normal_(self.item_table_weight(), std=dim ** -0.5)

    # --- embeddings ----------------------------------------------------------------------------
    def item_table_weight(self) -> torch.Tensor:
        """The [C, d] item table of the unsharded EmbeddingCollection."""
        return self.item_ec.embeddings[ITEM_TABLE].weight

    def embed_items(self, history: torch.Tensor) -> torch.Tensor:
        return lookup_padded(self.item_ec, history)

    def output_weight(self) -> torch.Tensor:
        """[C, d] output embeddings (tied to the input table unless a subclass overrides)."""
        return self.item_table_weight()

    def output_bias(self) -> torch.Tensor | None:
        return None

    # --- model ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, d] hidden states (position l sees items <= l only)."""

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.encode(history)

    def user_embedding(self, history: torch.Tensor) -> torch.Tensor:
        """[B, d]: the hidden state at the most recent position."""
        return self.encode(history)[:, -1]

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, C] scores over the whole catalog for the next item."""
        u = self.user_embedding(history)
        logits = u @ self.output_weight().T
        b = self.output_bias()
        return logits if b is None else logits + b
