"""The distributed entry point on real ml-latest-small with real processes (torchrun, gloo, TorchRec
sharding, DeepSpeed ZeRO 1): 2 ranks against 1 rank on the same global batches, two "nodes" on localhost
(two torchrun agents, --nnodes 2) against one node with two processes, an interrupted run
(a rank fails, ``torchrun --max-restarts 1`` restarts the group, the run resumes from the last checkpoint)
against the uninterrupted one, and a 2-rank checkpoint resumed on 1 rank (tables resharded by DCP).

The runs use SGD for the tables and the dense part: its update is linear in the gradient, so the only
differences between world sizes are float summation orders (Adam/Adagrad turn near-zero gradients into
full-size steps and would amplify them). Tolerances are stated next to each check."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the helper is not importable
from _launch import torchrun, torchrun_nodes  # noqa: E402

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS = 6
CONFIG = {
    "data": {"dataset": "ml-latest-small", "max_len": 20},
    "model": {"name": "sasrec", "hparams": {"dim": 32, "num_layers": 1, "num_heads": 2, "dropout": 0.0}},
    "optim": {"lr": 0.5, "batch_size": 64, "epochs": 1, "grad_clip": 0.0},
    "run": {"seed": 0, "tensorboard": False, "progress": False, "num_threads": 1},
    "parallel": {"sharding": "row_wise", "zero_stage": 1, "table_optimizer": "sgd", "dense_optimizer": "sgd",
                 "table_lr": 0.5, "checkpoint_every": 3},
}
LOSS_RTOL = 1e-5  # float32 losses of ~9, different summation orders
PARAM_ATOL = 1e-5  # after 6 SGD steps


def _write_config(out: Path, parallel: dict | None = None) -> Path:
    """CONFIG (with ``parallel`` overrides) as ``out/config.yaml``, writing its outputs to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(CONFIG))
    cfg["run"]["out_dir"] = str(out)
    cfg["parallel"].update(parallel or {})
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out / "config.yaml"


