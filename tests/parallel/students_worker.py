"""Worker of test_students_distributed.py, started by torchrun: ``students_worker.py OUT DATA_DIR SHARDS``.

For each data-bound student (LightGCN, DeepFM, DCN-v2) it runs ``train_distributed`` (tables sharded by
TorchRec's planner: row-wise for LightGCN, the planner's choice for the bag tables; fused SGD; dense part under DeepSpeed ZeRO 1) for a few steps on the given
prepared dataset, distilling from SHARDS, then the sharded validation evaluation; rank 0 writes
``OUT/<student>.pt`` with the losses, the sharded metrics and the whole unsharded state."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

STUDENTS = {
    "lightgcn": {"dim": 16, "num_layers": 2},
    "deepfm": {"dim": 8, "mlp": [16]},
    "dcnv2": {"dim": 8, "mlp": [16], "cross_rank": 4},
}
STEPS = 4


def config(name: str, out: Path, data_dir: str, shards: str):
    from prmkd_dist.parallel.engine import ParallelConfig
    from prmkd_dist.train.config import config_from_dict

    cfg = config_from_dict({
        "data": {"dataset": data_dir, "max_len": 10, "windows": "all"},
        "model": {"name": name, "hparams": STUDENTS[name]},
        "optim": {"lr": 0.05, "batch_size": 64, "epochs": 1, "num_negatives": 20},
        "run": {"seed": 0, "out_dir": str(out / name), "tensorboard": False, "progress": False, "num_threads": 1},
        "distill": {"shards": shards, "lambda_kd": 1.0},
    })
    # TorchRec 1.8 offers no row-wise sharding of pooled (bag) tables on CPU: the planner picks for DeepFM/DCN-v2
    pcfg = ParallelConfig(sharding="row_wise" if name == "lightgcn" else "auto", zero_stage=1, table_optimizer="sgd", dense_optimizer="sgd",
                          table_lr=0.5, resume=False)
    return cfg, pcfg


def main(out: Path, data_dir: str, shards: str) -> None:
    from prmkd_dist.parallel.run import evaluate_sharded, train_distributed, unsharded_state_dict
    from prmkd_dist.train.trainer import load_split_for

    dist.init_process_group("gloo")
    split = load_split_for(data_dir)
    for name in STUDENTS:
        cfg, pcfg = config(name, out, data_dir, shards)
        res = train_distributed(cfg, pcfg, max_steps=STEPS, evaluate_at_end=False)
        engine = res["engine"]
        metrics = evaluate_sharded(engine, split, "valid", ks=(10,), batch_size=64, max_len=cfg.data.max_len)
        state = unsharded_state_dict(engine)
        dense = torch.cat([p.detach().reshape(-1) for _, p in engine.dense_named_parameters()])
        both = [torch.empty_like(dense) for _ in range(dist.get_world_size())]
        dist.all_gather(both, dense)
        losses = [torch.empty(len(res["losses"])) for _ in range(dist.get_world_size())]
        dist.all_gather(losses, torch.tensor(res["losses"]))
        if dist.get_rank() == 0:
            torch.save({"losses": [x.tolist() for x in losses], "metrics": metrics, "state": state,
                        "plan": engine.plan.plan.keys().__repr__(), "dense_equal": all(torch.equal(both[0], b) for b in both),
                        "range": [engine.first_id, engine.num_rows]}, out / f"{name}.pt")
        dist.barrier()
    from prmkd_dist.parallel.engine import exit_after_process_group

    exit_after_process_group(0)  # past the interpreter's teardown (see its docstring)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
