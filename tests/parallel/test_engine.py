"""DistributedEngine with 2 real gloo processes on ml-latest-small: the autograd all-gather's gradients,
training steps with TorchRec-sharded tables + DeepSpeed (ZeRO 1 row-wise SASRec, ZeRO 2 column-wise Caser),
identical dense replicas, and the catalog-sharded evaluation / top-k against the single-process ones.
Plus the pure-Python pieces (config checks, the DeepSpeed config, the global-batch sampler)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prmkd_dist.parallel.engine import ParallelConfig, deepspeed_config
from prmkd_dist.parallel.run import GlobalBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the helper is not importable
from _launch import reports, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def engine_reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    torchrun(["engine", str(out)])
    return reports(out, "engine")


@pytest.mark.multiproc
def test_gather_rows_gradients(engine_reports):
    for rep in engine_reports:
        assert rep["gather_replicated"] < 1e-12  # slice of a replicated loss's gradient
        assert rep["gather_reduce_scatter"] < 1e-12  # summed gradients of per-rank losses


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["sasrec_row_zero1", "caser_column_zero2"])
def test_training_steps_learn_and_keep_replicas_equal(engine_reports, case):
    r0, r1 = (rep[case] for rep in engine_reports)
    assert r0["losses"] == r1["losses"]  # the global-batch loss, identical on every rank
    losses = r0["losses"]  # 8 steps over 4 batches: the second visit of each batch scores lower
    assert all(losses[i + 4] < losses[i] for i in range(4)), losses
    assert r0["dense_equal"] and r1["dense_equal"]  # DeepSpeed kept the dense replicas identical
    # each rank scores a contiguous range of the catalog; together they tile it
    (lo0, n0), (lo1, n1) = r0["range"], r1["range"]
    assert lo0 == 0 and lo1 == n0 and n0 + n1 == 9724


@pytest.mark.multiproc
def test_sharded_evaluation_equals_single_process(engine_reports):
    for rep in engine_reports:
        r = rep["sasrec_row_zero1"]
        assert r["eval_sharded"] == r["eval_single"]  # exact: same scores, ranks summed over shards
        assert r["eval_sharded"]["users"] == 610
        assert r["topk_ids_equal"] and r["topk_vals_maxdiff"] == 0.0


def test_parallel_config_problems():
    assert ParallelConfig().problems() == {}
    bad = ParallelConfig(sharding="diag", zero_stage=3, table_optimizer="lamb", tables={"item": "x"}).problems()
    assert set(bad) == {"sharding", "zero_stage", "table_optimizer", "tables"}


def test_deepspeed_config(tmp_path):
    pc = ParallelConfig(zero_stage=2)
    cfg = deepspeed_config(pc, lr=1e-3, grad_clip=1.5, micro_batch=32, device=torch.device("cpu"))
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.5
    assert cfg["gradient_allreduce_op"] == "sum" and cfg["gradient_accumulation_steps"] == 1
    with pytest.raises(ValueError, match="needs CUDA"):
        deepspeed_config(ParallelConfig(bf16=True), 1e-3, 0.0, 32, torch.device("cpu"))
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="optimizer"):
        deepspeed_config(ParallelConfig(ds_config=str(f)), 1e-3, 0.0, 32, torch.device("cpu"))
    shipped = Path(__file__).resolve().parents[2] / "launch" / "ds_zero1.json"
    assert deepspeed_config(ParallelConfig(ds_config=str(shipped)), 1e-3, 0.0, 8,
                            torch.device("cpu"))["zero_optimization"]["stage"] == 1


def test_global_batch_sampler_splits_each_global_batch():
    users = np.arange(103) * 7
    one = GlobalBatchSampler(users, 8, seed=3, rank=0, world_size=1)
    two = [GlobalBatchSampler(users, 8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert two[0].num_batches(1) == math.ceil(102 / 8)
    seen = []
    for j in range(two[0].num_batches(1)):
        a, b = (s.local_batch(1, j) for s in two)
        assert len(a) == len(b) and len(a) > 0
        assert list(np.concatenate([a, b])) == list(one.global_batch(1, j)[:len(a) + len(b)])
        seen += list(a) + list(b)
    assert len(seen) == len(set(seen)) == 102  # one user (103 % 2) left out this epoch
    assert not np.array_equal(two[0].order(1), two[0].order(2))  # a new order every epoch
    with pytest.raises(ValueError, match="multiple of the world size"):
        GlobalBatchSampler(users, 7, 0, 0, 2)
