"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019) as a teacher.

Closed form on the binary training user-item matrix X [U, C] (``split.train_items`` only):
    G = X^T X + lambda I,  P = G^-1,  B = I - P / diag(P)  (column-wise), i.e. B_ij = -P_ij / P_jj, B_ii = 0.
A user's scores are x_user @ B with x_user the binary indicator of the history's distinct items.

Cost: G and B are dense C x C float32 (ml-latest-small: 9.7k^2 = 0.38 GB; amazon-games: 23.7k^2 = 2.2 GB,
and the Cholesky inverse is O(C^3): minutes on a 2-core CPU). Scores are computed with an
``embedding_bag`` over the history rows of B (O(L*C) per user), never a dense [B, C] x [C, C] product.
The order of the history does not matter to EASE, and by default it reads the whole history. ``recent=N`` makes
it read only the N most recent positions (its ``max_len``): on ml-latest-small, whose histories run to thousands of
items, the last 10 beat the whole history by a third on validation NDCG@10 (benchmarks/RESULTS.md, issue 2). Items
before those N are still excluded from the candidates, as the evaluation excludes every seen item.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.teachers.base import Teacher, TeacherError, eval_history_len, register_teacher

DEFAULT_L2_GRID = (10.0, 30.0, 100.0, 300.0, 1000.0)  # ml-latest-small picks 30-50 (see report)


def item_blocks(split: LeaveOneOutSplit) -> list[tuple[int, int]]:
    """Item-id ranges [lo, hi) whose Gram blocks EASE fits separately: each domain of a multi-domain dataset (no
    user holds items of two domains, so G, its inverse and B are block diagonal and the per-block fit is exact,
    at a fraction of the O(C^3) time and C^2 memory), else the whole catalog."""
    if split.data.domains:
        return [tuple(d.items) for d in split.data.domains]
    return [(0, split.data.num_items)]


def user_item_matrix(split: LeaveOneOutSplit, items: tuple[int, int] | None = None):
    """X: scipy CSR float32 [U, hi - lo], the binary training user-item matrix over the items [lo, hi) of ``items``
    (default: the catalog); a re-consumed item is still one interaction."""
    from scipy import sparse

    lo, hi = items if items is not None else (0, split.data.num_items)
    rows = np.repeat(np.arange(split.data.num_users), np.diff(split.train_offsets))
    keep = (split.train_items >= lo) & (split.train_items < hi)
    x = sparse.csr_matrix((np.ones(int(keep.sum()), np.float32), (rows[keep], split.train_items[keep] - lo)),
                          shape=(split.data.num_users, hi - lo))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def gram_matrix(split: LeaveOneOutSplit, items: tuple[int, int] | None = None) -> torch.Tensor:
    """G = X^T X float32 of the binary training matrix (``user_item_matrix``), dense [hi - lo, hi - lo] over the
    items of ``items`` ([C, C] for the whole catalog, the default)."""
    x = user_item_matrix(split, items)
    g = (x.T @ x).toarray()
    return torch.from_numpy(np.ascontiguousarray(g, dtype=np.float32))


def ease_weights(gram: torch.Tensor, l2: float) -> torch.Tensor:
    """B = I - P / diag(P) with P = (G + l2 I)^-1 and zero diagonal (float32, same shape as ``gram``)."""
    if l2 <= 0:
        raise TeacherError(f"EASE: l2 must be > 0 (it makes G + l2 I invertible), got {l2}")
    g = gram.clone()
    g.diagonal().add_(l2)
    # G + l2 I is symmetric positive definite: Cholesky is the cheapest stable inverse
    # LAPACK hands P back column-major (strides (1, C)); scoring gathers ROWS of B, and on such a layout each
    # row is C scattered floats (Games: scoring 10-100x slower). P is symmetric, so its transpose is the same
    # matrix in row-major order: a free view, no C x C copy.
    p = torch.cholesky_inverse(torch.linalg.cholesky(g)).mT
    del g
    if not p.is_contiguous():  # a future LAPACK path that returns row-major already: keep it row-major
        p = p.contiguous()
    diag = p.diagonal().clone()  # a copy: the in-place division below rewrites the diagonal it reads
    b = p.div_(-diag.unsqueeze(0))  # B_ij = -P_ij / P_jj
    b.diagonal().zero_()
    return b


