"""Quality benchmark of the students and baselines, validation-selected, several seeds.

For each dataset (ml-latest-small, amazon-games) and each model (SASRec, GRU4Rec, Caser from
``prmkd_dist/configs/<model>-<ml|games>.yaml``; Popularity and ItemKNN baselines), trains with early
stopping on validation NDCG@10 and reports the test metrics of the selected epoch as mean ± std over
seeds: full ranking HR/NDCG@10/20 and MRR, plus the SASRec-paper sampled protocol (100 negatives)
HR@10 / NDCG@10 (the SASRec paper reports HR@10 0.7410 / NDCG@10 0.5360 on Games).

    .venv/bin/python benchmarks/students.py --out benchmarks/results/students.json
    .venv/bin/python benchmarks/students.py --datasets ml --models sasrec popularity --seeds 1 --epochs 2

Prints a markdown table and writes every run's numbers to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from prmkd_dist.data.prepare import load_split
from prmkd_dist.models import ItemKNN, Popularity
from prmkd_dist.train.config import load_config
from prmkd_dist.train.evaluate import evaluate, evaluate_sampled
from prmkd_dist.train.trainer import train
from prmkd_dist.train.utils import format_table, seed_everything

DATASETS = {"ml": "ml-latest-small", "games": "amazon-games"}
STUDENTS = ("sasrec", "gru4rec", "caser")
BASELINES = ("popularity", "itemknn")
FULL = ["HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR"]
SAMPLED = ["HR@10", "NDCG@10"]


def run_student(model: str, ds: str, split, seed: int, args) -> dict:
    overrides = [f"run.seed={seed}", f"run.out_dir={Path(args.run_dir) / f'{model}-{ds}-s{seed}'}",
                 "run.progress=false", "eval.sampled=true", f"eval.num_negatives={args.num_negatives}", *args.set]
    if args.epochs:
        overrides.append(f"optim.epochs={args.epochs}")
    res = train(load_config(f"{model}-{ds}", overrides), split)
    return {"valid": res.valid, "test": res.test, "test_sampled": res.test_sampled, "best_epoch": res.best_epoch,
            "train_seconds": res.train_seconds}


def run_baseline(model: str, split, seed: int, max_len: int, args) -> dict:
    seed_everything(seed)
    t0 = time.perf_counter()
    scorer = Popularity.fit(split) if model == "popularity" else ItemKNN.fit(split)
    fit_s = time.perf_counter() - t0
    ev = dict(max_len=max_len, progress=False)
    return {"valid": evaluate(scorer, split, "valid", **ev), "test": evaluate(scorer, split, "test", **ev),
            "test_sampled": evaluate_sampled(scorer, split, "test", num_negatives=args.num_negatives, seed=seed,
                                             ks=(10,), **ev),
            "best_epoch": None, "train_seconds": fit_s}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_json(args, runs: list, table_full: dict, table_sampled: dict, complete: bool) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "complete": complete,
                               "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
                               "table_full": table_full, "table_sampled": table_sampled, "runs": runs}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=[*STUDENTS, *BASELINES], default=[*STUDENTS, *BASELINES])
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (first-seed, first-seed + 1, ...)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (to add seeds to an earlier run's JSON)")
    p.add_argument("--epochs", type=int, default=0, help="override optim.epochs (0 = the config's)")
    p.add_argument("--num-negatives", type=int, default=100)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every student config")
    p.add_argument("--run-dir", default="runs/bench-students")
    p.add_argument("--out", default="benchmarks/results/students.json")
    args = p.parse_args(argv)

    runs = []
    table_full, table_sampled = {}, {}
    for ds in args.datasets:
        _, split = load_split(DATASETS[ds])
        for model in args.models:
            per_seed = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                t0 = time.perf_counter()
                if model in STUDENTS:
                    r = run_student(model, ds, split, seed, args)
                else:
                    max_len = load_config(f"sasrec-{ds}").data.max_len  # same input window as the students
                    r = run_baseline(model, split, seed, max_len, args)
                r.update(dataset=DATASETS[ds], model=model, seed=seed, seconds=time.perf_counter() - t0)
                print(f"{DATASETS[ds]} {model} seed {seed}: test NDCG@10 {r['test']['NDCG@10']:.4f} "
                      f"({r['seconds']:.0f}s)", flush=True)
                per_seed.append(r)
                runs.append(r)
                write_json(args, runs, table_full, table_sampled, complete=False)  # survives an interrupted run
            row = f"{model} / {DATASETS[ds]}"
            table_full[row] = {m: mean_std([r["test"][m] for r in per_seed]) for m in FULL}
            table_sampled[row] = {m: mean_std([r["test_sampled"][m] for r in per_seed]) for m in SAMPLED}

    print(f"\n## Test, full ranking (validation-selected; mean ± std over {args.seeds} seeds)\n")
    print(format_table(table_full, FULL))
    print(f"\n## Test, sampled protocol ({args.num_negatives} negatives; SASRec paper on Games: HR@10 0.7410, NDCG@10 0.5360)\n")
    print(format_table(table_sampled, SAMPLED))
    print(f"\nwrote {write_json(args, runs, table_full, table_sampled, complete=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
