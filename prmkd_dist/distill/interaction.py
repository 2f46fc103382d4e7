"""Objectives of the data-bound students (DeepFM, DCN-v2, LightGCN), with or without distillation.

Examples are training positions: (user u, position p >= 1 of u's training prefix), input = the ``max_len``
items before p plus the user id, target = the item at p. ``data.windows`` selects the positions exactly as
for the sequential students (``last``: those of each user's most recent window; ``all``: every training
interaction). The teachers' lists of a position come from ``PositionTeacherTable`` (``distill/packed.py``,
keyed ``train_offsets[u] + p`` like the exporter), so the distilled and the plain student see the same
examples in the same order; ``distill.lambda_kd = 0`` on the same shards is the no-distillation baseline.

- **LightGCN** (``GraphObjective``): its scores are ``user_emb @ items.T`` over the propagated tables, so each
  batch is ``DistillLoss.rows_loss`` (teacher weights, curriculum, ranking importances) through
  ``engine.linear_loss`` = ``kd_loss_linear`` over the whole catalog (or its catalog-parallel form when the
  tables are sharded); CE only without shards. One propagation per step (``model.propagation()``).
- **DeepFM / DCN-v2** (``CandidateObjective``, listwise): a pairwise model cannot score the whole catalog per
  training step, so each row's candidate set is the target, every teacher's top-K and ``optim.num_negatives``
  uniform negatives; duplicates are scored once (a repeated id keeps its first column; the others get a logit
  of ``DUPLICATE_LOGIT``, i.e. probability 0) and teacher slots point to their item's column. The loss is the
  project's ``kd_loss`` over that candidate set: sampled-softmax CE on the target plus the teachers' soft
  labels (their softmax over their top-K) against the student's softmax, weighted per row and teacher by
  ``teacher_weights`` (the same strategies), with ``distill.temperature``, ``lambda_ce``, ``lambda_kd``.

Distributed (``parallel/run.py``): each rank computes its share of the global batch. The LightGCN loss is
already the global-batch loss (``engine.linear_loss`` gathers the rows); the candidate loss is the rank's
rows' mean divided by the world size, so the SUM of the ranks' gradients (DeepSpeed's
``gradient_allreduce_op: sum`` and TorchRec's undivided lookup gradients) is the global-batch mean's.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit, left_pad
from prmkd_dist.distill.loss import kd_loss
from prmkd_dist.distill.weights import teacher_weights
from prmkd_dist.train.config import ConfigError, TrainConfig
from prmkd_dist.train.engine import Engine, no_teachers
from prmkd_dist.train.trainer import training_examples

DUPLICATE_LOGIT = -1e9  # a repeated candidate's extra columns: exp() underflows to exactly 0 in float32


def position_examples(split: LeaveOneOutSplit, max_len: int, windows: str = "all") -> np.ndarray:
    """[N, 2] int64 rows (user, p): the targets of the windows of ``training_examples`` (a window ending at
    ``end`` predicts positions max(1, end - max_len) .. end - 1)."""
    rows = training_examples(split, max_len, windows)
    starts = np.maximum(1, rows[:, 1] - max_len)
    counts = rows[:, 1] - starts
    total = int(counts.sum())
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([np.repeat(rows[:, 0], counts), np.repeat(starts, counts) + within], axis=1).astype(np.int64)


def position_batch(split: LeaveOneOutSplit, rows: np.ndarray, max_len: int) -> dict[str, Tensor]:
    """history [B, max_len] (left-padded), users, targets, keys (= train_offsets[u] + p) of example rows."""
    users, pos = rows[:, 0], rows[:, 1]
    keys = split.train_offsets[users] + pos
    seqs = [split.train_items[k - min(p, max_len):k] for k, p in zip(keys, pos)]
    return {"history": torch.from_numpy(left_pad(seqs, max_len)), "users": torch.from_numpy(users.copy()),
            "target": torch.from_numpy(split.train_items[keys]), "keys": torch.from_numpy(keys),
            "positions": torch.from_numpy(pos.copy())}


def dedupe_columns(cand: Tensor) -> Tensor:
    """[B, M] column of each candidate's first occurrence in its row (the identity where ids are distinct)."""
    sorted_ids, perm = cand.sort(dim=1, stable=True)
    j = torch.arange(cand.shape[1], device=cand.device).expand_as(cand)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    start = torch.where(new, j, torch.zeros_like(j)).cummax(dim=1).values  # index (in sorted order) of the group start
    first = perm.gather(1, start)  # stable sort: the group's smallest original column
    return torch.empty_like(perm).scatter_(1, perm, first)


