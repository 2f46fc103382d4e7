"""Window-packed distillation (distill/packed.py) on the real ml-latest-small slice and real exported shards
of test_distill_trainer.py: the table holds each position's shard row, the packed loss equals the streaming
loss over the same rows, bad shards are refused, and training works end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prmkd_dist.data.merge import merge_teacher_shards
from prmkd_dist.distill.packed import PackingError, PositionTeacherTable, WindowDistillObjective
from prmkd_dist.distill.trainer import DistillObjective, train_distilled
from prmkd_dist.models import Popularity
from prmkd_dist.teachers.export import export_teacher_shards
from prmkd_dist.train.engine import LocalEngine
from prmkd_dist.train.trainer import build_model

from .test_distill_trainer import SUB_LEN, K, distill_cfg, random_init_ndcg, shards, small_split  # noqa: F401

GRU = {"name": "gru4rec", "hparams": {"dim": 16, "dropout": 0.0}}  # causal and padding-exact


def test_table_holds_every_positions_shard_row(small_split, shards):
    table = PositionTeacherTable.load(shards, small_split)
    assert table.teacher_names == ("itemknn", "pop") and table.k == K
    offsets = small_split.train_offsets
    assert table.num_rows == len(small_split.train_items) - int((np.diff(offsets) > 0).sum())
    firsts = offsets[:-1][np.diff(offsets) > 0]
    assert (table.ids[torch.from_numpy(firsts)] == -1).all()  # a user's first item is never a target
    seen = 0
    for f in sorted(Path(shards).glob("part-*.parquet")):
        t = pq.read_table(f).to_pydict()
        for i in range(0, len(t["example_key"]), 97):  # a sample of rows of every part
            key = t["example_key"][i]
            for j, name in enumerate(("itemknn", "pop")):
                ids, scores = t[f"teacher.{name}.ids"][i], t[f"teacher.{name}.scores"][i]
                assert table.ids[key, j, :len(ids)].tolist() == list(ids)
                assert table.scores[key, j, :len(ids)].tolist() == pytest.approx(list(scores))
            seen += 1
    assert seen > 10
    one = PositionTeacherTable.load(shards, small_split, ("pop",))
    assert torch.equal(one.ids[:, 0], table.ids[:, 1]) and torch.equal(one.scores[:, 0], table.scores[:, 1])


@pytest.mark.parametrize("lambda_rank,score_norm", [(0.0, "none"), (0.5, "none"), (0.5, "std")])
def test_packed_loss_equals_streaming_loss_over_the_same_rows(small_split, shards, tmp_path, lambda_rank,
                                                              score_norm):
    """With max_len >= every prefix, each user is one window and each position's window prefix is the shard
    row's whole history: a causal, padding-exact student gives the same rows, hence the same mean loss.
    (The packed objective prepares scores and teacher weights once for all positions; the streaming one per
    batch: this also checks that the two agree.)"""
    n_rows = len(small_split.train_items)
    cfg = distill_cfg(tmp_path, shards, model=GRU, batch_size=n_rows, distill={
        "lambda_rank": lambda_rank, "temperature": 2.0, "packing": "window", "score_norm": score_norm})
    cfg.data.max_len = SUB_LEN + 1
    torch.manual_seed(0)
    model = build_model(cfg, small_split.data.num_items).eval()
    engine = LocalEngine(model, lr=1e-3)
    packed = WindowDistillObjective(cfg, small_split, model)
    streamed = DistillObjective(cfg, small_split, model)
    (pb,), (sb,) = list(packed.batches(1)), list(streamed.batches(1))
    assert packed.rows_read == streamed.rows_read == sb["target"].shape[0]  # every example once
    got, want = packed.loss(engine, pb), streamed.loss(engine, sb)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    # the same rows' teacher weights, in another order: compare as sorted multisets
    wp, ws = packed.last["teacher_weights"], streamed.last["teacher_weights"]
    assert torch.allclose(wp.sort(dim=0).values, ws.sort(dim=0).values, atol=1e-6)


def test_windows_cover_every_position_once_per_epoch(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, model=GRU, batch_size=64, distill={"packing": "window"})
    cfg.data.max_len = 7  # several windows per user
    obj = WindowDistillObjective(cfg, small_split, build_model(cfg, small_split.data.num_items))
    keys = torch.cat([b["keys"][b["targets"] >= 0] for b in obj.batches(1)])
    assert len(keys) == len(set(keys.tolist())) == obj.table.num_rows == obj.rows_read
    # another epoch: another order, the same targets
    t1 = torch.from_numpy(small_split.train_items)[keys].sort().values
    t2 = torch.cat([b["targets"][b["targets"] >= 0] for b in obj.batches(2)]).sort().values
    assert torch.equal(t1, t2)


def test_packed_training_beats_random_init(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, distill={"lambda_rank": 0.5, "packing": "window"}, batch_size=32)
    rand = random_init_ndcg(cfg, small_split)
    res = train_distilled(cfg, small_split)
    assert res.valid["NDCG@10"] > 3 * rand + 0.004
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[0]["rows_read"] == PositionTeacherTable.load(shards, small_split).num_rows


def test_shards_that_do_not_index_the_split_are_refused(small_split, tmp_path):
    # the same teacher exported on a split whose users lost their oldest items: its keys are other positions
    from .test_distill_trainer import ml_slice
    from prmkd_dist.data.dataset import LeaveOneOutSplit

    shorter = LeaveOneOutSplit.of(ml_slice(small_split.data, last=SUB_LEN - 3))
    shorter.data.fingerprint = small_split.data.fingerprint  # same catalog: only the keys can tell
    export_teacher_shards(Popularity.fit(shorter), shorter, tmp_path / "pop", name="pop", k=5, max_history=50,
                          progress=False, embeddings=False)
    merge_teacher_shards([str(tmp_path / "pop")], str(tmp_path / "merged"))
    with pytest.raises(PackingError, match=r"example_key \d+ .*does not match|training positions have no shard row"):
        PositionTeacherTable.load(str(tmp_path / "merged"), small_split)


def test_standardised_scores_have_unit_spread_and_keep_the_order():
    from prmkd_dist.distill.trainer import standardise_scores

    ids = torch.tensor([[[3, 1, 4, -1], [2, -1, -1, -1]], [[5, 6, 7, 8], [-1, -1, -1, -1]]])
    scores = torch.tensor([[[0.9, 0.5, 0.1, 0.0], [7.0, 0.0, 0.0, 0.0]], [[40.0, 20.0, 0.0, -20.0], [0, 0, 0, 0.0]]],
                          dtype=torch.float64)
    z = standardise_scores(ids, scores)
    row = scores[0, 0, :3]
    assert torch.allclose(z[0, 0, :3], row / row.std(unbiased=False))
    assert torch.allclose(z[1, 0], scores[1, 0] / scores[1, 0].std(unbiased=False))
    assert z[0, 1, 0] == 7.0 and (z[0, 0, 3] == 0) and (z[1, 1] == 0).all()  # one slot / empty: unchanged
    assert torch.equal(z[0, 0, :3].argsort(), row.argsort())
    assert z.dtype == torch.float64


def test_score_norm_reaches_the_loss(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, model=GRU, batch_size=64,
                      distill={"packing": "window", "score_norm": "std", "strategy": "confidence"})
    model = build_model(cfg, small_split.data.num_items)
    obj = WindowDistillObjective(cfg, small_split, model)
    obj.loss(LocalEngine(model, lr=1e-3), next(iter(obj.batches(1))))
    valid = obj.last["teacher_ids"] >= 0
    full = valid.sum(-1) >= 2
    s = torch.where(valid, obj.last["teacher_scores"], torch.nan)[full]
    spread = (s - s.nanmean(-1, keepdim=True)).pow(2).nanmean(-1).sqrt()
    assert torch.allclose(spread[spread > 0], torch.ones_like(spread[spread > 0]), atol=1e-4)
