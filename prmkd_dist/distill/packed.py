"""Window-packed distillation for sequential students: every position of a training window is a row.

The streaming objective (``trainer.DistillObjective``) runs the student's encoder once per shard row, i.e.
once per training position, although a causal encoder produces the hidden state of every position of a
window in one pass. This objective (``distill.packing = "window"``) uses that:

- the merged shards are read once into a table indexed by example key. The built-in exporter's key is
  ``split.train_offsets[u] + p``, the global index of the target in ``split.train_items``
  (docs/shards.md, "Training examples"), so the table has one slot per training interaction;
- each epoch, the training prefixes are cut into windows of ``data.max_len`` (``training_examples`` with
  ``windows = "all"``: every training interaction is a target exactly once), shuffled by ``run.seed``;
- per batch, one encoder pass over the windows; every position with a target is a row of the same loss as
  the streaming objective (``DistillLoss.rows_loss``), with that position's teacher lists.

The loss per row is the streaming objective's, but the history a row sees is the part of its window before
it (at most ``max_len`` items), as in ordinary next-item training, rather than the shard's stored history.
Cost: about ``max_len`` times fewer encoder passes. Memory: N_train x T x K ids (int32) and scores
(float32): 80 MB for ml-latest-small with T = 2, K = 50. For data that does not fit, use the streaming
objective.

The shards must come from the same prepared dataset (num_items and fingerprint are checked by the
loader) and follow the exporter's key convention: every row's key is checked against its user and target,
and a training position without a row is refused (nothing is silently trained without its teachers).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.data.loader import ShardLoader, TeacherShardDataset
from prmkd_dist.distill.trainer import DistillLoss, select_teachers
from prmkd_dist.models.base import SequentialStudent
from prmkd_dist.train.config import TrainConfig
from prmkd_dist.train.engine import Engine
from prmkd_dist.train.trainer import training_batch, training_examples

READ_BATCH = 65536  # rows per loader batch while reading the shards into the table


PREPARE_CHUNK = 16384
"""Positions per call when the objective prepares every position's scores and teacher weights."""


class PackingError(ValueError):
    """The shards cannot be indexed by training position (wrong key convention, missing or duplicate rows)."""


class PositionTeacherTable:
    """Teacher lists of every training position: ``ids`` [N, T, K] int32 (PAD_ID = empty slot) and
    ``scores`` [N, T, K] float32, row n = the example whose target is ``split.train_items[n]``; rows of
    each user's first position (no history, never an example) stay empty."""

    def __init__(self, ids: Tensor, scores: Tensor, teacher_names: tuple[str, ...], k: int, num_rows: int):
        self.ids, self.scores, self.teacher_names, self.k, self.num_rows = ids, scores, teacher_names, k, num_rows

    @classmethod
    def load(cls, shards: str, split: LeaveOneOutSplit, teachers: tuple[str, ...] = ()) -> "PositionTeacherTable":
        ds = TeacherShardDataset(shards, READ_BATCH, max_len=1, shuffle=False, rank=0, world_size=1,
                                 num_items=split.data.num_items, item_fingerprint=split.data.fingerprint)
        loader = ShardLoader(ds)
        names = tuple(loader.teacher_names)
        sel = torch.tensor(select_teachers(names, teachers), dtype=torch.long)
        n = len(split.train_items)
        offsets = np.asarray(split.train_offsets, dtype=np.int64)
        ids = torch.full((n, len(sel), ds.k), PAD_ID, dtype=torch.int32)
        scores = torch.zeros((n, len(sel), ds.k), dtype=torch.float32)
        seen = np.zeros(n, dtype=bool)
        rows = 0
        for batch in loader:
            key = batch["example_key"].numpy()
            user = batch["user_id"].numpy()
            bad = (key < 0) | (key >= n)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise PackingError(f"{shards}: example_key {int(key[i])} (user {int(user[i])}) is not a training "
                                   f"position of {split.data.name} (expected 0..{n - 1}: window packing needs the "
                                   f"exporter's keys, train_offsets[user] + position; use distill.packing=example)")
            if (user < 0).any() or (user >= len(offsets) - 1).any():
                i = int(np.flatnonzero((user < 0) | (user >= len(offsets) - 1))[0])
                raise PackingError(f"{shards}: example_key {int(key[i])} has user_id {int(user[i])}, outside "
                                   f"0..{len(offsets) - 2}")
            wrong = (key <= offsets[user]) | (key >= offsets[user + 1]) | (
                batch["target"].numpy() != split.train_items[key])
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                raise PackingError(f"{shards}: example_key {int(key[i])} (user {int(user[i])}, target "
                                   f"{int(batch['target'][i])}) does not match {split.data.name}'s training "
                                   f"interaction {int(key[i])} (user's positions {int(offsets[user[i]]) + 1}.."
                                   f"{int(offsets[user[i] + 1]) - 1}, item {int(split.train_items[key[i]])}); "
                                   f"use distill.packing=example for shards with other keys")
            dup = seen[key] | (np.bincount(key - key.min(), minlength=1)[key - key.min()] > 1)
            if dup.any():
                raise PackingError(f"{shards}: example_key {int(key[np.flatnonzero(dup)[0]])} appears twice")
            seen[key] = True
            kt = torch.from_numpy(key)
            ids[kt] = batch["teacher_ids"][:, sel].to(torch.int32)
            scores[kt] = batch["teacher_scores"][:, sel].float()
            rows += len(key)
        first = np.zeros(n, dtype=bool)
        first[offsets[:-1][np.diff(offsets) > 0]] = True  # each user's first position: no history, no example
        missing = ~seen & ~first
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            u = int(np.searchsorted(offsets, i, side="right") - 1)
            raise PackingError(f"{shards}: {int(missing.sum())} training positions have no shard row (first: "
                               f"example_key {i}, user {u}, position {i - int(offsets[u])}); every position "
                               f"after a user's first needs its teachers' lists")
        return cls(ids, scores, tuple(names[i] for i in sel.tolist()), ds.k, rows)


