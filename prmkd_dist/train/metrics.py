"""Ranking metrics from scores and targets (pure torch, batched).

The rank of a target is the number of OTHER candidates whose score is >= the target's score
(0 = ranked first). Ties count against the target: otherwise a constant model (all scores equal)
would rank every target first and look perfect, and a model could gain by collapsing scores.
"""
from __future__ import annotations

import math

import torch

METRIC_NAMES = ("HR", "NDCG")


def target_rank(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, C] scores, [B] target columns -> [B] int64 ranks (ties against the target, see module doc).

    Columns scored -inf (excluded items) never outrank a finite target. A NaN target score raises."""
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [B, C] and targets [B]; got {tuple(scores.shape)} and {tuple(targets.shape)}")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"targets must be column ids in 0..{scores.shape[1] - 1}; got min {int(targets.min())}, max {int(targets.max())}")
    t = scores.gather(1, targets.long().unsqueeze(1))
    if torch.isnan(t).any():
        raise ValueError("a target has a NaN score")
    return (scores >= t).sum(dim=1) - 1  # the target itself is always >= itself


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = (10, 20)) -> dict[str, torch.Tensor]:
    """Per-row metrics: HR@k = [rank < k], NDCG@k = [rank < k] / log2(rank + 2), MRR = 1 / (rank + 1)."""
    r = ranks.double()
    out = {}
    for k in ks:
        if k <= 0:
            raise ValueError(f"cutoffs must be > 0, got {k}")
        hit = (ranks < k).double()
        out[f"HR@{k}"] = hit
        out[f"NDCG@{k}"] = hit / torch.log2(r + 2.0)
    out["MRR"] = 1.0 / (r + 1.0)
    return out


class MetricAccumulator:
    """Sums per-row metrics over batches; ``result()`` gives the means (plus ``users``)."""

    def __init__(self, ks: tuple[int, ...] = (10, 20)):
        self.ks = tuple(ks)
        self.sums: dict[str, float] = {}
        self.count = 0

    def add_ranks(self, ranks: torch.Tensor) -> None:
        for name, v in metrics_from_ranks(ranks, self.ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v.sum())
        self.count += len(ranks)

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {**{k: math.nan for k in self.sums}, "users": 0}
        out = {k: v / self.count for k, v in self.sums.items()}
        out["users"] = self.count
        return out


def ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    """Mean HR@k, NDCG@k and MRR of one batch of scores/targets."""
    acc = MetricAccumulator(ks)
    acc.add_ranks(target_rank(scores, targets))
    return acc.result()
