"""A linear item-transition model as a teacher: SLIT, the transition part of SLIST (Choi et al., "Session-aware
Linear Item-Item Models for Session-based Recommendation", WWW 2021), on the leave-one-out training split.

EASE reads a history as a set; on amazon-games, where order matters, it stays 23 % below the sequential student
(benchmarks/RESULTS.md, teachers). SLIT is a closed form of the same family that learns which items FOLLOW which:
every training position t of a user's prefix gives one regression example,
    source row s_t = sum over the ``window`` items before t of  w(d) * onehot(item_{t-d}),  w(d) = exp(-(d-1)/decay)
    target row   y_t = onehot(item_t),
and the item-item weights are the ridge solution
    B = (S^T S + l2 I)^-1 S^T Y        ([C, C]; no zero-diagonal constraint: repeats may be predicted).
A history is scored like a source row: x(h) @ B with x(h) the decayed one-hot of its last ``window`` items
(the most recent has weight 1), so the teacher's ``max_len`` is ``window``. Seen items are still excluded from
the candidates by the evaluation and the exporter, as for every teacher.

``alpha`` > 0 adds SLIST's other half, SLIS (an EASE-like reconstruction of the binary user-item matrix X), and fits
both jointly:  min_B  alpha ||X - X B||^2 + (1 - alpha) ||Y - S B||^2 + l2 ||B||^2  with diag(B) = 0, i.e.
    P = (alpha X^T X + (1 - alpha) S^T S + l2 I)^-1,  B0 = P (alpha X^T X + (1 - alpha) S^T Y),
    B = B0 - P diag(mu),  mu_j = (B0)_jj / P_jj
(the constraint keeps the SLIS half from learning B = I; alpha = 0 is plain SLIT, unconstrained). Scoring is the
same decayed window. The same cost: one Gram matrix, one inverse.

Cost: one C x C Gram matrix and its Cholesky inverse, as EASE (amazon-games: 2.2 GB each, minutes on a 2-core
CPU); S^T Y is sparse (at most window x positions entries) and is multiplied into P on the sparse side.
A multi-domain dataset is fitted per domain block, as EASE (no example crosses domains).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.teachers.base import Teacher, TeacherError, register_teacher
from prmkd_dist.teachers.ease import item_blocks, user_item_matrix


def _check_hparams(window, decay) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise TeacherError(f"transition: window must be a positive int (the previous items a position reads), got {window!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not np.isfinite(decay) or decay <= 0:
        raise TeacherError(f"transition: decay must be a finite number > 0 (the positions over which a weight falls by e), got {decay!r}")


# above this fraction of nonzeros the right-hand side is multiplied into P as a dense matrix (see transition_weights:
# a sparse product costs nnz * C on one thread, a dense one 2 C^3 on all)
DENSE_RHS_DENSITY = 0.05


def _check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
        raise TeacherError(f"transition: alpha must be a number in [0, 1) (the weight of the SLIS half; 0 = SLIT), got {alpha!r}")


def lag_weights(window: int, decay: float) -> np.ndarray:
    """[window] float32: weight of the item d = 1..window positions back (1 for the previous item)."""
    return np.exp(-np.arange(window, dtype=np.float64) / float(decay)).astype(np.float32)


def transition_matrices(split: LeaveOneOutSplit, window: int, decay: float, items: tuple[int, int] | None = None):
    """(S, Y): scipy CSR [n, hi - lo] of every training position with at least one earlier item in its user's
    prefix (module doc), over the items [lo, hi) of ``items`` (default: the catalog). Built lag by lag, without a
    per-user loop: position p of user u reads p - d for d = 1..window while p - d >= u's first position."""
    from scipy import sparse

    lo, hi = items if items is not None else (0, split.data.num_items)
    off, seq = split.train_offsets, split.train_items
    starts = np.repeat(off[:-1], np.diff(off))  # the first position of each position's user
    pos = np.flatnonzero((np.arange(len(seq)) > starts) & (seq >= lo) & (seq < hi))  # targets with a past
    n = len(pos)
    w = lag_weights(window, decay)
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        has = pos - d >= starts[pos]
        rows.append(np.flatnonzero(has))
        cols.append(seq[pos[has] - d] - lo)
        vals.append(np.full(int(has.sum()), w[d - 1], np.float32))
    s = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, hi - lo))
    s.sum_duplicates()  # an item seen twice in the window adds its weights, as score() sums its positions
    y = sparse.csr_matrix((np.ones(n, np.float32), (np.arange(n), seq[pos] - lo)), shape=(n, hi - lo))
    return s, y


