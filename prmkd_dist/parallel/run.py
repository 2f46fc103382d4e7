"""Distributed training entry point: ``python -m prmkd_dist.parallel.run --config FILE [--set k=v ...]``.

Start it under a launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
(``torchrun --nproc-per-node 2 -m prmkd_dist.parallel.run ...``, the ``deepspeed`` launcher, Slurm + torchrun:
see ``launch/``). The run config is the trainer's YAML plus an optional ``parallel:`` section
(``ParallelConfig``: sharding, ZeRO stage, table optimizer, checkpoint cadence); ``--set`` overrides take
dotted keys of either (``--set parallel.zero_stage=2 optim.lr=1e-3``).

Semantics:
- ``optim.batch_size`` is the GLOBAL batch: global batch j of an epoch is the training examples
  (``trainer.training_examples``: user windows, per ``data.windows``) ``order[j*B:(j+1)*B]`` of one
  permutation (a function of seed and epoch only), and rank r trains on the r-th contiguous 1/W of it, so
  the ranks concatenated see exactly what one process sees with the same config (the ``len % W`` examples
  left over by the permutation are skipped that epoch). All ranks run the same number of batches.
- The loss is the global-batch loss (``DistributedEngine.linear_loss``).
- Evaluation is sharded over the catalog: every rank encodes the same evaluation batch (the dense part is
  replicated), scores its own output rows, and the target's rank is the sum of the per-rank counts of
  items that beat it: the metrics equal the single-process ``evaluate``. ``sharded_topk`` merges per-rank
  top-K lists into the global top-K for recommendations.
- A resumable checkpoint (``checkpoint.py``) is written at the end of every epoch and every
  ``parallel.checkpoint_every`` steps; with ``parallel.resume`` a (re)started run continues from the
  latest one (under ``torchrun --max-restarts`` a failed rank restarts the group and the run resumes).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.parallel import checkpoint as ckpt
from prmkd_dist.parallel.engine import DistributedEngine, ParallelConfig, exit_after_process_group, init_process_group
from prmkd_dist.parallel.sharding import describe_plan
from prmkd_dist.train import config as config_mod
from prmkd_dist.train.config import TrainConfig
from prmkd_dist.train.evaluate import history_batches, stage_histories
from prmkd_dist.train.metrics import MetricAccumulator
from prmkd_dist.train.trainer import (SELECT_METRIC, build_model, configured_stride, load_split_for, next_item_loss,
                                      trainable_users, training_batch, training_examples)
from prmkd_dist.train.utils import get_logger, seed_everything, set_num_threads

log = get_logger(__name__)


# ---- config -----------------------------------------------------------------------------------------
def load_run_config(path: str | Path, overrides: list[str] | None = None) -> tuple[TrainConfig, ParallelConfig]:
    """The trainer's config plus the ``parallel`` section (overrides ``parallel.*`` go to the latter)."""
    overrides = list(overrides or [])
    p = config_mod.resolve_config_path(path)
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise config_mod.ConfigError(f"{p}: top level: expected a mapping of sections")
    if "parallel" in getattr(TrainConfig, "__dataclass_fields__", {}):  # the shared config owns the section
        cfg = config_mod.config_from_dict(raw, str(p), overrides)
        return cfg, cfg.parallel  # type: ignore[attr-defined]
    par_raw = dict(raw.pop("parallel", None) or {})
    par_over = [o for o in overrides if o.strip().startswith("parallel.")]
    for o in par_over:
        config_mod._apply_override(par_raw, o.strip()[len("parallel."):])
    cfg = config_mod.config_from_dict(raw, str(p), [o for o in overrides if o not in par_over])
    pcfg = config_mod._build(ParallelConfig, par_raw, "parallel", str(p))
    return cfg, pcfg


# ---- data -------------------------------------------------------------------------------------------
class GlobalBatchSampler:
    """The example ids of global batch j of an epoch, and this rank's share (module doc). State = (epoch,
    batch): the plan is a pure function of (seed, epoch), so resuming needs nothing else."""

    def __init__(self, ids: np.ndarray, batch_size: int, seed: int, rank: int, world_size: int):
        if batch_size % world_size:
            raise ValueError(f"optim.batch_size={batch_size} (the global batch) must be a multiple of the world size "
                             f"{world_size}")
        if len(ids) < world_size:
            raise ValueError(f"{len(ids)} training examples for {world_size} ranks")
        self.ids, self.batch_size, self.seed = np.asarray(ids), batch_size, seed
        self.rank, self.world_size = rank, world_size

    def order(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.ids)
        return perm[:len(perm) - len(perm) % self.world_size]

    def num_batches(self, epoch: int) -> int:
        return math.ceil(len(self.order(epoch)) / self.batch_size)

    def global_batch(self, epoch: int, j: int) -> np.ndarray:
        return self.order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]

    def local_batch(self, epoch: int, j: int) -> np.ndarray:
        g = self.global_batch(epoch, j)
        n = len(g) // self.world_size  # every global batch is a multiple of W long (order() trims)
        return g[self.rank * n:(self.rank + 1) * n]


