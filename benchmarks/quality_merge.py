"""Merge ``benchmarks/quality.py`` reports of the same experiment that were filled by separate processes.

On a small machine one grid is run in lanes side by side (each lane its own ``--out``, one intra-op thread);
this joins them into one report for ``quality_grid.py`` and the RESULTS tables. Reports merge only when their
runs are comparable: the same dataset, config, shards, teacher embeddings and ``--set`` overrides; a variant may
appear in more than one report only with the same run for every seed both hold (a borrowed baseline, say, taken
for two seeds by one lane and three by the other: the merge keeps every seed), and reports that record the content
digests of their shards and embeddings must record the same ones. The merged report's seeds are all the lanes'
seeds (a lane that ran fewer shows as such in ``quality_grid.py``). Two differences are not differences of the
experiment and are allowed: the intra-op thread count (``--set run.num_threads=N``: each run records its threads; the
merged report lists every lane's under ``execution_overrides``), and a lane given no teacher embeddings beside lanes
given them, when none of its variants uses embeddings (``quality.py`` only makes the embedding variants when it has
them; the merged report carries the lanes' embeddings). Anything else is an error naming the file and the field.

    .venv/bin/python benchmarks/quality_merge.py lane-a.json lane-b.json --out grid.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py beside this script

SAME = ("dataset", "config", "shards", "teacher_embeddings", "overrides", "teachers")
# overrides that change how fast a run goes, not what it computes (up to float reduction order)
EXECUTION_ONLY = ("run.num_threads=",)


def _experiment_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(EXECUTION_ONLY)]


def merge(paths: list[str]) -> dict:
    from quality import earlier_commands, in_report_order, summarise, variants

    reports = []
    for p in paths:
        try:
            r = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read a quality.py report ({e})") from e
        missing = [k for k in (*SAME, "seeds", "results") if k not in r]
        if missing:
            raise ValueError(f"{p}: no {missing[0]!r} field; expected a report written by benchmarks/quality.py")
        reports.append(r)
    # the reference lane: the first given embeddings, if any was (the others are checked against it below)
    ref = next((i for i, r in enumerate(reports) if r["teacher_embeddings"]), 0)
    first, first_path = reports[ref], paths[ref]
    # the variants quality.py makes only when it is given embeddings
    needs_embeddings = set(variants(first["teachers"], True, 0.0, 0)) - set(variants(first["teachers"], False, 0.0, 0))
    for p, r in zip(paths, reports):
        for key in SAME:
            mine, theirs = r[key], first[key]
            if key == "overrides":
                mine, theirs = _experiment_overrides(mine), _experiment_overrides(theirs)
            if key == "teacher_embeddings" and not mine and theirs:
                using = sorted(set(r["results"]) & needs_embeddings)
                if not using:
                    continue  # a lane of KL-only variants: the embeddings would not have entered its runs
                raise ValueError(f"{p}: its teacher_embeddings is [] but it holds {using[0]!r}, which uses them; "
                                 f"{first_path}'s are {theirs!r}: runs not comparable")
            if mine != theirs:
                raise ValueError(f"{p}: its {key} is {r[key]!r}, {first_path}'s is {first[key]!r}: runs not comparable")
    # content digests (reports since 2026-12-06): two lanes at one shards path may still have seen other files.
    # The embeddings' digests are compared among the lanes given embeddings (a KL-only lane records none).
    digests = [(p, r.get("content_digests")) for p, r in zip(paths, reports)]
    known = [(p, d) for p, d in digests if d is not None]
    with_embeddings = [(p, d) for p, d in known if d["teacher_embeddings"]]
    for part, lanes in (("shards", known), ("teacher_embeddings", with_embeddings)):
        for p, d in lanes[1:]:
            if d[part] != lanes[0][1][part]:
                raise ValueError(f"{p}: its content_digests are {d!r}, {lanes[0][0]}'s are {lanes[0][1]!r}: "
                                 f"the lanes distilled from different files at the same paths")
    unchecked = [p for p, d in digests if d is None]
    if unchecked and len(paths) > 1:
        print(f"warning: {', '.join(unchecked)} record no content digests: cannot check that every lane "
              f"distilled from the same files", file=sys.stderr)
    results: dict[str, dict] = {}
    source: dict[str, str] = {}

    for p, r in zip(paths, reports):
        for name, res in r["results"].items():
            if name not in results:
                results[name], source[name] = res, p
                continue
            have = {run["seed"]: run for run in results[name]["runs"]}
            new = {run["seed"]: run for run in res["runs"]}
            differ = sorted(s for s in set(have) & set(new) if have[s] != new[s])
            if differ:
                raise ValueError(f"{p}: variant {name!r} is also in {source[name]} with other runs (seed {differ[0]})")
            if set(new) - set(have):  # one lane ran more seeds of it (a borrowed baseline): keep them all
                both = {**have, **new}
                runs = [both[s] for s in sorted(both)]
                results[name] = {**results[name], "runs": runs}
                if "summary" in results[name]:
                    results[name]["summary"] = summarise(runs)

    order = list(variants(first["teachers"], bool(first["teacher_embeddings"]), 0.0, 0))
    seeds = sorted({s for r in reports for s in r["seeds"]})
    execution = {p: [o for o in r["overrides"] if o.startswith(EXECUTION_ONLY)] for p, r in zip(paths, reports)}
    extra = {"execution_overrides": execution} if len({tuple(v) for v in execution.values()}) > 1 else {}
    return {**{k: first[k] for k in SAME}, **extra, "seeds": seeds,
            "content_digests": None if unchecked else (with_embeddings or known)[0][1],
            "results": in_report_order(results, order), "table": None,
            "complete": all(r.get("complete", False) for r in reports),
            "seconds": sum(r.get("seconds", 0.0) for r in reports),
            "commands": [c for p in paths for c in earlier_commands(p)], "merged_from": list(paths)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="quality.py reports (variants come out in quality.py's order)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        merged = merge(args.reports)
    except ValueError as e:
        ap.error(str(e))
    Path(args.out).write_text(json.dumps(merged, indent=2))
    print(f"wrote {args.out}: {len(merged['results'])} variants from {len(args.reports)} reports "
          f"({'complete' if merged['complete'] else 'some unfinished'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