def fit_matrices(split: LeaveOneOutSplit, window: int, decay: float, alpha: float = 0.0,
                 items: tuple[int, int] | None = None) -> tuple:
    """The matrices ``transition_weights`` fits one item block on: (S, Y, X), X None when alpha = 0."""
    s, y = transition_matrices(split, window, decay, items)
    return s, y, (user_item_matrix(split, items) if alpha > 0 else None)


def transition_weights(s, y, x, l2: float, alpha: float = 0.0) -> torch.Tensor:
    """float32 [C, C] row-major. alpha = 0 (SLIT): B = (S^T S + l2 I)^-1 S^T Y. alpha > 0 (SLIST): the ridge fit of
    alpha ||X - X B||^2 + (1 - alpha) ||Y - S B||^2 + l2 ||B||^2 with diag(B) = 0, X the binary user-item matrix
    (module doc)."""
    if l2 <= 0:
        raise TeacherError(f"transition: l2 must be > 0 (it makes S^T S + l2 I invertible), got {l2}")
    _check_alpha(alpha)
    if alpha > 0 and x is None:
        raise TeacherError("transition: alpha > 0 needs the user-item matrix x (the SLIS half)")
    xtx = alpha * (x.T @ x) if alpha > 0 else None  # in both the Gram matrix and the right-hand side
    gram = (s.T @ s) if alpha == 0 else (1 - alpha) * (s.T @ s) + xtx
    g = torch.from_numpy(np.ascontiguousarray(gram.toarray(), dtype=np.float32))
    del gram
    g.diagonal().add_(l2)
    p = torch.cholesky_inverse(torch.linalg.cholesky(g))
    del g
    if not p.is_contiguous():  # LAPACK's column-major inverse; P is symmetric, so its transpose is the row-major view
        p = p.mT
    # B^T = R^T P (P symmetric), R = the right-hand side, then one transposing copy into row-major (scoring gathers
    # rows of B). A sparse R is multiplied on the sparse side (scipy CSR, one thread; torch's sparse mm was >10x
    # slower here); a dense-ish one (SLIST's X^T X on ml-latest-small: 28 % of C^2) as a dense GEMM on every thread.
    rhs_t = ((y.T @ s) if alpha == 0 else (1 - alpha) * (y.T @ s) + xtx).tocsr()
    del xtx
    if rhs_t.nnz > DENSE_RHS_DENSITY * rhs_t.shape[0] * rhs_t.shape[1]:
        bt = torch.from_numpy(np.ascontiguousarray(rhs_t.toarray(), dtype=np.float32)) @ p
    else:
        bt = torch.from_numpy(np.asarray(rhs_t @ p.numpy(), dtype=np.float32))
    del rhs_t
    if alpha > 0:
        # diag(B) = 0 by a Lagrange multiplier per item, as EASE: B = B0 - P diag(mu), mu_j = B0_jj / P_jj. Without
        # it the SLIS half is fitted best by B = I (every item predicts itself). Row j of B^T loses mu_j P_j.
        mu = bt.diagonal() / p.diagonal()
        for lo in range(0, bt.shape[0], 1024):  # row blocks: no second C x C temporary
            bt[lo:lo + 1024].sub_(p[lo:lo + 1024] * mu[lo:lo + 1024, None])
        bt.diagonal().zero_()  # exact zeros (the subtraction leaves rounding residue)
    del p
    return bt.T.contiguous()