# ---- sharded evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def sharded_topk(local_scores: torch.Tensor, first_id: int, k: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k (values, item ids) [B, k] from every rank's scores over its rows [B, R] (ids first_id..):
    per-rank top-k, all-gathered, merged. Collective."""
    kk = min(k, local_scores.shape[1])
    v, i = local_scores.topk(kk, dim=1) if kk > 0 else (local_scores[:, :0], local_scores[:, :0].long())
    pad = k - kk  # ranks with fewer than k rows pad with -inf so every rank sends [B, k]
    v = torch.cat([v, v.new_full((v.shape[0], pad), -torch.inf)], 1)
    i = torch.cat([i + first_id, i.new_full((i.shape[0], pad), PAD_ID)], 1)
    world = dist.get_world_size(group)
    vs, is_ = [torch.empty_like(v) for _ in range(world)], [torch.empty_like(i) for _ in range(world)]
    dist.all_gather(vs, v.contiguous(), group=group)
    dist.all_gather(is_, i.contiguous(), group=group)
    allv, alli = torch.cat(vs, 1), torch.cat(is_, 1)
    top = allv.topk(k, dim=1)
    return top.values, alli.gather(1, top.indices)


@torch.no_grad()
def evaluate_sharded(engine: DistributedEngine, split: LeaveOneOutSplit, stage: str = "valid",
                     ks: tuple[int, ...] = (10, 20), batch_size: int = 1024, exclude_history: bool = True,
                     max_len: int = 200) -> dict[str, float]:
    """Full-ranking metrics with the catalog sharded over ranks; the same rules as ``evaluate`` (history
    excluded except a repeated target, ties against the target). Collective; same result on every rank."""
    users = split.eval_users(stage)
    targets_all = split.target(stage)[users]
    offsets, items = stage_histories(split, stage, users)
    lo, hi = engine.first_id, engine.first_id + engine.num_rows
    acc = MetricAccumulator(ks)
    was_training = engine.model.training
    engine.eval()
    try:
        for idx, seqs, hist in history_batches(users, offsets, items, batch_size, max_len):
            hist = hist.to(engine.device)
            u = torch.from_numpy(users[idx]).to(engine.device) if engine.needs_users else None
            s = engine.local_scores(hist, u).float()  # [B, R]
            tgt = torch.from_numpy(targets_all[idx]).to(s.device)
            ar = torch.arange(len(idx), device=s.device)
            own = (tgt >= lo) & (tgt < hi)
            t = torch.zeros(len(idx), dtype=s.dtype, device=s.device)
            tcol = (tgt - lo).clamp(0, max(hi - lo - 1, 0))
            if hi > lo:
                t = torch.where(own, s[ar, tcol], t)
            dist.all_reduce(t, group=engine.group)  # each target's score, from the rank that owns it
            if exclude_history and hi > lo:
                rows = np.repeat(np.arange(len(idx)), [len(q) for q in seqs])
                cols = np.concatenate(seqs) if seqs else np.empty(0, np.int64)
                keep = (cols >= lo) & (cols < hi)
                s[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep] - lo)] = -torch.inf
                s[ar[own], tcol[own]] = t[own]  # a repeated target stays rankable
            # items scoring >= the target, minus the target itself on its owner: summed = target_rank
            beats = (s >= t[:, None]).sum(dim=1) - own.long()
            dist.all_reduce(beats, group=engine.group)
            acc.add_ranks(beats.cpu())
    finally:
        engine.model.train(was_training)
    return acc.result()


def unsharded_state_dict(engine: DistributedEngine) -> dict[str, torch.Tensor]:
    """The plain student's state dict (dense tensors + every table gathered whole), on every rank.
    Collective; for exporting a distributed run to the single-process tools (serve, evaluate)."""
    from torchrec import KeyedJaggedTensor

    from prmkd_dist.parallel.collectives import gather_rows
    from prmkd_dist.parallel.sharding import sharded_module_names

    out = {name: p.detach().clone() for name, p in engine.dense_named_parameters()}
    sharded = sharded_module_names(engine.dmp)  # their buffers are TorchRec's bookkeeping, not the student's
    out.update({k: v.clone() for k, v in engine.model.named_buffers()
                if not any(k.startswith(m + ".") for m in sharded)})
    with torch.no_grad():
        for path, tables in engine.table_configs.items():
            ec = engine.model.get_submodule(path)
            blocks = []  # this rank's contiguous block of each table
            for name, feature, num in tables:
                block = -(-num // engine.world_size)
                lo = min(engine.rank * block, num)
                blocks.append(torch.arange(lo, min(lo + block, num), device=engine.device))
            if path in engine.bag_tables:
                # a sharded bag collection takes all its features at one stride: one bag per id, each feature's
                # bags padded with empty ones to the longest block; the pooled single-id bag is the row
                stride = max(len(b) for b in blocks)
                lengths = torch.cat([torch.cat([torch.ones(len(b), dtype=torch.int32),
                                                torch.zeros(stride - len(b), dtype=torch.int32)]) for b in blocks])
                kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f for _, f, _ in tables], values=torch.cat(blocks),
                                                          lengths=lengths)
                pooled = ec(kjt)
                for (name, feature, _), b in zip(tables, blocks):
                    rows = pooled[feature][:len(b)]
                    out[f"{path}.embedding_bags.{name}.weight"] = gather_rows(rows.detach().contiguous(), engine.group)
                continue
            for (name, feature, num), ids in zip(tables, blocks):
                kjt = KeyedJaggedTensor.from_lengths_sync(keys=[feature], values=ids,
                                                          lengths=torch.tensor([ids.numel()], dtype=torch.int32))
                rows = ec(kjt)[feature].values()
                out[f"{path}.embeddings.{name}.weight"] = gather_rows(rows.detach(), engine.group)
    return out


# ---- the loop ---------------------------------------------------------------------------------------
def _record(path: Path | None, epoch: int, step: int, examples: np.ndarray, users: np.ndarray) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "examples": [int(e) for e in examples],
                                "users": [int(u) for u in users]}) + "\n")


def _truncate_record(path: Path | None, step: int) -> None:
    """After a resume, forget the steps the restored checkpoint does not contain."""
    if path is not None and path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(x + "\n" for x in keep))


def _train_counts(split: LeaveOneOutSplit) -> np.ndarray:
    """Each item's occurrences in the training sequences (the popularity proposal of sampled scoring)."""
    counts = np.zeros(split.data.num_items, dtype=np.float64)
    for u in trainable_users(split):
        np.add.at(counts, np.asarray(split.train_sequence(u), dtype=np.int64), 1.0)
    return counts


