"""Worker for the multi-process tests, started by torchrun: ``torchrun ... dist_worker.py SCENARIO OUT [ARGS]``.

Scenarios (each writes ``OUT/<scenario>_rank<r>.json`` or .pt for the test to check):
- ``placement``: shard a Caser (two tables) row-, table- and column-wise; report every rank's local shards
  and whether they equal the matching block of the unsharded tables.
- ``engine``: gather_rows gradients; training steps on ml-latest-small with DeepSpeed (ZeRO 1 and 2, row-
  and table-wise); dense replicas; sharded evaluation and top-k against the single-process versions.
- ``train``: ``train_distributed`` with the config and overrides given after OUT; rank 0 saves the per-step
  losses and the whole (unsharded) final state to ``OUT/final.pt``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist


def _dump(out: Path, name: str, obj) -> None:
    (out / f"{name}_rank{dist.get_rank()}.json").write_text(json.dumps(obj, indent=1, default=float))


def placement(out: Path) -> None:
    from prmkd_dist.models import build_student
    from prmkd_dist.parallel import sharding as sh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {}
    for kind in ("row_wise", "table_wise", "column_wise"):
        torch.manual_seed(0)
        model = build_student("caser", 103, dim=16, max_len=4, num_h_filters=2, num_v_filters=1)
        full = {name: ec.embeddings[name].weight.detach().clone()
                for ec in sh.embedding_collections(model).values() for name in ec.embeddings}
        sh.attach_table_optimizer(model, "sgd", lr=0.1)
        plan = sh.plan_sharding(model, 2, sharding=kind)
        dmp = sh.shard_model(model, plan)
        shards = []
        for key, value in dmp.state_dict().items():
            if not hasattr(value, "local_shards"):
                continue
            table = key.split(".")[-2]
            for shard in value.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                expect = full[table][r0:r0 + nr, c0:c0 + nc]
                shards.append({"table": table, "rows": [r0, r0 + nr], "cols": [c0, c0 + nc],
                               "equal": bool(torch.equal(shard.tensor, expect))})
        report[kind] = {"shards": shards, "plan": [s.__dict__ for s in sh.plan_shards(plan)],
                        "text": sh.describe_plan(plan), "dense": [n for n, _ in sh.dense_parameters(dmp)]}
    _dump(out, "placement", report)


def _engine_case(split, sharding: str, zero: int, model_name: str, steps: int, hp: dict):
    from prmkd_dist.models import build_student
    from prmkd_dist.parallel.engine import DistributedEngine, ParallelConfig
    from prmkd_dist.train.trainer import next_item_loss, trainable_users, training_batch

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_student(model_name, split.data.num_items, **hp)
    optim = SimpleNamespace(lr=5e-3, weight_decay=0.0, grad_clip=1.0, batch_size=32)
    engine = DistributedEngine(model, optim, ParallelConfig(sharding=sharding, zero_stage=zero, table_lr=0.05))
    users = trainable_users(split)
    gb, lb = 32, 32 // world
    losses = []
    engine.train()
    for s in range(steps):
        batch = users[(s % 4) * gb:(s % 4 + 1) * gb][rank * lb:(rank + 1) * lb]  # 4 batches, revisited
        x, y = training_batch(split, batch, hp["max_len"])
        loss = next_item_loss(engine, x, y)
        engine.step(loss)
        losses.append(float(loss.detach()))
    flat = torch.cat([p.detach().reshape(-1) for _, p in engine.dense_named_parameters()])
    all_flat = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(all_flat, flat)
    return engine, losses, bool(all(torch.equal(all_flat[0], f) for f in all_flat))


def engine(out: Path) -> None:
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.models import build_student
    from prmkd_dist.parallel.collectives import gather_rows
    from prmkd_dist.parallel.run import evaluate_sharded, sharded_topk, unsharded_state_dict
    from prmkd_dist.train.evaluate import evaluate

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}

    # gather_rows: the gradient of a replicated loss, and of per-rank losses (reduce-scatter)
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (2, 5)]
    wvec = torch.randn(3, generator=g, dtype=torch.float64)
    mine = parts[rank].clone().requires_grad_()
    full = torch.cat([p.clone() for p in parts]).requires_grad_()
    ((full @ wvec) ** 2).sum().backward()
    (((gather_rows(mine) @ wvec) ** 2).sum()).backward()  # replicated: every rank computes the same loss
    lo = sum(p.shape[0] for p in parts[:rank])
    report["gather_replicated"] = float((mine.grad - full.grad[lo:lo + parts[rank].shape[0]]).abs().max())
    mine2 = parts[rank].clone().requires_grad_()
    gathered = gather_rows(mine2, replicated=False)
    (gathered[rank::2] ** 3).sum().backward()  # each rank a different function of the gathered rows
    full2 = torch.cat([p.clone() for p in parts]).requires_grad_()
    sum((full2[r::2] ** 3).sum() for r in range(world)).backward()
    report["gather_reduce_scatter"] = float((mine2.grad - full2.grad[lo:lo + parts[rank].shape[0]]).abs().max())

    _, split = load_split("ml-latest-small")
    hp = dict(dim=32, max_len=20, num_layers=1, num_heads=2, dropout=0.0)
    for name, (sharding, zero, model_name, hparams) in {
        "sasrec_row_zero1": ("row_wise", 1, "sasrec", hp),
        "caser_column_zero2": ("column_wise", 2, "caser", dict(dim=32, max_len=20, num_h_filters=2, num_v_filters=1,
                                                              dropout=0.0)),
    }.items():
        eng, losses, dense_equal = _engine_case(split, sharding, zero, model_name, 8, hparams)
        entry = {"losses": losses, "dense_equal": dense_equal, "range": [eng.first_id, eng.num_rows]}
        if name == "sasrec_row_zero1":
            # the sharded evaluation and top-k against the single-process ones on the same weights
            state = unsharded_state_dict(eng)
            plain = build_student("sasrec", split.data.num_items, **hparams)
            plain.load_state_dict(state)
            kw = dict(ks=(10, 20), batch_size=256, max_len=20)
            entry["eval_sharded"] = evaluate_sharded(eng, split, "valid", **kw)
            entry["eval_single"] = evaluate(plain, split, "valid", progress=False, **kw)
            hist = torch.from_numpy(np.stack([split.train_sequence(u)[-20:] for u in range(8)]))
            vals, ids = sharded_topk(eng.local_scores(hist), eng.first_id, 15)
            ref = plain.eval().score(hist).topk(15, dim=1)
            entry["topk_ids_equal"] = bool(torch.equal(ids, ref.indices))
            entry["topk_vals_maxdiff"] = float((vals - ref.values).abs().max())
        report[name] = entry
    _dump(out, "engine", report)


def train(out: Path, config: str, overrides: list[str]) -> None:
    from prmkd_dist.parallel.run import load_run_config, train_distributed, unsharded_state_dict

    cfg, pcfg = load_run_config(config, overrides)
    max_steps = int(os.environ.get("WORKER_MAX_STEPS", "0"))
    fail = int(os.environ.get("WORKER_FAIL_AT", "0"))
    res = train_distributed(cfg, pcfg, max_steps=max_steps, record_examples=True, fail_at_step=fail,
                            evaluate_at_end=False)
    state = unsharded_state_dict(res["engine"])
    if dist.get_rank() == 0:
        torch.save({"losses": res["losses"], "state": state, "world": dist.get_world_size()}, out / "final.pt")
    dist.barrier()


if __name__ == "__main__":
    if os.environ.get("WORKER_STACKS_AFTER"):  # debugging hangs: print every thread's stack, then exit
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["WORKER_STACKS_AFTER"]), exit=True)
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if scenario == "placement":
        placement(out)
    elif scenario == "engine":
        engine(out)
    elif scenario == "train":
        train(out, sys.argv[3], sys.argv[4:])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    # every output is written: mark this rank done (a failing test then tells a crash in the scenario from
    # one at exit), then leave past the interpreter's teardown, where a rank aborted twice in CI
    (out / f"{scenario}_done_rank{dist.get_rank()}").touch()
    from prmkd_dist.parallel.engine import exit_after_process_group

    exit_after_process_group(0)
