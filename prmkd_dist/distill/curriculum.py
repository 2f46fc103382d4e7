"""Curriculum-scheduled distillation (in the spirit of PRM-KD / CKD-MDSR): easy examples first.

Each example gets a difficulty; a pacing function gives the fraction of examples trained on at each
epoch, growing from ``start`` to 1 over ``epochs`` epochs (linear, or root = fast early growth, the
competence schedule of Platanios et al. 2019). The streaming loader's order and batch count are not
touched (ranks stay in lockstep): within each batch, the rows above the batch's pacing quantile of
difficulty are masked out of the loss. Every masked row is counted (``stats``) and logged per epoch.

Difficulty kinds:
- ``disagreement``: teacher-student disagreement, sum_t w_bt * KL(p_teacher_t || q_student) over
  teacher t's top-K slots (both softmaxes restricted to those slots, temperature tau). Rows on which
  the student already agrees with its teachers are easy.
- ``length_popularity``: short histories and rare targets are hard: the mean of the row's rank (within
  the batch) by shortness of history and by rarity of the target (training-split popularity).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from prmkd_dist.constants import PAD_ID


def pacing(epoch: int, start: float, epochs: int, kind: str = "linear") -> float:
    """Fraction of each batch kept at ``epoch`` (1-based): ``start`` at epoch 1, 1 from epoch
    ``epochs + 1`` on. linear: start + (1 - start) * x; root: sqrt(start^2 + (1 - start^2) * x), with
    x = (epoch - 1) / epochs clipped to [0, 1]."""
    if not 0.0 < start <= 1.0 or epochs < 1:
        raise ValueError(f"pacing needs start in (0, 1] and epochs >= 1, got start={start}, epochs={epochs}")
    x = min(max((epoch - 1) / epochs, 0.0), 1.0)
    if kind == "linear":
        return start + (1.0 - start) * x
    if kind == "root":
        return math.sqrt(start * start + (1.0 - start * start) * x)
    raise ValueError(f"pacing kind must be 'linear' or 'root', got {kind!r}")


@torch.no_grad()
def disagreement(student_logits_at_ids: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                 teacher_weights: Tensor, temperature: float = 1.0) -> Tensor:
    """[B] sum_t w_bt KL(p_bt || q_bt) on teacher t's valid slots (0 for an empty teacher)."""
    valid = teacher_ids >= 0
    zt = (teacher_scores.float() / temperature).masked_fill(~valid, -torch.inf)
    zs = (student_logits_at_ids.float() / temperature).masked_fill(~valid, -torch.inf)
    logp = torch.log_softmax(zt, dim=-1)
    logq = torch.log_softmax(zs, dim=-1)
    kl = torch.where(valid, logp.exp() * (logp - logq), torch.zeros_like(logp)).sum(dim=-1)  # [B, T]
    return (teacher_weights.float() * kl).sum(dim=1)


def _batch_rank(x: Tensor) -> Tensor:
    """Ranks in [0, 1] within the batch (0 = smallest), ties broken by position."""
    n = x.shape[0]
    r = torch.empty(n, dtype=torch.float32, device=x.device)
    r[torch.argsort(x, stable=True)] = torch.arange(n, dtype=torch.float32, device=x.device)
    return r / max(n - 1, 1)


@torch.no_grad()
def length_popularity(history: Tensor, target: Tensor, popularity: Tensor,
                      lengths: Tensor | None = None) -> Tensor:
    """[B] in [0, 1]: mean of the rank by shortness of history and the rank by rarity of the target.
    ``lengths`` [B] (history lengths) replaces counting ``history``'s real items when given (window-packed
    rows, whose history is a prefix of a window)."""
    length = (history != PAD_ID).sum(dim=1).float() if lengths is None else lengths.float()
    pop = popularity[target.clamp(min=0)].float()
    return 0.5 * (_batch_rank(-length) + _batch_rank(-pop))


class Curriculum:
    """Per-batch masking by difficulty with a pacing schedule; counts what it masks."""

    def __init__(self, kind: str, pacing_kind: str = "linear", start: float = 0.5, epochs: int = 5,
                 popularity: np.ndarray | None = None):
        if kind not in ("disagreement", "length_popularity"):
            raise ValueError(f"curriculum kind must be 'disagreement' or 'length_popularity', got {kind!r}")
        if kind == "length_popularity" and popularity is None:
            raise ValueError("the length_popularity curriculum needs item popularity counts")
        pacing(1, start, epochs, pacing_kind)  # validates the schedule now, not at the first batch
        self.kind, self.pacing_kind, self.start, self.epochs = kind, pacing_kind, start, epochs
        self.popularity = None if popularity is None else torch.as_tensor(popularity)
        self.epoch = 1
        self.rows_seen = 0
        self.rows_masked = 0

    def fraction(self, epoch: int | None = None) -> float:
        return pacing(self.epoch if epoch is None else epoch, self.start, self.epochs, self.pacing_kind)

    def keep(self, difficulty: Tensor) -> Tensor:
        """bool [B]: the ceil(fraction * B) easiest rows of the batch (at least one), ties by position."""
        n = difficulty.shape[0]
        n_keep = max(1, math.ceil(self.fraction() * n - 1e-9)) if n else 0
        mask = torch.zeros(n, dtype=torch.bool, device=difficulty.device)
        mask[torch.argsort(difficulty.float(), stable=True)[:n_keep]] = True
        self.rows_seen += n
        self.rows_masked += n - n_keep
        return mask

    def stats(self, reset: bool = True) -> dict[str, float]:
        """{curriculum_fraction, curriculum_rows_seen, curriculum_rows_masked} of the epoch so far."""
        out = {"curriculum_fraction": self.fraction(), "curriculum_rows_seen": float(self.rows_seen),
               "curriculum_rows_masked": float(self.rows_masked)}
        if reset:
            self.rows_seen = self.rows_masked = 0
        return out
