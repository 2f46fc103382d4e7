"""Non-neural baselines with the students' scoring signature: ``score(history [B, L]) -> [B, C]``.

Both are fitted on the training prefixes of a LeaveOneOutSplit only (``split.train_items`` /
``split.train_offsets``), never on validation or test targets. They are ``nn.Module`` s holding buffers,
so ``.to(device)``, ``.eval()``, ``state_dict()`` and the evaluation code treat them like students.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit


def _check_history(history: torch.Tensor, num_items: int, who: str) -> None:
    if history.dim() != 2:
        raise ValueError(f"{who}.score: history must be [B, L], got shape {tuple(history.shape)}")
    if history.numel():
        lo, hi = int(history.min()), int(history.max())
        if lo < PAD_ID or hi >= num_items:
            raise ValueError(f"{who}.score: history ids must be PAD_ID={PAD_ID} or 0..{num_items - 1}, "
                             f"got range [{lo}, {hi}]")


class Popularity(nn.Module):
    """Scores every item by its number of training interactions, whatever the history."""

    def __init__(self, counts: torch.Tensor):
        super().__init__()
        if counts.dim() != 1:
            raise ValueError(f"Popularity: counts must be [C], got shape {tuple(counts.shape)}")
        self.num_items = int(counts.shape[0])
        self.register_buffer("counts", counts.to(torch.float32))

    @classmethod
    def fit(cls, split: LeaveOneOutSplit) -> "Popularity":
        """Count each item's interactions in the training prefixes of ``split``."""
        counts = np.bincount(split.train_items, minlength=split.data.num_items)
        return cls(torch.from_numpy(counts))

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, C] interaction counts (as float)."""
        _check_history(history, self.num_items, "Popularity")
        return self.counts.expand(history.shape[0], -1).clone()

    forward = score


def _item_user_csr(offsets: np.ndarray, items: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary item->user incidence in CSR (rows = items, sorted users, repeats collapsed)."""
    users = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    key = np.unique(items.astype(np.int64) * (len(offsets) - 1) + users)  # sorted by (item, user), deduped
    it, us = key // (len(offsets) - 1), key % (len(offsets) - 1)
    row_ptr = np.zeros(num_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(it, minlength=num_items), out=row_ptr[1:])
    return row_ptr, us


class ItemKNN(nn.Module):
    """Item-based nearest neighbours on training co-occurrence.

    ``sim(i, j) = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrink)`` (cosine on binary user vectors, shrunk
    towards 0 for rarely seen items), ``sim(i, i) = 0``. Only the ``k`` most similar neighbours of each
    item are kept, as two [C, k] arrays (ids, similarities): C * k instead of C * C entries.

    A history scores ``s(j) = sum_t decay**(age_t) * sim(item_t, j)`` where age 0 is the most recent
    item (``decay=1`` is the plain sum; an item that occurs twice counts twice).
    """

    def __init__(self, neighbours: torch.Tensor, similarities: torch.Tensor, decay: float = 1.0):
        super().__init__()
        if neighbours.shape != similarities.shape or neighbours.dim() != 2:
            raise ValueError(f"ItemKNN: neighbours {tuple(neighbours.shape)} and similarities "
                             f"{tuple(similarities.shape)} must both be [C, k]")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"ItemKNN: decay must be in (0, 1], got {decay}")
        self.num_items, self.k = int(neighbours.shape[0]), int(neighbours.shape[1])
        self.decay = float(decay)
        self.register_buffer("neighbours", neighbours.to(torch.int64))
        self.register_buffer("similarities", similarities.to(torch.float32))

    @classmethod
    def fit(cls, split: LeaveOneOutSplit, k: int = 100, shrink: float = 10.0, decay: float = 1.0,
            block_entries: int = 1 << 24) -> "ItemKNN":
        """Fit on the training prefixes of ``split``.

        Co-occurrences are computed for blocks of items at a time (sparse item-user @ user-item
        product, densified to at most ``block_entries`` floats per block), so memory stays
        O(block_entries + C * k) however large the catalog."""
        if k < 1:
            raise ValueError(f"ItemKNN.fit: k must be >= 1, got {k}")
        if shrink < 0:
            raise ValueError(f"ItemKNN.fit: shrink must be >= 0, got {shrink}")
        num_items, num_users = split.data.num_items, split.data.num_users
        k_eff = min(k, max(num_items - 1, 1))
        row_ptr, users = _item_user_csr(split.train_offsets, split.train_items, num_items)
        norm = torch.from_numpy(np.diff(row_ptr)).to(torch.float32).sqrt()  # sqrt |U_i|
        ones = torch.ones(len(users), dtype=torch.float32)
        nbr = torch.empty(num_items, k_eff, dtype=torch.int64)
        sim = torch.empty(num_items, k_eff, dtype=torch.float32)
        step = max(1, block_entries // max(num_items, 1))
        dense = torch.empty(min(step, num_items) * num_items)  # reused: fresh pages per block cost more than a memset
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's "beta" notices for CSR
            item_user = torch.sparse_csr_tensor(torch.from_numpy(row_ptr), torch.from_numpy(users), ones,
                                                size=(num_items, num_users))
            user_item = item_user.t().to_sparse_csr()
            for lo in range(0, num_items, step):
                hi = min(num_items, lo + step)
                p0, p1 = int(row_ptr[lo]), int(row_ptr[hi])
                block = torch.sparse_csr_tensor(torch.from_numpy(row_ptr[lo:hi + 1] - p0),
                                                torch.from_numpy(users[p0:p1]), ones[p0:p1],
                                                size=(hi - lo, num_users))
                co = torch.sparse.mm(block, user_item)  # sparse [hi-lo, C] co-occurrence counts
                rows = torch.repeat_interleave(torch.arange(hi - lo), co.crow_indices().diff())
                cols = co.col_indices()
                vals = co.values() / (norm[lo + rows] * norm[cols] + shrink).clamp_min(1e-12)
                vals[cols == lo + rows] = 0.0  # an item is not its own neighbour
                d = dense[: (hi - lo) * num_items]
                d.zero_()
                d[rows * num_items + cols] = vals
                top = d.view(hi - lo, num_items).topk(k_eff, dim=1)
                sim[lo:hi], nbr[lo:hi] = top.values, top.indices
        return cls(nbr, sim, decay)

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, C] summed (recency-weighted) neighbour similarities."""
        _check_history(history, self.num_items, "ItemKNN")
        b, l = history.shape
        valid = history != PAD_ID
        ages = torch.arange(l - 1, -1, -1, device=history.device, dtype=torch.float32)
        weight = (self.decay ** ages)[None, :] * valid  # [B, L], 0 at padding
        ids = history.clamp_min(0)  # padding reads row 0 with weight 0
        vals = self.similarities[ids] * weight.unsqueeze(-1)  # [B, L, k]
        out = torch.zeros(b, self.num_items, device=history.device, dtype=torch.float32)
        return out.scatter_add_(1, self.neighbours[ids].reshape(b, -1), vals.reshape(b, -1))

    forward = score
