"""Evaluation of any scorer (``.score(history[B, L]) -> [B, C]``) on a leave-one-out split.

Full ranking (``evaluate``): the target is ranked against the whole catalog. With
``exclude_history`` the items the user interacted with before the target (the whole known history,
not only the ``max_len`` the model sees) get -inf, EXCEPT the target itself: users do re-consume
items (MovieLens re-ratings, Games re-purchases), and excluding a repeated target would make it
unrankable and silently count as a miss for every model.

Sampled protocol (``evaluate_sampled``, SASRec paper, Kang & McAuley 2018): the target is ranked
among ``num_negatives`` distinct items drawn uniformly from the items the user never interacted with
(whole sequence, future included), deterministic by seed. Its numbers are much higher than full
ranking and are reported only for comparison with the literature.

Ties count against the target in both (see ``metrics``).

Multi-domain datasets (``prmkd_dist.data.domains``): a user is ranked against its own domain's items only
(both protocols), and the results add each domain's metrics as ``"<domain>/<metric>"`` next to the overall ones
(the mean over all users).
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit, left_pad
from prmkd_dist.data.domains import restrict_to_domains, user_domain_ids
from prmkd_dist.train.metrics import MetricAccumulator, target_rank

STAGES = ("valid", "test")


class Scorer(Protocol):
    def score(self, history: torch.Tensor) -> torch.Tensor: ...


def score_batch(scorer, history: torch.Tensor, users: np.ndarray) -> torch.Tensor:
    """``scorer.score(history)``, or ``score(history, users=...)`` for scorers with ``needs_users`` (the
    data-bound students: DeepFM, DCN-v2, LightGCN)."""
    if getattr(scorer, "needs_users", False):
        return scorer.score(history, users=torch.as_tensor(users, dtype=torch.long, device=history.device))
    return scorer.score(history)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def stage_histories(split: LeaveOneOutSplit, stage: str, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets [n+1], items) of each user's full input history for ``stage`` (valid: training
    prefix; test: training prefix + validation item)."""
    _check_stage(stage)
    lens = (split.train_offsets[users + 1] - split.train_offsets[users]).astype(np.int64)
    add_valid = stage == "test"
    if add_valid:
        has_v = split.valid_target[users] != PAD_ID
        lens = lens + has_v
    offsets = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    items = np.empty(offsets[-1], dtype=np.int64)
    for i, u in enumerate(users):  # one slice copy per user: ~30 ms for 31k users
        tr = split.train_items[split.train_offsets[u]:split.train_offsets[u + 1]]
        items[offsets[i]:offsets[i] + len(tr)] = tr
        if add_valid and has_v[i]:
            items[offsets[i + 1] - 1] = split.valid_target[u]
    return offsets, items


class _ScoringContext:
    """eval() + no_grad for nn.Module scorers, restoring the training flag afterwards."""

    def __init__(self, scorer):
        self.module = scorer if isinstance(scorer, torch.nn.Module) else None

    def __enter__(self):
        self.was_training = self.module.training if self.module is not None else False
        if self.module is not None:
            self.module.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        if self.module is not None:
            self.module.train(self.was_training)


def history_batches(users: np.ndarray, offsets: np.ndarray, items: np.ndarray, batch_size: int, max_len: int):
    """(positions into ``users``, histories, [b, w] left-padded input) per batch. Users go in order of history
    length so that each batch is only as wide as its longest history (``left_pad(trim=True)``): on Games
    (median 3 items) that is a fraction of ``max_len``. The metrics are sums over users: order-free."""
    order = np.argsort(np.minimum(np.diff(offsets), max_len), kind="stable")
    for start in range(0, len(users), batch_size):
        idx = order[start:start + batch_size]
        seqs = [items[offsets[i]:offsets[i + 1]] for i in idx]
        yield idx, seqs, torch.from_numpy(left_pad(seqs, max_len, trim=True))


def _device_of(scorer) -> torch.device:
    if isinstance(scorer, torch.nn.Module):
        for p in scorer.parameters():
            return p.device
    return torch.device("cpu")


def _check_scores(scores: torch.Tensor, n: int, num_items: int) -> None:
    if scores.shape != (n, num_items):
        raise ValueError(f"scorer returned scores of shape {tuple(scores.shape)}, expected [{n}, {num_items}] (one column per item)")


def evaluate(scorer: Scorer, split: LeaveOneOutSplit, stage: str = "valid", ks: tuple[int, ...] = (10, 20),
             batch_size: int = 1024, exclude_history: bool = True, max_len: int = 200,
             progress: bool = True) -> dict[str, float]:
    """Full-ranking HR@k, NDCG@k and MRR over all users with a ``stage`` target (module doc for the
    exclusion rule). Returns ``{"HR@10": .., "NDCG@10": .., ..., "MRR": .., "users": n}``."""
    _check_stage(stage)
    users = split.eval_users(stage)
    targets_all = split.target(stage)[users]
    offsets, items = stage_histories(split, stage, users)
    num_items = split.data.num_items
    device = _device_of(scorer)
    acc = _DomainAccumulators(split, users, ks)
    bar = tqdm(total=len(users), desc=f"eval {stage}", unit="user", disable=not progress, leave=False)
    with _ScoringContext(scorer):
        for idx, seqs, hist in history_batches(users, offsets, items, batch_size, max_len):
            scores = score_batch(scorer, hist.to(device), users[idx]).float()
            _check_scores(scores, len(idx), num_items)
            scores = restrict_to_domains(scores, split.data, users[idx])
            targets = torch.from_numpy(targets_all[idx]).to(scores.device)
            if exclude_history:
                rows = torch.from_numpy(np.repeat(np.arange(len(idx)), [len(s) for s in seqs])).to(scores.device)
                cols = torch.from_numpy(np.concatenate(seqs) if seqs else np.empty(0, np.int64)).to(scores.device)
                arange = torch.arange(len(idx), device=scores.device)
                target_scores = scores[arange, targets].clone()
                scores = scores.clone()  # a scorer may return a shared/expanded tensor: never write into it
                scores[rows, cols] = -torch.inf
                scores[arange, targets] = target_scores  # a repeated target stays rankable
            acc.add_ranks(idx, target_rank(scores, targets).cpu())
            bar.update(len(idx))
    bar.close()
    return acc.result()


