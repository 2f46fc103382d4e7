"""`prmkd-dist shards inspect|validate|stats|merge` (docs/shards.md)."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import pad_ragged
from prmkd_dist.data.merge import merge_teacher_shards
from prmkd_dist.data.shards import ShardFormatError, ShardSet, list_parts, validate_shards


def inspect_shards(root: str) -> dict:
    """Metadata, rows, files, row groups and teachers of a shard dataset (footers only)."""
    ss = ShardSet.open(root)
    m = ss.meta
    return {
        "root": root,
        "schema_version": m.version,
        "num_items": m.num_items,
        "item_fingerprint": m.item_fingerprint,
        "producer": m.producer,
        "rows": ss.num_rows,
        "row_groups": ss.num_row_groups,
        "files": [{"file": f.path, "rows": f.num_rows, "row_groups": len(f.row_group_rows)} for f in ss.files],
        "teachers": [{"name": t.name, "k": t.k, "score_semantics": t.score_semantics, "producer": t.producer}
                     for t in m.teachers],
    }


def shard_stats(root: str) -> dict:
    """Per teacher: filled slots, score range, catalog coverage, target hit rate; per teacher pair:
    mean overlap |A & B| / max(|A|, 1) of their lists on the same row. One streaming pass."""
    ss = ShardSet.open(root)
    m = ss.meta
    T = len(m.teachers)
    seen = np.zeros((T, m.num_items), dtype=bool)
    filled = np.zeros(T, np.int64)
    empty_rows = np.zeros(T, np.int64)
    hits = np.zeros(T, np.int64)
    smin = np.full(T, np.inf)
    smax = np.full(T, -np.inf)
    ssum = np.zeros(T)
    overlap = np.zeros((T, T))
    rows = with_target = 0
    for _, _, tab in ss.iter_row_groups():
        n = len(tab)
        rows += n
        tgt = np.asarray(tab.column("target"))
        with_target += int((tgt != PAD_ID).sum())
        dense = []
        for j, t in enumerate(m.teachers):
            off, ids = list_parts(tab.column(t.ids_column))
            soff, sc = list_parts(tab.column(t.scores_column))
            v, s = ids[off[0] : off[-1]], sc[soff[0] : soff[-1]]
            seen[j, v] = True
            filled[j] += len(v)
            empty_rows[j] += int((np.diff(off) == 0).sum())
            if len(s):
                smin[j], smax[j], ssum[j] = min(smin[j], s.min()), max(smax[j], s.max()), ssum[j] + float(s.sum(dtype=np.float64))
            d = pad_ragged(off, ids, t.k, PAD_ID, np.int64, "first")
            hits[j] += int(((d == tgt[:, None]) & (tgt[:, None] != PAD_ID)).any(axis=1).sum())
            dense.append(d)
        for a in range(T):
            size_a = np.maximum((dense[a] != PAD_ID).sum(axis=1), 1)
            for b in range(T):
                if a != b:
                    inter = ((dense[a][:, :, None] == dense[b][:, None, :]) & (dense[a][:, :, None] != PAD_ID)).sum(axis=(1, 2))
                    overlap[a, b] += float((inter / size_a).sum())
    out = {"root": root, "rows": rows, "rows_with_target": with_target, "teachers": {}}
    for j, t in enumerate(m.teachers):
        out["teachers"][t.name] = {
            "k": t.k,
            "score_semantics": t.score_semantics,
            "mean_list_length": filled[j] / max(rows, 1),
            "empty_rows": int(empty_rows[j]),
            "score_min": float(smin[j]) if filled[j] else None,
            "score_max": float(smax[j]) if filled[j] else None,
            "score_mean": ssum[j] / filled[j] if filled[j] else None,
            "catalog_coverage": float(seen[j].mean()),
            "target_hit_rate": hits[j] / max(with_target, 1),
            "overlap_with": {u.name: overlap[j, i] / max(rows, 1) for i, u in enumerate(m.teachers) if i != j},
        }
    return out


def _catalog(path: str | None) -> tuple[int | None, str | None]:
    if path is None:
        return None, None
    from prmkd_dist.data.dataset import InteractionData

    data = InteractionData.load(path)
    return data.num_items, data.fingerprint


def _cmd_inspect(args) -> int:
    info = inspect_shards(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['root']}: {info['rows']} rows in {len(info['files'])} file(s), {info['row_groups']} row group(s)")
    print(f"schema version {info['schema_version']}, num_items {info['num_items']}, "
          f"item fingerprint {info['item_fingerprint']}, producer {info['producer']!r}")
    for t in info["teachers"]:
        print(f"  teacher {t['name']}: K={t['k']}, scores are {t['score_semantics']}, producer {t['producer']!r}")
    for f in info["files"]:
        print(f"  {f['file']}: {f['rows']} rows, {f['row_groups']} row group(s)")
    return 0


def _cmd_validate(args) -> int:
    num_items, fp = _catalog(args.catalog)
    summary = validate_shards(args.dir, num_items=num_items, item_fingerprint=fp)
    print(f"OK {summary['root']}: {summary['rows']} rows, {summary['files']} file(s), "
          f"{summary['row_groups']} row group(s), teachers {summary['teachers']}"
          + (f", catalog {args.catalog} matches" if args.catalog else ""))
    return 0


def _cmd_stats(args) -> int:
    st = shard_stats(args.dir)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{st['root']}: {st['rows']} rows, {st['rows_with_target']} with a target")
    names = list(st["teachers"])
    print("| teacher | K | scores | mean len | empty rows | score min | score max | coverage | target hit | "
          + " | ".join(f"overlap {n}" for n in names) + " |")
    print("|" + "---|" * (9 + len(names)))
    for n, t in st["teachers"].items():
        fmt = lambda x: "-" if x is None else f"{x:.4g}"  # noqa: E731
        print(f"| {n} | {t['k']} | {t['score_semantics']} | {t['mean_list_length']:.2f} | {t['empty_rows']} | "
              f"{fmt(t['score_min'])} | {fmt(t['score_max'])} | {t['catalog_coverage']:.3f} | {t['target_hit_rate']:.3f} | "
              + " | ".join("-" if o == n else f"{t['overlap_with'][o]:.3f}" for o in names) + " |")
    return 0


def _cmd_merge(args) -> int:
    rep = merge_teacher_shards(args.inputs, args.out, allow_missing=args.allow_missing,
                               num_buckets=args.num_buckets, overwrite=args.overwrite,
                               rows_per_row_group=args.rows_per_row_group, tmp_dir=args.tmp_dir)
    print(f"merged {len(args.inputs)} input(s) into {rep.out_dir}: {rep.rows_out} rows, teachers {rep.teachers}, "
          f"{rep.num_buckets} bucket(s)")
    if rep.rows_missing:
        print(f"dropped {rep.rows_missing} example key(s) missing from some input "
              f"({', '.join(f'{k}: {v}' for k, v in rep.missing_per_input.items() if v)}); e.g. {rep.sample_missing_keys}")
    return 0


def _guard(fn):
    """Contract violations are user errors: one clear line on stderr, exit code 1."""
    def run(args) -> int:
        try:
            return fn(args)
        except (ShardFormatError, FileExistsError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return run


def register(subparsers) -> None:
    p = subparsers.add_parser("shards", help="inspect, validate, summarise and merge teacher-score shards")
    sub = p.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    q = sub.add_parser("inspect", help="metadata, rows, files, row groups, teachers and K (footers only)")
    q.add_argument("dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_guard(_cmd_inspect))

    q = sub.add_parser("validate", help="full scan against the contract (exit 1 with the first problem)")
    q.add_argument("dir")
    q.add_argument("--catalog", help="prepared dataset dir whose item fingerprint/num_items the shards must match")
    q.set_defaults(func=_guard(_cmd_validate))

    q = sub.add_parser("stats", help="per-teacher list lengths, score ranges, catalog coverage, overlaps")
    q.add_argument("dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_guard(_cmd_stats))

    q = sub.add_parser("merge", help="join per-teacher exports by example_key (out-of-core)")
    q.add_argument("inputs", nargs="+", metavar="IN")
    q.add_argument("--out", required=True)
    q.add_argument("--allow-missing", action="store_true", help="drop (and report) keys absent from some input")
    q.add_argument("--num-buckets", type=int, default=None,
                   help="hash buckets; memory ~ one bucket of every input (default: rows of the largest input / 1M)")
    q.add_argument("--rows-per-row-group", type=int, default=8192)
    q.add_argument("--tmp-dir", default=None, help="where bucket files go (default: system temp)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=_guard(_cmd_merge))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prmkd-dist")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