@register_teacher
class ItemTransition(Teacher):
    """SLIT teacher: a dense item -> next-item weight matrix ``B`` [C, C] read through a decayed recent window."""

    kind = "transition"
    score_semantics = "similarity"  # a ridge regression output, not a softmax logit

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None, l2: float = 100.0,
                 window: int = 10, decay: float = 2.0, alpha: float = 0.0):
        super().__init__(num_items, item_fingerprint, name)
        _check_hparams(window, decay)
        _check_alpha(alpha)
        self.l2, self.window, self.decay, self.alpha = float(l2), int(window), float(decay), float(alpha)
        self.register_buffer("B", torch.empty(num_items, num_items))  # filled by fit() or load_teacher()
        # the most recent position (the right end of a left-padded history) has weight 1
        self.register_buffer("lag", torch.from_numpy(lag_weights(self.window, self.decay).copy()).flip(0), persistent=False)

    def config(self) -> dict:
        return {"l2": self.l2, "window": self.window, "decay": self.decay, "alpha": self.alpha}

    @property
    def max_len(self) -> int:
        return self.window

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, C]: the decayed sum of B's rows over the last ``window`` positions (padding weighs 0)."""
        history = history.to(torch.int64)[:, -self.window:]
        lag = self.lag[-history.shape[1]:].to(self.B.dtype)
        weights = torch.where(history == PAD_ID, torch.zeros((), dtype=lag.dtype), lag.expand_as(history))
        return F.embedding_bag(history.clamp(min=0), self.B, per_sample_weights=weights.contiguous(), mode="sum")

    @classmethod
    def fit(cls, split: LeaveOneOutSplit, l2: float = 100.0, window: int = 10, decay: float = 2.0,
            name: str | None = None, matrices: list | None = None, alpha: float = 0.0) -> "ItemTransition":
        """Closed-form fit on the training split, one block per ``item_blocks(split)``; ``matrices``: the blocks'
        precomputed ``fit_matrices`` (same window, decay and alpha), e.g. from ``fit_select``."""
        t0 = time.perf_counter()
        _check_hparams(window, decay)
        _check_alpha(alpha)
        blocks = item_blocks(split)
        if matrices is not None and len(matrices) != len(blocks):
            raise TeacherError(f"transition.fit: {len(matrices)} block(s) of matrices for the {len(blocks)} item block(s)")
        teacher = cls(split.data.num_items, split.data.fingerprint, name, l2=l2, window=window, decay=decay, alpha=alpha)
        mats = matrices or [None] * len(blocks)
        if len(blocks) == 1:
            teacher.B = transition_weights(*(mats[0] or fit_matrices(split, window, decay, alpha)), l2, alpha)
        else:
            b = torch.zeros(split.data.num_items, split.data.num_items)  # zero across domains
            for (lo, hi), m in zip(blocks, mats):
                m = m or fit_matrices(split, window, decay, alpha, (lo, hi))
                b[lo:hi, lo:hi] = transition_weights(*m, l2, alpha)
            teacher.B = b
        teacher.info.update({"l2": float(l2), "window": int(window), "decay": float(decay), "alpha": float(alpha),
                             "fit_seconds": time.perf_counter() - t0, "item_blocks": len(blocks)})
        return teacher

    @classmethod
    def fit_select(cls, split: LeaveOneOutSplit, grid: Sequence[float], window: int = 10, decay: float = 2.0,
                   evaluate_fn: Callable[["ItemTransition"], float] | None = None,
                   name: str | None = None, alpha: float = 0.0) -> "ItemTransition":
        """One fit per ``l2`` in ``grid`` (S, Y and X built once), keeping the best by ``evaluate_fn`` (default:
        full-ranking validation NDCG@10); ``info['l2_grid']`` records every score."""
        if not grid:
            raise TeacherError("transition.fit_select: the l2 grid is empty")
        if evaluate_fn is None:
            from prmkd_dist.train.evaluate import evaluate

            def evaluate_fn(t: ItemTransition) -> float:
                return evaluate(t, split, "valid", ks=(10,), max_len=t.max_len, progress=False)["NDCG@10"]

        t0 = time.perf_counter()
        mats = [fit_matrices(split, window, decay, alpha, block) for block in item_blocks(split)]
        best, best_score, scores = None, -np.inf, {}
        for l2 in grid:
            teacher = cls.fit(split, l2, window, decay, name, matrices=mats, alpha=alpha)
            scores[str(float(l2))] = s = float(evaluate_fn(teacher))
            if s > best_score:
                best, best_score = teacher, s
            else:
                del teacher
        best.info.update({"l2_grid": scores, "valid_NDCG@10": best_score, "fit_seconds": time.perf_counter() - t0})
        return best