class _DomainAccumulators:
    """Metrics over all ``users`` and, for a multi-domain dataset, over each domain's users."""

    def __init__(self, split: LeaveOneOutSplit, users: np.ndarray, ks: tuple[int, ...]):
        self.all = MetricAccumulator(ks)
        self.domains = split.data.domains or []
        self.per = [MetricAccumulator(ks) for _ in self.domains]
        self.dom = torch.from_numpy(user_domain_ids(split.data, users).astype(np.int64))

    def add_ranks(self, idx: np.ndarray, ranks: torch.Tensor) -> None:
        self.all.add_ranks(ranks)
        if self.per:
            dom = self.dom[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
            for d, acc in enumerate(self.per):
                sel = dom == d
                if bool(sel.any()):
                    acc.add_ranks(ranks[sel])

    def result(self) -> dict[str, float]:
        out = self.all.result()
        for domain, acc in zip(self.domains, self.per):
            out.update({f"{domain.name}/{k}": v for k, v in acc.result().items()})
        return out


def sample_negatives(split: LeaveOneOutSplit, users: np.ndarray, num_negatives: int, seed: int) -> np.ndarray:
    """[n, num_negatives] distinct item ids per user, uniform over the items the user never
    interacted with (whole sequence; of the user's domain on a multi-domain dataset), deterministic by ``seed``
    (and independent of batching)."""
    data = split.data
    C = data.num_items
    lens = data.lengths()[users]
    # distinct interacted items <= lens; the check is on the exact count below
    out = np.empty((len(users), num_negatives), dtype=np.int64)
    gen = torch.Generator().manual_seed(int(seed))
    chunk = max(1, (1 << 24) // max(C, 1))  # bound the [chunk, C] random-key matrix to ~64 MB
    for start in range(0, len(users), chunk):
        us = users[start:start + chunk]
        keys = torch.rand(len(us), C, generator=gen)
        rows = np.repeat(np.arange(len(us)), lens[start:start + chunk])
        cols = np.concatenate([data.sequence(u) for u in us]) if len(us) else np.empty(0, np.int64)
        keys[torch.from_numpy(rows), torch.from_numpy(cols)] = 2.0  # above any uniform key: never drawn
        keys = restrict_to_domains(keys, data, us, fill=2.0)  # nor another domain's items
        available = (keys < 2.0).sum(dim=1)
        short = torch.nonzero(available < num_negatives)
        if len(short):
            i = int(short[0])
            raise ValueError(f"user {int(us[i])} has only {int(available[i])} non-interacted items; "
                             f"cannot sample {num_negatives} negatives")
        # the num_negatives smallest random keys = a uniform sample without replacement
        out[start:start + len(us)] = torch.topk(keys, num_negatives, dim=1, largest=False).indices.numpy()
    return out


def evaluate_sampled(scorer: Scorer, split: LeaveOneOutSplit, stage: str = "test", num_negatives: int = 100,
                     seed: int = 0, ks: tuple[int, ...] = (10,), batch_size: int = 1024, max_len: int = 200,
                     progress: bool = True) -> dict[str, float]:
    """SASRec-paper protocol: rank the target among ``num_negatives`` sampled negatives (module doc).
    Returns ``{"HR@10": .., "NDCG@10": .., "MRR": .., "users": n}`` (keys for every k in ``ks``)."""
    _check_stage(stage)
    users = split.eval_users(stage)
    targets_all = split.target(stage)[users]
    negatives = sample_negatives(split, users, num_negatives, seed)
    offsets, items = stage_histories(split, stage, users)
    device = _device_of(scorer)
    acc = _DomainAccumulators(split, users, ks)
    bar = tqdm(total=len(users), desc=f"sampled eval {stage}", unit="user", disable=not progress, leave=False)
    with _ScoringContext(scorer):
        for idx, seqs, hist in history_batches(users, offsets, items, batch_size, max_len):
            scores = score_batch(scorer, hist.to(device), users[idx]).float()
            _check_scores(scores, len(idx), split.data.num_items)
            cand = torch.from_numpy(np.concatenate([targets_all[idx, None], negatives[idx]], axis=1)).to(scores.device)
            cand_scores = scores.gather(1, cand)  # column 0 = the target
            acc.add_ranks(idx, target_rank(cand_scores, torch.zeros(len(idx), dtype=torch.long, device=scores.device)).cpu())
            bar.update(len(idx))
    bar.close()
    return acc.result()
