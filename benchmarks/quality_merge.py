"""Merge ``benchmarks/quality.py`` reports of the same experiment that were filled by separate processes.

On a small machine one grid is run in lanes side by side (each lane its own ``--out``, one intra-op thread);
this joins them into one report for ``quality_grid.py`` and the RESULTS tables. Reports merge only when their
runs are comparable: the same dataset, config, shards, teacher embeddings and ``--set`` overrides; a variant may
appear in more than one report only with the same run for every seed both hold (a borrowed baseline, say, taken
for two seeds by one lane and three by the other: the merge keeps every seed), and reports that record the content
digests of their shards and embeddings must record the same ones. The merged report's seeds are all the lanes'
seeds (a lane that ran fewer shows as such in ``quality_grid.py``). Anything else is an error naming the file and
the field.

    .venv/bin/python benchmarks/quality_merge.py lane-a.json lane-b.json --out grid.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # quality.py beside this script

SAME = ("dataset", "config", "shards", "teacher_embeddings", "overrides", "teachers")


def merge(paths: list[str]) -> dict:
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
    first = reports[0]
    for p, r in zip(paths[1:], reports[1:]):
        for key in SAME:
            if r[key] != first[key]:
                raise ValueError(f"{p}: its {key} is {r[key]!r}, {paths[0]}'s is {first[key]!r}: runs not comparable")
    # content digests (reports since 2026-12-06): two lanes at one shards path may still have seen other files
    digests = [(p, r.get("content_digests")) for p, r in zip(paths, reports)]
    known = [(p, d) for p, d in digests if d is not None]
    for p, d in known[1:]:
        if d != known[0][1]:
            raise ValueError(f"{p}: its content_digests are {d!r}, {known[0][0]}'s are {known[0][1]!r}: "
                             f"the lanes distilled from different files at the same paths")
    unchecked = [p for p, d in digests if d is None]
    if unchecked and len(paths) > 1:
        print(f"warning: {', '.join(unchecked)} record no content digests: cannot check that every lane "
              f"distilled from the same files", file=sys.stderr)
    results: dict[str, dict] = {}
    source: dict[str, str] = {}
    from quality import earlier_commands, in_report_order, summarise, variants

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
    return {**{k: first[k] for k in SAME}, "seeds": seeds, "content_digests": None if unchecked else known[0][1],
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
