"""Quality of a saved teacher fed only each user's most recent L items, for several L.

The standard full-ranking protocol (validation and test, history items excluded), except that the scorer's
input is cut to the last L items: how much of a teacher's quality comes from recent items, and what a student
whose input window is L items could reach by imitating it.

    .venv/bin/python benchmarks/teacher_history.py --teacher artifacts/teachers/ml-latest-small/models/ease \
        --dataset ml-latest-small --lengths 10 25 50 200 3000 --out benchmarks/results/teacher-history-ml-ease.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from prmkd_dist.data.prepare import load_split
from prmkd_dist.teachers.base import load_teacher
from prmkd_dist.train.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="saved teacher directory (Teacher.save)")
    p.add_argument("--dataset", required=True, help="builtin name, reader YAML or prepared directory")
    p.add_argument("--lengths", nargs="+", type=int, default=[10, 25, 50, 200, 3000],
                   help="input history lengths L (a value above the longest history = the whole history)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    data, split = load_split(args.dataset)
    teacher = load_teacher(args.teacher, fingerprint=data.fingerprint)
    rows = []
    for length in args.lengths:
        t0 = time.perf_counter()
        kw = dict(ks=(10, 20), max_len=length, batch_size=256, progress=False)
        valid, test = evaluate(teacher, split, "valid", **kw), evaluate(teacher, split, "test", **kw)
        rows.append({"max_len": length, "valid": valid, "test": test, "seconds": time.perf_counter() - t0})
        print(f"L={length}: valid NDCG@10 {valid['NDCG@10']:.4f} test NDCG@10 {test['NDCG@10']:.4f}",
              file=sys.stderr, flush=True)
    print(f"{teacher.name} on {data.name}; full ranking, history items excluded; input = the last L items\n")
    print("| input history L | valid NDCG@10 | test NDCG@10 | test NDCG@20 | test HR@10 |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['max_len']} | {r['valid']['NDCG@10']:.4f} | {r['test']['NDCG@10']:.4f} | "
              f"{r['test']['NDCG@20']:.4f} | {r['test']['HR@10']:.4f} |")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"teacher": args.teacher, "dataset": args.dataset, "machine": platform.platform(),
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