def _run(out: Path, nproc: int, env_extra: dict | None = None, restarts: int = 0, parallel: dict | None = None) -> dict:
    config = _write_config(out, parallel)
    torchrun(["train", str(out), str(config)], nproc=nproc, restarts=restarts,
             env={"WORKER_MAX_STEPS": str(STEPS), **(env_extra or {})})
    return torch.load(out / "final.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("r2")
    return out, _run(out, 2)


def _max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_match_one_rank_and_train(two_rank, tmp_path):
    out2, r2 = two_rank
    r1 = _run(tmp_path / "r1", 1)
    assert len(r2["losses"]) == len(r1["losses"]) == STEPS
    assert r2["losses"][-1] < r2["losses"][0] - 0.05, r2["losses"]  # it learns
    torch.testing.assert_close(torch.tensor(r2["losses"]), torch.tensor(r1["losses"]), rtol=LOSS_RTOL, atol=0)
    assert _max_param_diff(r2["state"], r1["state"]) < PARAM_ATOL
    # every rank consumed its half of each global batch, disjoint, together the 1-rank batches
    recs = [[json.loads(x) for x in (out2 / f"examples_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    one = [json.loads(x) for x in (tmp_path / "r1" / "examples_rank0.jsonl").read_text().splitlines()]
    for s in range(STEPS):
        assert recs[0][s]["users"] + recs[1][s]["users"] == one[s]["users"]
        assert len(recs[0][s]["users"]) == len(recs[1][s]["users"]) == 32


def test_two_nodes_on_localhost_match_one_node(two_rank, tmp_path):
    """Two torchrun agents as two "nodes" (``--nnodes 2``, one process each, c10d rendezvous on 127.0.0.1): the
    same 2-rank job as one node with two processes, the same losses and weights."""
    _, r2 = two_rank
    out = tmp_path / "nodes"
    config = _write_config(out)
    torchrun_nodes(["train", str(out), str(config)], nnodes=2, nproc=1,
                   env={"WORKER_MAX_STEPS": str(STEPS)})
    rn = torch.load(out / "final.pt", weights_only=False)
    assert rn["world"] == 2
    torch.testing.assert_close(torch.tensor(rn["losses"]), torch.tensor(r2["losses"]), rtol=LOSS_RTOL, atol=0)
    assert _max_param_diff(rn["state"], r2["state"]) < PARAM_ATOL
    # each node's process consumed its own half of every global batch
    recs = [[json.loads(x) for x in (out / f"examples_rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert all(not set(recs[0][s]["users"]) & set(recs[1][s]["users"]) for s in range(STEPS))


def test_sampled_scoring_two_ranks_match_one_rank_and_the_definition(two_rank, tmp_path):
    """``parallel.scoring=sampled``: the candidates and the step's shared negatives looked up through the sharded
    table. 2 ranks equal 1 rank; the first step's loss is the sampled loss of its definition (distill/sampled.py,
    computed here in one process from the same initial model, batch and negatives); it differs from the exact
    loss of the full-scoring run, and it learns."""
    from prmkd_dist.distill.sampled import kd_loss_sampled, negative_generator, negative_proposal, sample_negatives
    from prmkd_dist.parallel.run import GlobalBatchSampler, load_run_config
    from prmkd_dist.train.engine import no_teachers
    from prmkd_dist.train.trainer import (build_model, configured_stride, load_split_for, training_batch,
                                          training_examples)
    from prmkd_dist.train.utils import seed_everything

    _, r_full = two_rank
    sampled = {"scoring": "sampled", "num_negatives": 300}
    r2 = _run(tmp_path / "s2", 2, parallel=sampled)
    r1 = _run(tmp_path / "s1", 1, parallel=sampled)
    torch.testing.assert_close(torch.tensor(r2["losses"]), torch.tensor(r1["losses"]), rtol=LOSS_RTOL, atol=0)
    assert _max_param_diff(r2["state"], r1["state"]) < PARAM_ATOL
    assert abs(r2["losses"][0] - r_full["losses"][0]) > 1e-3  # another objective than the exact one

    cfg, _ = load_run_config(tmp_path / "s1" / "config.yaml")
    seed_everything(cfg.run.seed)  # as train_distributed does it: the same initial model
    split = load_split_for(cfg.data.dataset)
    model = build_model(cfg, split.data.num_items, split)
    stride = configured_stride(cfg)
    examples = training_examples(split, cfg.data.max_len, cfg.data.windows, stride)
    ids = GlobalBatchSampler(np.arange(len(examples)), cfg.optim.batch_size, cfg.run.seed, 0, 1).global_batch(1, 0)
    x, y = training_batch(split, examples[ids, 0], cfg.data.max_len, examples[ids, 1], stride)
    model.train()
    h = model.encode(x)[y >= 0]
    tgt = y[y >= 0]
    neg, log_p = sample_negatives(negative_proposal(split.data.num_items), 300, negative_generator(0))
    table = model.output_weight()
    bias = model.output_bias()
    t_ids, t_scores, t_w = no_teachers(h.shape[0])
    want = kd_loss_sampled(h, table[tgt][:, None, :], table[neg], neg, log_p, split.data.num_items, tgt, t_ids,
                           t_scores, t_w, cand_bias=None if bias is None else bias[tgt][:, None],
                           neg_bias=None if bias is None else bias[neg])
    assert float(want) == pytest.approx(r1["losses"][0], rel=1e-5)

    # only the looked-up rows of the item table move: the steps' targets, histories and negatives (the exact
    # run moves every row: its softmax reaches the whole catalog)
    init = table.detach()
    (key,) = [k for k, v in r2["state"].items() if v.shape == init.shape]
    touched = set()
    for j in range(STEPS):
        ids = GlobalBatchSampler(np.arange(len(examples)), cfg.optim.batch_size, cfg.run.seed, 0, 1).global_batch(1, j)
        x, y = training_batch(split, examples[ids, 0], cfg.data.max_len, examples[ids, 1], stride)
        touched |= set(x[x >= 0].tolist()) | set(y[y >= 0].tolist())
        touched |= set(sample_negatives(negative_proposal(split.data.num_items), 300, negative_generator(j))[0].tolist())
    moved = set(((r2["state"][key] - init).abs().amax(dim=1) > 0).nonzero().flatten().tolist())
    assert moved and moved <= touched, sorted(moved - touched)[:10]
    assert len(moved) < 0.7 * split.data.num_items
    assert bool(((r_full["state"][key] - init).abs().amax(dim=1) > 0).float().mean() > 0.99)


def test_deepspeed_launcher_runs_the_same_job(two_rank, tmp_path):
    """``launch/deepspeed_launch.sh`` (DeepSpeed's own launcher, 2 local processes) starts the same entry point:
    the same 2-rank job gives the same losses as under torchrun."""
    import os
    import subprocess

    from _launch import ROOT, free_port

    _, r2 = two_rank
    out = tmp_path / "ds"
    config = _write_config(out)
    env = {**os.environ, "NUM_PROCS": "2", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PRMKD_LOG_LEVEL": "WARNING", "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed")}
    p = subprocess.run(["bash", str(ROOT / "launch" / "deepspeed_launch.sh"), str(config), "--",
                        "--max-steps", str(STEPS), "--no-test"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["steps"] == STEPS
    assert res["losses"] == pytest.approx(r2["losses"], rel=1e-6)


def test_failed_rank_restarts_and_resumes_exactly(two_rank, tmp_path):
    """Rank 1 raises after step 5 (checkpoint at step 3); torchrun restarts both ranks, the run resumes at
    step 3 and finishes: same losses and weights as the uninterrupted run, no example lost or repeated."""
    _, r2 = two_rank
    out = tmp_path / "restart"
    rr = _run(out, 2, {"WORKER_FAIL_AT": "5"}, restarts=1)
    assert (out / "failed_once").read_text() == "5"  # the failure did happen
    assert rr["losses"] == pytest.approx(r2["losses"], rel=1e-6)
    assert _max_param_diff(rr["state"], r2["state"]) < 1e-6  # same world size: same arithmetic, resumed state
    seen = []
    for r in (0, 1):
        recs = [json.loads(x) for x in (out / f"examples_rank{r}.jsonl").read_text().splitlines()]
        assert [x["step"] for x in recs] == list(range(1, STEPS + 1))  # steps 4, 5 of the failed try dropped
        seen += [e for x in recs for e in x["examples"]]
    assert len(seen) == len(set(seen)) == STEPS * 64


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank, tmp_path):
    """The step-3 checkpoint of the 2-rank run, loaded by 1 rank (DCP reshards the tables), continues to the
    same state as the 2-rank run."""
    out2, r2 = two_rank
    out = tmp_path / "reshard"
    shutil.copytree(out2 / "dist_checkpoint", out / "dist_checkpoint")
    assert (out / "dist_checkpoint" / "latest").read_text() == "step_3"
    rs = _run(out, 1)
    assert rs["world"] == 1
    torch.testing.assert_close(torch.tensor(rs["losses"]), torch.tensor(r2["losses"]), rtol=LOSS_RTOL, atol=0)
    assert _max_param_diff(rs["state"], r2["state"]) < PARAM_ATOL