def train_distributed(cfg: TrainConfig, pcfg: ParallelConfig, max_steps: int = 0, record_examples: bool = False,
                      fail_at_step: int = 0, evaluate_at_end: bool = True) -> dict:
    """Train under the current process group (see the module doc). ``max_steps`` > 0 stops early (tests,
    benchmarks); ``record_examples`` appends every rank's consumed example ids (and their users) to
    ``<out_dir>/examples_rank<r>.jsonl``; ``fail_at_step`` raises once at that step (restart tests; a marker
    file makes the second attempt pass). Returns the result dict (also written as results.json by rank 0)."""
    rank, world, _ = init_process_group(pcfg.backend)
    set_num_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)  # same seed on every rank: identical initial model, tables copied from it
    device = torch.device(cfg.run.device)
    split = load_split_for(cfg.data.dataset)
    model = build_model(cfg, split.data.num_items, split)
    engine = DistributedEngine(model, cfg.optim, pcfg, device=device)
    if pcfg.scoring == "sampled" and pcfg.negatives == "popularity":
        from prmkd_dist.distill.sampled import negative_proposal

        engine.negative_proposal = negative_proposal(split.data.num_items, _train_counts(split))
    # data-bound students (DeepFM, DCN-v2, LightGCN) train on position examples with their own objective
    # (distill/interaction.py; distillation from distill.shards included); the others on next-item windows
    objective = None
    if engine.needs_users:
        from prmkd_dist.distill.interaction import student_objective

        objective = student_objective(cfg, split, engine.model, rank, world)
    torch.manual_seed(cfg.run.seed * 1000003 + rank)  # from here, per-rank streams (dropout) differ
    out_dir = Path(cfg.run.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # the resolved config, parallel section included: a restart that reads it gets the same run
        full = {**cfg.to_dict(), "parallel": dict(pcfg.__dict__)}
        tmp = out_dir / "config.yaml.tmp"  # atomic: another rank may be reading config.yaml as its input
        tmp.write_text(yaml.safe_dump(full, sort_keys=False))
        tmp.replace(out_dir / "config.yaml")
        log.info("sharding plan (world %d):\n%s", world, describe_plan(engine.plan))
    dist.barrier()
    ckpt_root = out_dir / "dist_checkpoint"
    record = out_dir / f"examples_rank{rank}.jsonl" if record_examples else None
    stride = configured_stride(cfg) if objective is None else None
    examples = (training_examples(split, cfg.data.max_len, cfg.data.windows, stride) if objective is None
                else objective.examples)  # [N, 2] (user, end) or (user, position)
    sampler = GlobalBatchSampler(np.arange(len(examples)), cfg.optim.batch_size, cfg.run.seed, rank, world)

    epoch, batch, step, history, losses = 1, 0, 0, [], []
    last = ckpt.latest(ckpt_root) if pcfg.resume else None
    if last is not None:
        loop = ckpt.load(last, engine)
        epoch, batch, step, history, losses = (loop["epoch"], loop["batch"], loop["step"], loop["history"],
                                               loop["losses"])
        engine.negative_draws = int(loop.get("negative_draws", 0))  # the sampled negatives continue the same stream
        _truncate_record(record, step)
        log.info("rank %d resumed from %s (epoch %d, batch %d, step %d)", rank, last, epoch, batch, step)

    def save(next_epoch: int, next_batch: int) -> None:
        ckpt.save(ckpt_root, engine, step, {"epoch": next_epoch, "batch": next_batch, "step": step,
                                            "history": history, "losses": losses,
                                            "negative_draws": engine.negative_draws})

    eval_kw = dict(ks=tuple(sorted(set(cfg.eval.ks) | {10})), batch_size=cfg.eval.batch_size,
                   exclude_history=cfg.eval.exclude_history, max_len=cfg.data.max_len)
    t0, done = time.perf_counter(), False
    while epoch <= cfg.optim.epochs and not done:
        engine.train()
        loss_sum, n = 0.0, 0
        for j in range(batch, sampler.num_batches(epoch)):
            ids = sampler.local_batch(epoch, j)
            users, ends = examples[ids, 0], examples[ids, 1]
            if objective is None:
                inputs, targets = training_batch(split, users, cfg.data.max_len, ends, stride)
                loss = next_item_loss(engine, inputs.to(device), targets.to(device))
            else:
                loss = objective.loss(engine, objective.batch(examples[ids]))
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"rank {rank} epoch {epoch} step {step}: loss is {float(loss.detach())}")
            engine.step(loss)
            step += 1
            loss_sum, n = loss_sum + float(loss.detach()), n + 1
            losses.append(float(loss.detach()))
            _record(record, epoch, step, ids, users)
            if fail_at_step and step == fail_at_step and rank == world - 1:
                marker = out_dir / "failed_once"
                if not marker.exists():
                    marker.write_text(str(step))
                    raise RuntimeError(f"rank {rank}: injected failure at step {step} (restart test)")
            if max_steps and step >= max_steps:
                done = True
                break
            if pcfg.checkpoint_every and step % pcfg.checkpoint_every == 0:
                save(epoch, j + 1)
        entry = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(n, 1)}
        if not done and (epoch % cfg.optim.eval_every == 0 or epoch == cfg.optim.epochs):
            entry.update(evaluate_sharded(engine, split, "valid", **eval_kw))
            if rank == 0:
                log.info("epoch %d loss %.4f valid %s %.4f", epoch, entry["train_loss"], SELECT_METRIC,
                         entry[SELECT_METRIC])
        history.append(entry)
        if not done:
            epoch, batch = epoch + 1, 0
            save(epoch, 0)
    result = {"world_size": world, "steps": step, "history": history, "losses": losses,
              "train_seconds": time.perf_counter() - t0,
              "last_loss": history[-1]["train_loss"] if history else math.nan}
    if evaluate_at_end:
        result["test"] = evaluate_sharded(engine, split, "test", **eval_kw)
    if rank == 0:
        (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=float))
    result["engine"] = engine
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prmkd_dist.parallel.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run YAML (path or packaged name)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides (parallel.* too)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: train all epochs)")
    ap.add_argument("--record-examples", action="store_true", help="log each rank's consumed example ids")
    ap.add_argument("--fail-at-step", type=int, default=0, help=argparse.SUPPRESS)  # restart tests
    ap.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = ap.parse_args(argv)
    cfg, pcfg = load_run_config(args.config, args.set)
    result = train_distributed(cfg, pcfg, max_steps=args.max_steps, record_examples=args.record_examples,
                               fail_at_step=args.fail_at_step, evaluate_at_end=not args.no_test)
    if dist.get_rank() == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "engine"}, indent=2, default=float))
    exit_after_process_group(0)  # never returns (see its docstring)
    return 0


if __name__ == "__main__":
    sys.exit(main())