@register_teacher
class EASE(Teacher):
    """EASE teacher: a dense item-item weight matrix ``B`` [C, C] (a buffer, not trained by gradient)."""

    kind = "ease"
    score_semantics = "similarity"  # a linear reconstruction, not a softmax logit: a KD softmax needs a temperature

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None, l2: float = 500.0,
                 recent: int | None = None):
        super().__init__(num_items, item_fingerprint, name)
        self.l2 = float(l2)
        if recent is not None and (isinstance(recent, bool) or not isinstance(recent, int) or recent < 1):
            raise TeacherError(f"EASE recent must be a positive int (the most recent positions read) or None, got {recent!r}")
        self.recent = recent
        # uninitialised until fit() or load_teacher() fills it: at C = 24k a zero-fill alone would write
        # 2.2 GB that is overwritten at once
        self.register_buffer("B", torch.empty(num_items, num_items))

    def config(self) -> dict:
        return {"l2": self.l2, "recent": self.recent}

    @property
    def max_len(self) -> int | None:
        return self.recent

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, C] = sum of B's rows over the distinct items of each history (its last ``recent``
        positions when set; histories are left-padded, the most recent item last)."""
        history = history.to(torch.int64)
        if self.recent is not None:
            history = history[:, -self.recent:]
        # a repeated item counts once (X is binary): keep only its first occurrence in sorted order
        sorted_hist, _ = torch.sort(history, dim=1)
        dup = torch.zeros_like(sorted_hist, dtype=torch.bool)
        dup[:, 1:] = sorted_hist[:, 1:] == sorted_hist[:, :-1]
        weights = ((sorted_hist != PAD_ID) & ~dup).to(self.B.dtype)
        return F.embedding_bag(sorted_hist.clamp(min=0), self.B, per_sample_weights=weights, mode="sum")

    def additive_rows(self) -> torch.Tensor:
        """``score(h)`` is the sum of these rows over h's distinct items: the exporter scores a user's
        consecutive prefixes incrementally (``teachers.export.score_topk``). Not with ``recent``: a window
        that slides drops items too (the exporter then scores each example's last ``recent`` items)."""
        if self.recent is not None:
            raise TeacherError(f"{self.name}: EASE with recent={self.recent} is not additive over whole prefixes")
        return self.B

    @classmethod
    def fit(cls, split: LeaveOneOutSplit, l2: float = 500.0, name: str | None = None,
            gram: list[torch.Tensor] | torch.Tensor | None = None, recent: int | None = None) -> "EASE":
        """Closed-form EASE on the training split, one block per ``item_blocks(split)``; ``gram``: the blocks'
        precomputed ``gram_matrix`` (a list in block order, or the one matrix of a single-block dataset)."""
        t0 = time.perf_counter()
        blocks = item_blocks(split)
        grams = [gram] if isinstance(gram, torch.Tensor) else gram
        if grams is not None and len(grams) != len(blocks):
            raise TeacherError(f"EASE.fit: {len(grams)} Gram block(s) for the {len(blocks)} item block(s) of {split.data.name}")
        teacher = cls(split.data.num_items, split.data.fingerprint, name, l2=l2, recent=recent)
        if len(blocks) == 1:
            teacher.B = ease_weights(grams[0] if grams else gram_matrix(split), l2)  # no C x C copy
        else:
            b = torch.zeros(split.data.num_items, split.data.num_items)  # zero across domains
            for i, (lo, hi) in enumerate(blocks):
                b[lo:hi, lo:hi] = ease_weights(grams[i] if grams else gram_matrix(split, (lo, hi)), l2)
            teacher.B = b
        teacher.info.update({"l2": float(l2), "fit_seconds": time.perf_counter() - t0, "item_blocks": len(blocks)})
        return teacher

    @classmethod
    def fit_select(cls, split: LeaveOneOutSplit, grid: Sequence[float] = DEFAULT_L2_GRID,
                   evaluate_fn: Callable[["EASE"], float] | None = None, name: str | None = None,
                   recent: int | None = None) -> "EASE":
        """Fit one EASE per ``l2`` in ``grid`` and keep the best by ``evaluate_fn`` (default: full-ranking
        validation NDCG@10). The Gram matrix is computed once. ``info['l2_grid']`` records every score."""
        if not grid:
            raise TeacherError("EASE.fit_select: the l2 grid is empty")
        if evaluate_fn is None:
            from prmkd_dist.train.evaluate import evaluate

            def evaluate_fn(t: EASE) -> float:
                return evaluate(t, split, "valid", ks=(10,), max_len=eval_history_len(t, split), progress=False)["NDCG@10"]

        t0 = time.perf_counter()
        gram = [gram_matrix(split, block) for block in item_blocks(split)]
        best, best_score, scores = None, -np.inf, {}
        for l2 in grid:
            teacher = cls.fit(split, l2, name, gram=gram, recent=recent)
            scores[str(float(l2))] = s = float(evaluate_fn(teacher))
            if s > best_score:
                best, best_score = teacher, s
            else:
                del teacher  # two C x C matrices at most
        best.info.update({"l2_grid": scores, "valid_NDCG@10": best_score, "fit_seconds": time.perf_counter() - t0})
        return best

