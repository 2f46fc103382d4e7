"""Resumable checkpoints of a ``DistributedEngine`` run.

Layout (``root`` = ``<out_dir>/dist_checkpoint``)::

    root/step_<N>/tables/        torch.distributed.checkpoint of the DMP state dict (sharded tables as
                                 ShardedTensors, dense tensors replicated) + the fused table optimizer state
    root/step_<N>/dense/         DeepSpeed's save_checkpoint of the dense engine (ZeRO partitions per rank)
    root/step_<N>/loop_rank<r>.pt   this rank's loop state: position in the data, RNG states (python, numpy,
                                 torch), anything the caller adds
    root/step_<N>/meta.json      world size, step, time (written last by rank 0)
    root/latest                  "step_<N>": written by rank 0 after every rank finished writing, so a
                                 crash during a save leaves the previous checkpoint the latest

Resuming on a different world size: DCP reshards the tables (the planner re-plans for the new world; the
saved ShardedTensors are read into the new shards). The dense part restores from DeepSpeed's files: with
ZeRO 0 the optimizer state is whole and loads on any world size; ZeRO 1/2 partition it by rank, so a
different world size loads the dense weights only and restarts the dense optimizer state (logged).
Loop states are per rank; on a different world size rank r reads rank 0's state (position and seeds are
global: the data plan is a function of seed, epoch and batch index, not of the rank).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from prmkd_dist.train.utils import get_logger

log = get_logger(__name__)
LATEST = "latest"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _table_state(engine) -> dict:
    return {"model": engine.dmp.state_dict(), "table_optimizer": engine.dmp.fused_optimizer.state_dict()}


def save(root: str | Path, engine, step: int, loop_state: dict) -> Path:
    """Save everything needed to continue exactly after ``step`` (collective: every rank calls).
    ``loop_state``: this rank's picklable loop position; the RNG states are added here."""
    root = Path(root)
    d = root / f"step_{step}"
    rank, world = engine.rank, engine.world_size
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
    dist.barrier(group=engine.group)
    dcp.save(_table_state(engine), checkpoint_id=str(d / "tables"), process_group=engine.group)
    engine.ds.save_checkpoint(str(d / "dense"), tag="dense", save_latest=False)
    torch.save({**loop_state, "rng": rng_state()}, d / f"loop_rank{rank}.pt")
    dist.barrier(group=engine.group)
    if rank == 0:
        meta = {"step": step, "world_size": world, "zero_stage": engine.ds.zero_optimization_stage(),
                "time": time.time()}
        (d / "meta.json").write_text(json.dumps(meta, indent=2))
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(d.name)
        tmp.replace(root / LATEST)  # atomic: readers see the old or the new name, never half of one
    dist.barrier(group=engine.group)
    return d


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under ``root``, or None."""
    p = Path(root) / LATEST
    if not p.exists():
        return None
    d = Path(root) / p.read_text().strip()
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"{p} names {d}, which has no meta.json (an incomplete checkpoint)")
    return d


def load(directory: str | Path, engine) -> dict:
    """Restore ``engine`` (tables, table optimizer, dense engine) and this rank's RNG states from a
    checkpoint written by :func:`save`; returns this rank's loop state (collective)."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    state = _table_state(engine)
    saved = dcp.FileSystemReader(str(d / "tables")).read_metadata().state_dict_metadata
    missing = [f"model.{k}" for k in state["model"] if f"model.{k}" not in saved]
    if missing:
        raise KeyError(f"{d / 'tables'}: the checkpoint lacks model tensors {missing[:5]} (a different model?)")
    # in place, resharded. Partial: stateless table optimizers (SGD) expose placeholder entries that the
    # saving side wrote no data for; everything that was saved must still match.
    dcp.load(state, checkpoint_id=str(d / "tables"), process_group=engine.group,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    engine.dmp.load_state_dict(state["model"])
    engine.dmp.fused_optimizer.load_state_dict(state["table_optimizer"])
    same_world = meta["world_size"] == engine.world_size
    zero = engine.ds.zero_optimization_stage()
    optimizer_states = same_world or zero == 0
    if not optimizer_states:
        log.warning("%s: saved on %d ranks with ZeRO %d, loading on %d: the dense optimizer state is partitioned "
                     "per rank and restarts; dense weights and the tables resume exactly",
                     d, meta["world_size"], zero, engine.world_size)
    engine.ds.load_checkpoint(str(d / "dense"), tag="dense", load_optimizer_states=optimizer_states,
                              load_lr_scheduler_states=False, load_module_only=not optimizer_states)
    own = d / f"loop_rank{engine.rank}.pt"
    loop = torch.load(own if same_world and own.exists() else d / "loop_rank0.pt", weights_only=False)
    set_rng_state(loop.pop("rng"))
    dist.barrier(group=engine.group)
    return loop
