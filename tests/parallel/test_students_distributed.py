"""DeepFM, DCN-v2 and LightGCN under the distributed launch: 2 real gloo processes (torchrun), tables sharded
by TorchRec's planner, dense part under DeepSpeed, distilled from real shards (ItemKNN + Popularity teachers
on the real ml-latest-small slice of tests/distill/test_distill_trainer.py). One launch trains all three
(``students_worker.py``); the checks: dense replicas agree, the sharded evaluation equals the single-process
``evaluate`` of the gathered (unsharded) weights, and LightGCN's first global-batch loss equals one process's
loss on the same batch (its loss is the gathered global loss; DeepFM/DCN-v2 sample their negatives per rank)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # --import-mode=importlib: the helpers are not importable otherwise
sys.path.insert(0, str(HERE.parent / "distill"))
from _launch import ROOT, free_port  # noqa: E402
from students_worker import STUDENTS, config  # noqa: E402
from test_distill_trainer import shards, small_split  # noqa: E402,F401  (fixtures)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def launched(small_split, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("students2")
    data_dir = out / "data"
    small_split.data.save(str(data_dir))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(HERE / "students_worker.py"), str(out), str(data_dir),
           shards]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRMKD_LOG_LEVEL": "WARNING"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-8000:]}")
    return out, str(data_dir), {n: torch.load(out / f"{n}.pt", weights_only=False) for n in STUDENTS}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_sharded_student_trains_and_evaluates_like_one_process(launched, small_split, shards, name):
    from prmkd_dist.train.evaluate import evaluate
    from prmkd_dist.train.trainer import build_model

    out, data_dir, reports = launched
    r = reports[name]
    losses = torch.tensor(r["losses"])
    assert losses.shape == (2, 4) and torch.isfinite(losses).all()
    assert r["dense_equal"]  # DeepSpeed kept the replicated part identical
    cfg, _ = config(name, out, data_dir, shards)
    model = build_model(cfg, small_split.data.num_items, small_split)
    model.load_state_dict(r["state"])  # every table gathered whole: the plain student
    single = evaluate(model, small_split, "valid", ks=(10,), batch_size=64, max_len=cfg.data.max_len, progress=False)
    for k in ("HR@10", "NDCG@10", "MRR"):
        assert r["metrics"][k] == pytest.approx(single[k], abs=1e-6), (k, r["metrics"], single)
    assert r["metrics"]["users"] == single["users"]


def test_lightgcn_two_rank_loss_is_the_one_process_global_batch_loss(launched, small_split, shards):
    from prmkd_dist.distill.interaction import student_objective
    from prmkd_dist.parallel.run import GlobalBatchSampler
    from prmkd_dist.train.engine import LocalEngine
    from prmkd_dist.train.trainer import build_model
    from prmkd_dist.train.utils import seed_everything

    out, data_dir, reports = launched
    losses = torch.tensor(reports["lightgcn"]["losses"])
    assert torch.equal(losses[0], losses[1])  # the gathered global-batch loss, the same on both ranks
    cfg, _ = config("lightgcn", out, data_dir, shards)
    seed_everything(cfg.run.seed)
    model = build_model(cfg, small_split.data.num_items, small_split)
    obj = student_objective(cfg, small_split, model)
    ids = GlobalBatchSampler(np.arange(len(obj.examples)), cfg.optim.batch_size, cfg.run.seed, 0, 2).global_batch(1, 0)
    with torch.no_grad():
        one = obj.loss(LocalEngine(model, lr=cfg.optim.lr), obj.batch(obj.examples[ids]))
    assert losses[0, 0].item() == pytest.approx(one.item(), rel=1e-5)
