"""`prmkd-dist data prepare|combine|stats`: prepare a dataset into its canonical form, combine prepared datasets
into one multi-domain dataset, print statistics."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prmkd_dist.data.dataset import InteractionData
from prmkd_dist.data.prepare import (
    builtin_datasets,
    combine_prepared,
    dataset_statistics,
    default_out_dir,
    load_dataset,
    prepare_dataset,
    read_provenance,
    resolve_reader_config,
    with_kcore,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data prepare` and `data stats` to the `prmkd-dist` parser."""
    data = subparsers.add_parser("data", help="prepare datasets and show their statistics")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    prep = sub.add_parser("prepare", help="read a dataset into the canonical form (docs/data.md)")
    src = prep.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="NAME", help=f"builtin dataset: {', '.join(builtin_datasets())}")
    src.add_argument("--config", metavar="FILE", help="reader config YAML for your own data (docs/data.md)")
    prep.add_argument("--out", metavar="DIR", help="output directory (default: <artifacts>/data/<name>, <artifacts> = $PRMKD_ARTIFACTS or ./artifacts)")
    prep.add_argument("--kcore", type=int, metavar="K", help="k-core filter, overriding the config (name gets -<K>core)")
    prep.add_argument("--force", action="store_true", help="rebuild even if prepared from identical inputs")
    prep.set_defaults(func=_prepare)

    comb = sub.add_parser("combine", help="several prepared datasets as the domains of one (prmkd_dist.data.domains)")
    comb.add_argument("datasets", nargs="+", metavar="DATASET", help="prepared datasets (names or directories), in domain order")
    comb.add_argument("--name", help="the combined dataset's name (default: the names joined by '+')")
    comb.add_argument("--out", metavar="DIR", help="output directory (default: <artifacts>/data/<name>)")
    comb.add_argument("--force", action="store_true", help="replace an existing dataset in --out")
    comb.set_defaults(func=_combine)

    stats = sub.add_parser("stats", help="statistics of a prepared dataset")
    stats.add_argument("dir", metavar="DIR", help="prepared dataset directory (or the name of a prepared dataset)")
    stats.set_defaults(func=_stats)


def _file_identity(path: Path) -> tuple[int, int] | None:
    st = path.stat() if path.is_file() else None
    return (st.st_ino, st.st_mtime_ns) if st else None


def _prepare(args: argparse.Namespace) -> int:
    started = time.time()
    try:
        config = with_kcore(resolve_reader_config(args.dataset or args.config), args.kcore)
        out = Path(args.out) if args.out else default_out_dir(config.name)
        before = _file_identity(out / "meta.json")  # a rebuild swaps in a new meta.json file
        data = prepare_dataset(config, out_dir=out, force=args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rebuilt = _file_identity(out / "meta.json") != before
    status = f"prepared in {time.time() - started:.1f}s" if rebuilt else "already prepared from identical inputs (--force rebuilds)"
    print(format_statistics(data, out, status))
    return 0


def _combine(args: argparse.Namespace) -> int:
    started = time.time()
    try:
        data, written = combine_prepared(args.datasets, args.name, args.out, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else default_out_dir(data.name)
    status = f"combined in {time.time() - started:.1f}s" if written else "already combined from identical inputs (--force rebuilds)"
    print(format_statistics(data, out, status))
    for d in data.domains:
        print(f"domain {d.name}: items [{d.items[0]}, {d.items[1]}), users [{d.users[0]}, {d.users[1]})")
    return 0


def _stats(args: argparse.Namespace) -> int:
    try:
        data = load_dataset(args.dir) if not Path(args.dir).is_dir() else InteractionData.load(args.dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.dir) if Path(args.dir).is_dir() else default_out_dir(str(args.dir))
    print(format_statistics(data, out, None))
    return 0


def format_statistics(data: InteractionData, directory: Path, status: str | None) -> str:
    """The statistics table printed by `data prepare` and `data stats`."""
    s = dataset_statistics(data)
    rows = [
        ("dataset", s["name"]),
        ("directory", str(directory)),
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        ("density", f"{100 * s['density']:.4f}%"),
        ("sequence length", f"min {s['seq_len_min']:,}  median {s['seq_len_median']:g}  mean {s['seq_len_mean']:.2f}"
                            f"  p90 {s['seq_len_p90']:g}  max {s['seq_len_max']:,}"),
        ("train interactions", f"{s['train_interactions']:,}"),
        ("valid users", f"{s['valid_users']:,}"),
        ("test users", f"{s['test_users']:,}"),
        ("users with < 3", f"{s['users_without_eval']:,} (training only, no valid/test target)"),
        ("items with text", f"{s['items_with_text']:,}"),
        ("k-core", str(s["kcore"]) if s["kcore"] else "none"),
        ("item fingerprint", s["item_fingerprint"]),
    ]
    prov = read_provenance(directory)
    if prov is not None:
        r = prov["report"]
        rows.append(("rows read", f"{r['rows_read']:,} (below min_rating {r['rows_below_min_rating']:,}, "
                                  f"removed by k-core {r['rows_removed_by_kcore']:,})"))
        if r["text_rows_read"]:
            rows.append(("text rows read", f"{r['text_rows_read']:,} ({r['text_rows_outside_catalog']:,} for items outside the catalog)"))
    if status:
        rows.append(("status", status))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
