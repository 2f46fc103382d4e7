"""Time of one distillation training step with each method switched on: where an epoch's time goes.

For one training config (a packaged name or a YAML path) and a list of variants (each a set of ``--set``-style
overrides on top of it), build the student and its objective exactly as ``prmkd-dist train`` does
(``prepare_student`` + ``build_objective`` + ``LocalEngine``), run ``--warmup`` steps, then time ``--steps``
steps: the loss (student forward and every distillation term) and the engine step (backward + Adam) apart.
Every variant reads the same batches (same seed). Prints a markdown table (median and p90 per step, the ratio
to the first variant, an epoch's estimated compute) and writes JSON. One process, CPU, ``--threads`` threads.

    .venv/bin/python benchmarks/distill_step.py --config distill-caser-games \\
        --embeddings artifacts/teachers/amazon-games/exports/id-transformer/embeddings \\
        --threads 1 --steps 15 --out benchmarks/results/distill-step-caser-games.json

Default variants: plain (the config as is), + embedding distillation, NKD, CPD, SLD, MKD (all three); the
embedding-based ones need ``--embeddings``. ``--variant "NAME=key=value;key=value"`` replaces the list.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from prmkd_dist.distill.trainer import build_objective, prepare_student
from prmkd_dist.train.config import load_config
from prmkd_dist.train.engine import LocalEngine
from prmkd_dist.train.trainer import load_split_for
from prmkd_dist.train.utils import machine_description, seed_everything


def default_variants(embeddings: str | None) -> dict[str, list[str]]:
    if not embeddings:
        return {"plain": [], "SLD": ["distill.mkd.sld=0.5"]}
    emb = f"distill.teacher_embeddings=[{embeddings}]"
    return {
        "plain": [],
        "+ embedding": [emb, "distill.embedding.enabled=true"],
        "NKD": [emb, "distill.mkd.nkd=true"],
        "CPD": [emb, "distill.mkd.cpd=0.5"],
        "SLD": ["distill.mkd.sld=0.5"],
        "MKD (NKD + CPD + SLD)": [emb, "distill.mkd.nkd=true", "distill.mkd.cpd=0.5", "distill.mkd.sld=0.5"],
    }


def time_steps(cfg, split, steps: int, warmup: int) -> dict:
    """Per-step seconds of the loss and of the engine step for ``cfg``'s objective on ``split``."""
    seed_everything(cfg.run.seed)
    model, teacher_emb, _ = prepare_student(cfg, split)
    objective, rows = build_objective(cfg, split, model, teacher_emb)
    engine = LocalEngine(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip,
                         loss_backend=cfg.optim.loss_backend)
    engine.train()
    batches = objective.batches(1)
    loss_s, step_s = [], []
    for i in range(warmup + steps):
        try:
            batch = next(batches)
        except StopIteration:
            raise SystemExit(f"the objective has {i} batches an epoch; asked for --warmup {warmup} + --steps {steps}")
        t0 = time.perf_counter()
        loss = objective.loss(engine, batch)
        t1 = time.perf_counter()
        engine.step(loss)
        t2 = time.perf_counter()
        if i >= warmup:
            loss_s.append(t1 - t0)
            step_s.append(t2 - t1)
    total = [a + b for a, b in zip(loss_s, step_s)]
    return {"rows": rows, "batches_per_epoch": objective.num_batches(), "loss_s": loss_s, "step_s": step_s,
            "median_s": statistics.median(total), "p90_s": sorted(total)[int(0.9 * (len(total) - 1))],
            "loss_median_s": statistics.median(loss_s), "step_median_s": statistics.median(step_s)}


def measure(configs: dict, split, steps: int, warmup: int) -> dict[str, dict]:
    return {name: time_steps(cfg, split, steps, warmup) for name, cfg in configs.items()}


def table(results: dict[str, dict]) -> str:
    first = next(iter(results.values()))["median_s"]
    lines = ["| variant | ms / step (median) | p90 | loss (fwd) | backward + Adam | vs first | epoch compute |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {1e3 * r['median_s']:.1f} | {1e3 * r['p90_s']:.1f} | {1e3 * r['loss_median_s']:.1f} | "
                     f"{1e3 * r['step_median_s']:.1f} | {r['median_s'] / first:.2f}x | "
                     f"{r['median_s'] * r['batches_per_epoch']:.0f} s ({r['batches_per_epoch']} steps) |")
    return "\n".join(lines)


def _variant(spec: str) -> tuple[str, list[str]]:
    name, sep, body = spec.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {spec!r}: expected NAME=key=value;key=value (or NAME= for the config as is)")
    return name.strip(), [s.strip() for s in body.split(";") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="packaged config name or YAML path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES")
    ap.add_argument("--embeddings", default=None, help="teacher item-embedding shard dir (embedding/MKD variants)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--machine", default=machine_description())
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    variants = dict(_variant(v) for v in args.variant) if args.variant else default_variants(args.embeddings)
    configs = {name: load_config(args.config, args.set + ov) for name, ov in variants.items()}
    split = load_split_for(next(iter(configs.values())).data.dataset)
    results = measure(configs, split, args.steps, args.warmup)
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join(["benchmarks/distill_step.py"] + (argv if argv is not None else sys.argv[1:])),
            "machine": args.machine, "threads": args.threads,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "config": args.config, "overrides": args.set, "variants": variants, "results": results,
        }, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
