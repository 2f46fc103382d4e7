"""`prmkd-dist export | recommend` sub-commands."""
from __future__ import annotations

import argparse
import json
import sys


def _user_error(e: ValueError) -> int:
    """Bad input (checkpoint, artifact, input file): one clear line on stderr, exit code 2."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def cmd_export(args: argparse.Namespace) -> int:
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.serve.export import export_student
    from prmkd_dist.train.trainer import load_checkpoint

    try:
        model, cfg, meta = load_checkpoint(args.checkpoint)
        data, split = load_split(args.dataset or cfg.data.dataset)
        # load again against the dataset: refuses a different item-id mapping (fingerprint)
        model, cfg, meta = load_checkpoint(args.checkpoint, split)
        out = export_student(model, data, args.out, config=cfg.to_dict(), ivf_lists=args.ivf_lists,
                             overwrite=args.overwrite)
    except ValueError as e:
        return _user_error(e)
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"exported {manifest['student']} ({manifest['num_parameters']:,} parameters, {size / 2**20:.1f} MiB) "
          f"to {out}; export check max |error| {manifest['export_check']['max_abs_error']:.2g}")
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from prmkd_dist.serve.recommend import recommend_file

    try:
        stats = recommend_file(args.artifact, args.input, args.output, k=args.k, raw_ids=args.raw_ids,
                               approximate=args.approximate, nprobe=args.nprobe, skip_unknown=args.skip_unknown,
                               exclude_seen=not args.include_seen, batch_size=args.batch_size,
                               user_col=args.user_col, history_col=args.history_col, progress=not args.no_progress)
    except ValueError as e:
        return _user_error(e)
    msg = f"{stats.rows} users -> {args.output} in {stats.seconds:.1f}s"
    if args.skip_unknown:
        msg += f"; skipped {stats.unknown_ids_skipped} unknown ids in {stats.rows_with_unknown_ids} rows"
    print(msg)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a trained student checkpoint as a serving artifact")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by `train`")
    p.add_argument("--out", required=True, help="artifact directory to write")
    p.add_argument("--dataset", help="dataset of the item ids (default: the one in the checkpoint's config)")
    p.add_argument("--ivf-lists", type=int, default=None,
                   help="k-means clusters for --approximate search (default ~sqrt(number of items))")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("recommend", help="top-K recommendations for histories in a file, from an artifact")
    p.add_argument("--artifact", required=True, help="directory written by `export`")
    p.add_argument("--input", required=True, help="histories: .parquet or .jsonl with a user key and a history list")
    p.add_argument("--output", required=True, help=".parquet or .jsonl: user key, items, scores")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--raw-ids", action="store_true",
                   help="histories hold the dataset's raw item ids; the output then holds raw ids too")
    p.add_argument("--skip-unknown", action="store_true",
                   help="with --raw-ids: drop unknown ids from histories and count them instead of failing")
    p.add_argument("--approximate", action="store_true", help="IVF search: score only the best clusters")
    p.add_argument("--nprobe", type=int, default=None, help="clusters probed by --approximate (default 10%%)")
    p.add_argument("--include-seen", action="store_true", help="do not exclude the history's items")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--user-col", default="user", help="user key column / JSON key (default: user)")
    p.add_argument("--history-col", default="history", help="history column / JSON key (default: history)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.set_defaults(func=cmd_recommend)