class WindowDistillObjective(DistillLoss):
    """The window-packed distillation objective (module docstring); same protocol as the streaming one."""

    def __init__(self, cfg: TrainConfig, split: LeaveOneOutSplit, model: SequentialStudent,
                 teacher_emb: Tensor | None = None):
        super().__init__(cfg, split, model, teacher_emb)
        self.table = PositionTeacherTable.load(self.d.shards, split, self.d.teachers)
        self.teacher_names = self.selected = self.table.teacher_names
        self.k = self.table.k
        self.split, self.max_len, self.batch_size = split, cfg.data.max_len, cfg.optim.batch_size
        self.offsets = torch.as_tensor(np.asarray(split.train_offsets, dtype=np.int64))
        self.stride = cfg.data.window_stride or None  # overlapping windows: see train/trainer.py
        self.examples = training_examples(split, self.max_len, "all", self.stride)
        self.rng = np.random.default_rng(cfg.run.seed)
        # normalised scores and teacher weights depend on the data and the config alone: once for every
        # position here, not in every step (243 ms per step of 6.4k rows x 3 x 50 on one CPU core:
        # benchmarks/profile_catalog_loss.py)
        targets = torch.from_numpy(np.asarray(split.train_items, dtype=np.int64))
        self.weights = torch.zeros(self.table.ids.shape[:2], dtype=torch.float32)
        for lo in range(0, len(targets), PREPARE_CHUNK):
            sl = slice(lo, lo + PREPARE_CHUNK)
            self.table.scores[sl], self.weights[sl] = self.prepared_lists(
                self.table.ids[sl].to(torch.long), self.table.scores[sl], targets[sl])

    def num_batches(self) -> int:
        n = -(-len(self.examples) // self.batch_size)
        cap = self.d.max_batches_per_epoch
        return min(n, cap) if cap else n

    def state_dict(self) -> dict:
        """What a resumed run needs to draw the next epochs' order as an uninterrupted one would (trainer, "Resume")."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def batches(self, epoch: int):
        self.start_epoch(epoch)
        order = self.examples[self.rng.permutation(len(self.examples))]
        rows = 0
        for j in range(self.num_batches()):
            ex = order[j * self.batch_size:(j + 1) * self.batch_size]
            users, ends = torch.from_numpy(ex[:, 0]), torch.from_numpy(ex[:, 1])
            inputs, targets = training_batch(self.split, ex[:, 0], self.max_len, ex[:, 1], self.stride)
            # column c of a window ending at `end` predicts position end - max_len + c of the user's prefix
            pos = ends[:, None] - self.max_len + torch.arange(self.max_len)[None, :]
            keys = self.offsets[users][:, None] + pos
            rows += int((targets >= 0).sum())
            yield {"inputs": inputs, "targets": targets, "keys": keys, "positions": pos}
        self.rows_read = rows

    def loss(self, engine: Engine, batch: dict) -> Tensor:
        inputs, targets = batch["inputs"].to(self.device), batch["targets"].to(self.device)
        mask = targets >= 0
        keys = batch["keys"][mask.cpu()]
        user = engine.model.encode(inputs)[mask]
        ids = self.table.ids[keys].to(self.device, torch.long)
        scores = self.table.scores[keys].to(self.device)  # prepared in __init__
        weights = self.weights[keys].to(self.device)
        lengths = batch["positions"][mask.cpu()].to(self.device)  # a position's history length
        return self.rows_loss(engine, user, targets[mask], ids, scores, None, lengths, weights=weights)


__all__ = ["PositionTeacherTable", "WindowDistillObjective", "PackingError"]
