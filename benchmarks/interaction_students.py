"""Quality of the feature-interaction and graph students (DeepFM, DCN-v2, LightGCN) with and without distillation.

For each student and seed, two runs on the same examples (training positions, ``data.windows``) in the same
order: "no distillation" (``distill.lambda_kd = 0`` on the same shards: CE only, over the candidate set for
DeepFM/DCN-v2, over the catalog for LightGCN) and "distilled" (all teachers, ``confidence_consistency``
weights). Model selection on validation NDCG@10 (early stopping); the test split is read once per run.
Prints a markdown table (mean ± std over seeds) and writes JSON.

    python benchmarks/interaction_students.py --shards artifacts/teachers/ml-latest-small/shards --seeds 3
    python benchmarks/interaction_students.py --dataset amazon-games --students lightgcn \
        --shards artifacts/teachers/amazon-games/exports/ease --set 'distill.teacher_scale={ease: 0.3}'
    python benchmarks/interaction_students.py --pool seeds0.json seeds12.json --out pooled.json   # one table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from prmkd_dist.data.prepare import load_split
from prmkd_dist.distill.trainer import train_distilled
from prmkd_dist.train.config import config_from_dict

METRICS = ("NDCG@10", "HR@10", "NDCG@20", "MRR")
STUDENTS = {
    "lightgcn": {"dim": 64, "num_layers": 2},
    "deepfm": {"dim": 16, "mlp": [64]},
    "dcnv2": {"dim": 16, "mlp": [64], "cross_rank": 8},
}
VARIANTS = {"no distillation": ["distill.lambda_kd=0"], "distilled": []}


def summarise(runs: dict[str, dict[str, list[dict]]]) -> tuple[str, dict]:
    """Markdown table and summary (mean, std over seeds) of ``runs[student][variant]``."""
    lines = ["| student | variant | seeds | " + " | ".join(f"valid {m}" for m in METRICS[:1])
             + " | " + " | ".join(f"test {m}" for m in METRICS) + " |",
             "|---|---|---:|" + "---:|" * (1 + len(METRICS))]
    summary = {}
    for student, vs in runs.items():
        for variant, rs in vs.items():
            cell = {}
            for stage in ("valid", "test"):
                for m in METRICS:
                    x = np.array([r[stage][m] for r in rs])
                    cell[f"{stage} {m}"] = (float(x.mean()), float(x.std()))
            summary[f"{student} / {variant}"] = cell
            fmt = lambda k: f"{cell[k][0]:.4f} ± {cell[k][1]:.4f}"  # noqa: E731
            lines.append(f"| {student} | {variant} | {len(rs)} | {fmt('valid NDCG@10')} | "
                         + " | ".join(fmt(f"test {m}") for m in METRICS) + " |")
    return "\n".join(lines), summary


# what may differ between reports that are pooled: which seeds ran, where the report went, how it printed
POOL_FREE_ARGS = ("seeds", "first_seed", "out", "progress", "threads", "students", "pool")


def pool_reports(paths: list[str]) -> dict:
    """One report from several runs of this script that differ only in their seeds (and students): the runs of
    every (student, variant) concatenated. A setting that differs (dataset, shards, epochs, lr, overrides, ...)
    or a seed present twice is an error that names both files, so rows of different experiments never mix."""
    reports = [(p, json.loads(Path(p).read_text())) for p in paths]
    for _, rep in reports:  # reports written before --set existed ran without overrides; a shard dir is a path
        rep["args"].setdefault("overrides", [])
        rep["args"]["shards"] = os.path.normpath(rep["args"]["shards"])
    ref_path, ref = reports[0]
    same = {k: v for k, v in ref["args"].items() if k not in POOL_FREE_ARGS}
    runs: dict[str, dict[str, list[dict]]] = {}
    hparams: dict = {}
    for path, rep in reports:
        for k, v in same.items():
            if rep["args"].get(k) != v:
                raise ValueError(f"--pool: {path} has {k}={rep['args'].get(k)!r} but {ref_path} has {v!r}: "
                                 "only reports of the same experiment (different seeds) can be pooled")
        for student, hp in rep["hparams"].items():
            if hparams.setdefault(student, hp) != hp:
                raise ValueError(f"--pool: {path} trains {student} with {hp}, another report with {hparams[student]}")
        for student, vs in rep["runs"].items():
            for variant, rs in vs.items():
                into = runs.setdefault(student, {}).setdefault(variant, [])
                seen = {r["seed"] for r in into}
                for r in rs:
                    if r["seed"] in seen:
                        raise ValueError(f"--pool: {student} / {variant} seed {r['seed']} is in {path} and in an "
                                         "earlier report")
                    into.append(r)
                into.sort(key=lambda r: r["seed"])
    table, summary = summarise(runs)
    return {"pooled_from": list(paths), "commands": [rep["command"] for _, rep in reports], "args": same,
            "hparams": hparams, "summary": summary, "runs": runs, "table": table}


def base_config(dataset: str, student: str, shards: str, args) -> dict:
    return {
        "data": {"dataset": dataset, "max_len": args.max_len, "windows": args.windows},
        "model": {"name": student, "hparams": STUDENTS[student]},
        "optim": {"lr": args.lr, "batch_size": args.batch_size, "epochs": args.epochs, "patience": args.patience,
                  "num_negatives": args.negatives},
        "eval": {"ks": [10, 20]},
        "run": {"out_dir": "runs/bench-interaction", "tensorboard": False, "progress": args.progress,
                "num_threads": args.threads},
        "distill": {"shards": shards, "strategy": "confidence_consistency", "temperature": args.temperature,
                    "score_norm": args.score_norm},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-latest-small")
    ap.add_argument("--shards", help="merged teacher shards of --dataset (required unless --pool)")
    ap.add_argument("--students", nargs="*", default=list(STUDENTS), choices=list(STUDENTS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--windows", default="last", choices=["last", "all"])
    ap.add_argument("--negatives", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--score-norm", default="std", choices=["none", "std"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/interaction-students-ml.json")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (repeatable), e.g. --set 'distill.teacher_scale={ease: 0.3}'")
    ap.add_argument("--pool", nargs="+", metavar="REPORT",
                    help="train nothing: pool the runs of these reports (the same experiment, other seeds) into --out")
    args = ap.parse_args(argv)
    if args.pool:
        pooled = pool_reports(args.pool)
        print(pooled["table"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(pooled, indent=2))
        return 0
    if not args.shards:
        ap.error("--shards is required (or --pool REPORT ...)")

    _, split = load_split(args.dataset)
    runs: dict[str, dict[str, list[dict]]] = {}
    t0 = time.time()
    for student in args.students:
        for variant, overrides in VARIANTS.items():
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                raw = base_config(args.dataset, student, args.shards, args)
                raw["run"]["seed"] = seed
                raw["run"]["out_dir"] = f"runs/bench-interaction/{student}/{variant.replace(' ', '_')}/{seed}"
                cfg = config_from_dict(raw, "benchmarks/interaction_students.py", [*args.overrides, *overrides])
                t = time.time()
                res = train_distilled(cfg, split)
                runs.setdefault(student, {}).setdefault(variant, []).append(
                    {"seed": seed, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
                     "seconds": time.time() - t, "valid": res.valid, "test": res.test})
                print(f"{student} | {variant} | seed {seed}: valid NDCG@10 {res.valid['NDCG@10']:.4f} test NDCG@10 "
                      f"{res.test['NDCG@10']:.4f} (best epoch {res.best_epoch}, {time.time() - t:.0f} s)", flush=True)

    table, summary = summarise(runs)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "args": vars(args),
        "hparams": {s: STUDENTS[s] for s in args.students}, "seconds": time.time() - t0,
        "summary": summary, "runs": runs, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
