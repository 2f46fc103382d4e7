"""Table of finished training runs grouped into variants: mean +- std over seeds, relative to a baseline.

The quality rows of ``benchmarks/RESULTS.md`` that come from separate ``prmkd-dist train`` runs (one per seed and
variant, queued one at a time on a small machine) are summarised by this script from the runs' own outputs
(``results.json``: validation-selected metrics and the test split read once; ``config.yaml``: the seed), so that a
table can be rebuilt from the run directories rather than copied by hand.

    .venv/bin/python benchmarks/runs_table.py \\
        --variant "no distillation=runs/games-gru4rec-nokd-s*" \\
        --variant "EASE + ID transformer=runs/games-gru4rec-2t-s*" \\
        --command "no distillation=prmkd-dist train --config distill-gru4rec-games --set distill.lambda_kd=0 ..." \\
        --baseline "no distillation" --out benchmarks/results/distill-games-gru4rec.json

Prints a markdown table (valid NDCG@10, test NDCG@10, test NDCG@20 with the per-seed values, test HR@10, sampled
HR@10 / NDCG@10, NDCG@20 against the baseline, best epochs) and writes the per-run metrics as JSON. A run directory
without ``results.json`` (unfinished or failed) is an error naming it, not a silently smaller mean.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml


def _split_spec(spec: str, what: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise SystemExit(f"--{what} {spec!r}: expected NAME=VALUE")
    return name.strip(), value.strip()


def load_run(run_dir: Path) -> dict:
    """One run's seed, best epoch and metrics (valid, test, test_sampled) from its output directory."""
    results, config = run_dir / "results.json", run_dir / "config.yaml"
    if not results.is_file():
        raise SystemExit(f"{run_dir}: no results.json (the run did not finish)")
    res = json.loads(results.read_text())
    seed = yaml.safe_load(config.read_text())["run"]["seed"] if config.is_file() else None
    return {"dir": str(run_dir), "seed": seed, "best_epoch": res.get("best_epoch"),
            **{k: res[k] for k in ("valid", "test", "test_sampled") if k in res}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], per_seed: bool = False) -> str:
    m, s = _mean_std(values)
    out = f"{m:.4f} ± {s:.4f}" if len(values) > 1 else f"{m:.4f}"
    if per_seed and len(values) > 1:
        out += " (" + ", ".join(f"{v:.4f}" for v in values) + ")"
    return out


def summarise(variants: dict[str, list[dict]], baseline: str | None) -> str:
    def col(runs, split, metric):
        return [r[split][metric] for r in runs if split in r]

    base = None
    if baseline is not None:
        if baseline not in variants:
            raise SystemExit(f"--baseline {baseline!r}: not one of the variants {list(variants)}")
        base = statistics.fmean(col(variants[baseline], "test", "NDCG@20"))
    lines = ["| variant | seeds | valid NDCG@10 | test NDCG@10 | test NDCG@20 (per seed) | test HR@10 "
             "| sampled HR@10 / NDCG@10 | NDCG@20 vs baseline | best epochs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in variants.items():
        ndcg20 = col(runs, "test", "NDCG@20")
        sampled = (f"{statistics.fmean(col(runs, 'test_sampled', 'HR@10')):.4f} / "
                   f"{statistics.fmean(col(runs, 'test_sampled', 'NDCG@10')):.4f}"
                   if col(runs, "test_sampled", "HR@10") else "-")
        rel = "" if base is None or name == baseline else f"{100 * (statistics.fmean(ndcg20) / base - 1):+.1f} %"
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines.append(f"| {name} | {len(runs)} ({seeds}) | {_fmt(col(runs, 'valid', 'NDCG@10'))} "
                     f"| {_fmt(col(runs, 'test', 'NDCG@10'))} | {_fmt(ndcg20, per_seed=True)} "
                     f"| {_fmt(col(runs, 'test', 'HR@10'))} | {sampled} | {rel} "
                     f"| {', '.join(str(r['best_epoch']) for r in runs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=GLOB",
                    help="a variant and the glob of its run directories (repeat; report order)")
    ap.add_argument("--command", action="append", default=[], metavar="NAME=COMMAND",
                    help="the command that trained a variant's runs (recorded in the JSON)")
    ap.add_argument("--baseline", default=None, help="the variant the NDCG@20 column is relative to")
    ap.add_argument("--machine", default="2-core Intel Xeon VM")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    variants: dict[str, list[dict]] = {}
    for spec in args.variant:
        name, pattern = _split_spec(spec, "variant")
        dirs = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_dir())
        if not dirs:
            raise SystemExit(f"--variant {name!r}: no run directory matches {pattern!r}")
        variants[name] = sorted((load_run(d) for d in dirs), key=lambda r: (r["seed"] is None, r["seed"]))
    commands = dict(_split_spec(c, "command") for c in args.command)
    unknown = set(commands) - set(variants)
    if unknown:
        raise SystemExit(f"--command for unknown variants {sorted(unknown)}")

    print(summarise(variants, args.baseline))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": args.machine, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "command": "benchmarks/runs_table.py " + " ".join(sys.argv[1:]) if argv is None else None,
            "baseline": args.baseline,
            "variants": {n: {"command": commands.get(n), "runs": runs} for n, runs in variants.items()},
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
