"""Inference cost of teachers and students side by side: parameters and ms per 1,000 users, one machine, one run.

Each model scores the whole catalog and takes its top-10 for the same validation histories (batches of 256,
one warm-up batch; ``prmkd_dist.teachers.pipeline.inference_ms_per_1k_users``, the measurement that
``prmkd-dist teachers train|eval|pipeline`` report), at ``--threads`` torch threads, repeated ``--repeats``
times in turn (A, B, ..., A, B, ...) so that a noisy minute hits every model alike; the median is reported.
Teachers are saved teacher directories (``teachers train`` / ``pipeline``), students ``prmkd-dist train``
checkpoints; both must belong to ``--dataset`` (the item fingerprint is checked).

    .venv/bin/python benchmarks/inference_cost.py --dataset amazon-games \\
        --teacher "ID transformer=artifacts/teachers/amazon-games/id-transformer" \\
        --teacher "EASE=artifacts/teachers/amazon-games/models/ease" \\
        --student "SASRec=runs/games-nokd-s1/checkpoint" --threads 1 --out benchmarks/results/inference-cost-games.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from prmkd_dist.data.prepare import load_split
from prmkd_dist.teachers.base import load_teacher
from prmkd_dist.teachers.pipeline import inference_ms_per_1k_users
from prmkd_dist.train.trainer import load_checkpoint
from prmkd_dist.train.utils import machine_description


def parameters(model) -> int:
    if hasattr(model, "num_parameters"):
        return int(model.num_parameters())
    return int(sum(t.numel() for t in model.state_dict().values()))


def measure(models: dict[str, tuple[str, object]], split, users: int, repeats: int) -> dict[str, dict]:
    """``models``: name -> (role, model with ``score(history) -> [B, C]``). Per model: role, parameters, the
    per-repeat ms per 1,000 users and their median."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (_, model) in models.items():
            times[name].append(inference_ms_per_1k_users(model, split, users=users))
    return {name: {"role": role, "params": parameters(model), "ms_per_1k_users": times[name],
                   "median_ms_per_1k_users": statistics.median(times[name])}
            for name, (role, model) in models.items()}


def table(results: dict[str, dict]) -> str:
    students = [r for r in results.values() if r["role"] == "student"]
    ref = students[0]["median_ms_per_1k_users"] if students else None
    lines = ["| model | role | parameters | ms / 1k users (median) | runs | vs first student |",
             "|---|---|---:|---:|---|---:|"]
    for name, r in results.items():
        runs = ", ".join(f"{t:.0f}" for t in r["ms_per_1k_users"])
        rel = f"{r['median_ms_per_1k_users'] / ref:.1f}x" if ref else ""
        lines.append(f"| {name} | {r['role']} | {r['params']:,} | {r['median_ms_per_1k_users']:.0f} | {runs} | {rel} |")
    return "\n".join(lines)


def _spec(spec: str, what: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise SystemExit(f"--{what} {spec!r}: expected NAME=DIRECTORY")
    return name.strip(), path.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--student", action="append", default=[], metavar="NAME=CHECKPOINT")
    ap.add_argument("--users", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--machine", default=machine_description())
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.teacher and not args.student:
        raise SystemExit("give at least one --teacher or --student")
    if args.users < 1 or args.repeats < 1:
        raise SystemExit("--users and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    data, split = load_split(args.dataset)
    models: dict[str, tuple[str, object]] = {}
    for spec in args.teacher:
        name, path = _spec(spec, "teacher")
        models[name] = ("teacher", load_teacher(path, fingerprint=data.fingerprint))
    for spec in args.student:
        name, path = _spec(spec, "student")
        models[name] = ("student", load_checkpoint(path, split)[0].eval())
    results = measure(models, split, args.users, args.repeats)
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join(["benchmarks/inference_cost.py"] + (argv if argv is not None else sys.argv[1:])),
            "machine": args.machine, "threads": args.threads, "users": args.users,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dataset": args.dataset, "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