class _PositionObjective:
    """Shared part: examples, batches (single process: one shuffled pass per epoch), teacher lists."""

    def __init__(self, cfg: TrainConfig, split: LeaveOneOutSplit, model, rank: int = 0, world_size: int = 1):
        self.cfg, self.d, self.split, self.model = cfg, cfg.distill, split, model
        self.device = torch.device(cfg.run.device)
        self.max_len, self.batch_size = cfg.data.max_len, cfg.optim.batch_size
        self.rank, self.world_size = rank, world_size
        self.examples = position_examples(split, self.max_len, cfg.data.windows)
        if len(self.examples) == 0:
            raise ValueError(f"{split.data.name}: no user has >= 2 training items; nothing to train on")
        self.rng = np.random.default_rng(cfg.run.seed)
        self.table = None
        self.teacher_names = self.selected = ()
        if self.d.enabled:
            from prmkd_dist.distill.packed import PositionTeacherTable

            self.table = PositionTeacherTable.load(self.d.shards, split, self.d.teachers)
            self.teacher_names = self.selected = self.table.teacher_names
        self.rows_read = 0
        self.last: dict = {}

    def num_batches(self) -> int:
        n = -(-len(self.examples) // self.batch_size)
        cap = self.d.max_batches_per_epoch if self.d.enabled else 0
        return min(n, cap) if cap else n

    def state_dict(self) -> dict:
        """What a resumed run needs to draw the next epochs' order as an uninterrupted one would (trainer, "Resume")."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def batch(self, rows: np.ndarray) -> dict[str, Tensor]:
        return position_batch(self.split, rows, self.max_len)

    def batches(self, epoch: int):
        order = self.examples[self.rng.permutation(len(self.examples))]
        self.rows_read = 0
        for j in range(self.num_batches()):
            rows = order[j * self.batch_size:(j + 1) * self.batch_size]
            self.rows_read += len(rows)
            yield self.batch(rows)

    def teachers_of(self, keys: Tensor, n: int) -> tuple[Tensor, Tensor]:
        if self.table is None:
            ids, scores, _ = no_teachers(n, self.device)
            return ids, scores
        return self.table.ids[keys].to(self.device, torch.long), self.table.scores[keys].to(self.device)

    def epoch_stats(self) -> dict[str, float]:
        return {"rows_read": float(self.rows_read)}

    def checkpoint_model(self, model):
        return model


class GraphObjective(_PositionObjective):
    """LightGCN: ``DistillLoss.rows_loss`` / CE over the catalog on the propagated tables (module doc)."""

    def __init__(self, cfg, split, model, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, split, model, rank, world_size)
        self.distill = None
        if self.d.enabled:
            from prmkd_dist.distill.trainer import DistillLoss

            self.distill = DistillLoss(cfg, split, model)
            self.distill.k = self.table.k
            self.distill.selected = self.selected  # teacher_scale's names

    def loss(self, engine: Engine, batch: dict) -> Tensor:
        model = engine.model
        users, target = batch["users"].to(self.device), batch["target"].to(self.device)
        with model.propagation():
            user = model.user_embedding(None, users)
            if self.distill is None:
                return engine.linear_loss(user, target, *no_teachers(user.shape[0], self.device))
            ids, scores = self.teachers_of(batch["keys"], user.shape[0])
            loss = self.distill.rows_loss(engine, user, target, ids, scores, None,
                                          batch["positions"].to(self.device))
            self.last = self.distill.last
            return loss

    def epoch_stats(self) -> dict[str, float]:
        out = super().epoch_stats()
        if self.distill is not None:
            self.distill.rows_read = self.rows_read
            out.update(self.distill.epoch_stats())
        return out


class CandidateObjective(_PositionObjective):
    """DeepFM / DCN-v2: listwise ``kd_loss`` over target + teachers' top-K + sampled negatives (module doc)."""

    def __init__(self, cfg, split, model, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, split, model, rank, world_size)
        self.num_negatives = cfg.optim.num_negatives
        self.gen = torch.Generator().manual_seed(int(cfg.run.seed) * 1000003 + rank)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "negatives": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gen.set_state(state["negatives"])

    def candidates(self, target: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(candidate ids [B, M], first-occurrence columns [B, M], teacher columns [B, T, K])."""
        b, t, k = ids.shape
        neg = torch.randint(0, self.split.data.num_items, (b, self.num_negatives), generator=self.gen).to(self.device)
        slots = torch.where(ids >= 0, ids, target[:, None, None]).reshape(b, t * k)  # empty slot -> the target
        cand = torch.cat([target[:, None], slots, neg], dim=1)
        first = dedupe_columns(cand)
        tcols = torch.where(ids >= 0, first[:, 1:1 + t * k].reshape(b, t, k), torch.full_like(ids, PAD_ID))
        return cand, first, tcols

    def loss(self, engine: Engine, batch: dict) -> Tensor:
        hist, users = batch["history"].to(self.device), batch["users"].to(self.device)
        target = batch["target"].to(self.device)
        ids, scores = self.teachers_of(batch["keys"], target.shape[0])
        cand, first, tcols = self.candidates(target, ids)
        logits = engine.model.score_items(hist, users, cand)
        dup = first != torch.arange(cand.shape[1], device=self.device)
        logits = logits.masked_fill(dup, DUPLICATE_LOGIT)
        d = self.d
        if self.table is None:
            w = scores.new_zeros(target.shape[0], 0)
            lam_ce, lam_kd, tau = 1.0, 0.0, 1.0
        else:
            from prmkd_dist.distill.trainer import scaled_teacher_weights, standardise_scores

            if d.score_norm == "std":
                scores = standardise_scores(ids, scores)
            w = teacher_weights(ids, scores, target, strategy=d.strategy, alpha=d.alpha, gamma=d.gamma)
            w = scaled_teacher_weights(w, self.selected, d.teacher_scale)
            lam_ce, lam_kd, tau = d.lambda_ce, d.lambda_kd, d.temperature
        self.last = {"teacher_weights": w, "candidates": cand, "teacher_columns": tcols, "logits": logits.detach()}
        loss = kd_loss(logits, torch.zeros_like(target), tcols, scores, w, None, temperature=tau,
                       lambda_ce=lam_ce, lambda_kd=lam_kd, lambda_rank=0.0)
        return loss / self.world_size  # module doc: summed over ranks = the global-batch mean


def _unsupported(cfg: TrainConfig, name: str, kind: str) -> None:
    d = cfg.distill
    bad = []
    if d.embedding.enabled:
        bad.append("distill.embedding.enabled")
    if d.mkd.nkd or d.mkd.cpd > 0 or d.mkd.sld > 0:
        bad.append("distill.mkd")
    if kind == "candidates":
        if d.lambda_rank > 0:
            bad.append("distill.lambda_rank")
        if d.curriculum.kind != "none":
            bad.append("distill.curriculum")
    if bad:
        raise ConfigError(f"{bad[0]}: not supported for the {name!r} student (its objective: "
                          f"prmkd_dist/distill/interaction.py)")


def student_objective(cfg: TrainConfig, split: LeaveOneOutSplit, model, rank: int = 0, world_size: int = 1):
    """The objective of a data-bound student: ``GraphObjective`` for a computed catalog table (LightGCN),
    ``CandidateObjective`` for a pairwise scorer (DeepFM, DCN-v2)."""
    kind = getattr(model, "catalog_output", None)
    name = getattr(model, "registry_name", type(model).__name__)
    if kind == "computed":
        _unsupported(cfg, name, "graph")
        return GraphObjective(cfg, split, model, rank, world_size)
    if kind == "none":
        _unsupported(cfg, name, "candidates")
        return CandidateObjective(cfg, split, model, rank, world_size)
    raise ValueError(f"{name}: not a data-bound student (no objective here; sequential students use "
                     f"train.trainer.NextItemObjective or the distillation objectives)")


__all__ = ["position_examples", "position_batch", "dedupe_columns", "GraphObjective", "CandidateObjective",
           "student_objective", "DUPLICATE_LOGIT"]
