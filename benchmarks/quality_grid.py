"""The issue-5 quality grid: several ``benchmarks/quality.py`` reports side by side, and the three goals checked.

Each report (one dataset, one student, one set of teacher shards) becomes a column; the rows are the variants
(no distillation, each teacher alone, uniform, conf+cons, + ranking, + embedding, + curriculum, MKD) in the
order the reports list them. A cell is the mean ± std over seeds of one metric (default test NDCG@20, the
issue's goal metric) and its change against the same report's "no distillation" runs; a cell with fewer runs
than its report's seeds (an unfinished report) says how many it has.

The goals are checked without looking at the test split to choose: in each column the multi-teacher variant
and the single-teacher variant with the best *validation* NDCG@10 are picked, then their test metric is compared
with no distillation (goal: at least +20 %) and with each other (goal: multi-teacher above the best single
teacher; a teacher's lists with the item embeddings, "teacher X alone + embedding distillation", count as single
teacher, so the mix must beat the embeddings too). ``--teacher`` gives a teacher's own value of the metric on a dataset, for the third goal (the student
reaching the best of the teachers it learned from).

    .venv/bin/python benchmarks/quality_grid.py benchmarks/results/quality-ml-{gru4rec,caser}-slist-unisrec-grid.json \\
        --teacher "ml-latest-small:slist=0.0982" --out benchmarks/results/quality-grid-ml.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE = "no distillation"
SELECT_ON = "valid NDCG@10"
GOAL_GAIN_PCT = 20.0


def load_report(path: str) -> dict:
    """A quality.py report; ValueError naming the file and the missing field for anything else."""
    try:
        report = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    for key in ("dataset", "config", "teachers", "seeds", "results"):
        if key not in report:
            raise ValueError(f"{path}: no {key!r} field; expected a report written by benchmarks/quality.py")
    if BASELINE not in report["results"]:
        raise ValueError(f"{path}: no {BASELINE!r} variant, so no change can be computed against it")
    return report


def _student(config: str) -> str:
    # packaged configs are distill-<student>-<dataset>; any other config name is shown as it is
    parts = config.split("-")
    return parts[1] if len(parts) >= 3 and parts[0] == "distill" else config


def _mean_std(runs: list[dict], metric: str, path: str, variant: str) -> tuple[float, float]:
    stage, _, name = metric.partition(" ")
    try:
        vals = [float(r[stage][name]) for r in runs]
    except KeyError as e:
        raise ValueError(f"{path}: variant {variant!r} has a run without {metric!r} ({e})") from e
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, std


def is_single_teacher(variant: str) -> bool:
    """One teacher's lists: "teacher X alone", and its embedding control "teacher X alone + embedding distillation"
    (whose item embeddings may be another teacher's: counted as single, the stricter bar for the multi-teacher goal)."""
    return variant.startswith("teacher ") and (variant.endswith(" alone") or " alone + " in variant)


def column(path: str, report: dict, metric: str) -> dict:
    """One report's cells {variant: {mean, std, runs, change_pct}} and its validation-selected goal picks."""
    n_seeds = len(report["seeds"])
    cells = {}
    for variant, res in report["results"].items():
        runs = res.get("runs") or []
        if not runs:
            continue
        mean, std = _mean_std(runs, metric, path, variant)
        sel, _ = _mean_std(runs, SELECT_ON, path, variant)
        cells[variant] = {"mean": mean, "std": std, "runs": len(runs), "seeds": n_seeds, "select": sel}
    base = cells[BASELINE]["mean"]
    for variant, c in cells.items():
        c["change_pct"] = None if variant == BASELINE or base <= 0 else (c["mean"] / base - 1.0) * 100.0

    def pick(pred) -> str | None:
        names = [v for v in cells if v != BASELINE and pred(v)]
        return max(names, key=lambda v: cells[v]["select"]) if names else None

    return {"file": path, "dataset": report["dataset"], "student": _student(report["config"]),
            "teachers": list(report["teachers"]), "cells": cells,
            "best_single": pick(is_single_teacher), "best_multi": pick(lambda v: not is_single_teacher(v))}


def goals(col: dict, teacher_metric: dict[str, float]) -> dict:
    cells = col["cells"]
    out = {"best_multi": col["best_multi"], "best_single": col["best_single"]}
    if col["best_multi"]:
        m = cells[col["best_multi"]]
        out["multi_change_pct"] = m["change_pct"]
        out["gain_goal_met"] = m["change_pct"] is not None and m["change_pct"] >= GOAL_GAIN_PCT
        if col["best_single"]:
            s = cells[col["best_single"]]["mean"]
            out["multi_vs_single_pct"] = (m["mean"] / s - 1.0) * 100.0
            out["multi_above_single"] = m["mean"] > s
        if teacher_metric:
            best_t = max(teacher_metric, key=teacher_metric.get)
            out["best_teacher"] = best_t
            out["student_vs_best_teacher_pct"] = (m["mean"] / teacher_metric[best_t] - 1.0) * 100.0
            out["student_reaches_best_teacher"] = m["mean"] >= teacher_metric[best_t]
    return out


def _cell_text(c: dict | None) -> str:
    if c is None:
        return "not run"
    text = f"{c['mean']:.4f} ± {c['std']:.4f}"
    if c["change_pct"] is not None:
        text += f" ({c['change_pct']:+.1f} %)"
    if c["runs"] < c["seeds"]:
        text += f" [{c['runs']} of {c['seeds']} seeds]"
    return text


def _teacher_and_rest(variant: str) -> tuple[str, str]:
    """("slist", " + embedding distillation") for "teacher slist alone + embedding distillation"."""
    name, _, rest = variant[len("teacher "):].partition(" alone")
    return name, rest


def row_label(variant: str, teachers: list[str]) -> str:
    """The row a variant shows in: a single-teacher variant by the teacher's place in its report's teacher list
    ("teacher #2 alone"), so that columns with other teachers line up (the cell names the teacher)."""
    if is_single_teacher(variant):
        name, rest = _teacher_and_rest(variant)
        if name in teachers:
            return f"teacher #{teachers.index(name) + 1} alone{rest}"
    return variant


def render(cols: list[dict], metric: str, goal_rows: list[dict]) -> str:
    rows: list[str] = []
    by_row = []  # per column {row label: (variant, cell)}
    for col in cols:
        cells = {row_label(v, col["teachers"]): (v, c) for v, c in col["cells"].items()}
        rows += [r for r in cells if r not in rows]
        by_row.append(cells)
    # quality.py's report order over teachers #1..#n; names it does not know last, as they came
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import variants

    n = max((len(c["teachers"]) for c in cols), default=0)
    order = list(variants([f"#{i + 1}" for i in range(n)], True, 0.0, 0))
    rows.sort(key=lambda r: order.index(r) if r in order else len(order))

    def text(entry) -> str:
        if entry is None:
            return "not run"
        variant, cell = entry
        named = _teacher_and_rest(variant)[0] + ": " if is_single_teacher(variant) else ""
        return named + _cell_text(cell)

    heads = [f"{c['dataset']} {c['student']} ({' + '.join(c['teachers'])})" for c in cols]
    lines = [f"| variant ({metric}, mean ± std, vs no KD) | " + " | ".join(heads) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r} | " + " | ".join(text(cells.get(r)) for cells in by_row) + " |")

    def fmt(x, suffix=" %"):
        return "-" if x is None else f"{x:+.1f}{suffix}"

    lines.append(f"| **multi-teacher, validation-selected** | " + " | ".join(
        "-" if not g.get("best_multi") else f"{g['best_multi']}: {fmt(g['multi_change_pct'])} "
        f"({'meets' if g['gain_goal_met'] else 'below'} +{GOAL_GAIN_PCT:.0f} %)" for g in goal_rows) + " |")
    lines.append(f"| **vs the validation-selected single teacher** | " + " | ".join(
        "-" if "multi_vs_single_pct" not in g else f"{g['best_single']}: {fmt(g['multi_vs_single_pct'])}"
        for g in goal_rows) + " |")
    if any("best_teacher" in g for g in goal_rows):
        lines.append(f"| **vs the best teacher itself** | " + " | ".join(
            "-" if "best_teacher" not in g else f"{g['best_teacher']}: {fmt(g['student_vs_best_teacher_pct'])}"
            for g in goal_rows) + " |")
    return "\n".join(lines)


def parse_teachers(specs: list[str]) -> dict[str, dict[str, float]]:
    """``DATASET:NAME=VALUE`` -> {dataset: {name: value}}; ValueError naming the spec otherwise."""
    out: dict[str, dict[str, float]] = {}
    for spec in specs:
        head, eq, value = spec.partition("=")
        dataset, colon, name = head.partition(":")
        try:
            val = float(value)
        except ValueError:
            val = float("nan")
        if not (eq and colon and dataset and name) or not val == val or val <= 0:
            raise ValueError(f"--teacher {spec!r}: expected DATASET:NAME=VALUE with a positive metric value")
        out.setdefault(dataset, {})[name] = val
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="benchmarks/quality.py JSON reports, one column each")
    ap.add_argument("--metric", default="test NDCG@20", help="'<valid|test> <metric>' shown in the cells")
    ap.add_argument("--teacher", action="append", default=[], metavar="DATASET:NAME=VALUE",
                    help="a teacher's own value of --metric on a dataset (repeatable)")
    ap.add_argument("--out", help="write the grid and the goal checks as JSON")
    args = ap.parse_args(argv)
    try:
        teachers = parse_teachers(args.teacher)
        cols = [column(p, load_report(p), args.metric) for p in args.reports]
    except ValueError as e:
        ap.error(str(e))
    # a column is compared only with the teachers it learned from
    goal_rows = [goals(c, {n: v for n, v in teachers.get(c["dataset"], {}).items() if n in c["teachers"]})
                 for c in cols]
    table = render(cols, args.metric, goal_rows)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"metric": args.metric, "selected_on": SELECT_ON, "columns": cols,
                                              "goals": goal_rows, "teachers": teachers, "table": table,
                                              "command": " ".join(sys.argv)}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
