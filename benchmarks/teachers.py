"""Train (or fit) one built-in teacher on a dataset and report validation/test metrics and timings.

    .venv/bin/python benchmarks/teachers.py ease --dataset ml-latest-small
    .venv/bin/python benchmarks/teachers.py transition --dataset amazon-games --window 10 --decay 2 --l2-grid 50 200
    .venv/bin/python benchmarks/teachers.py transition --dataset amazon-games --alpha 0.5 --l2-grid 200   # SLIST
    .venv/bin/python benchmarks/teachers.py id-transformer --dataset ml-latest-small --dim 256 --layers 4
    .venv/bin/python benchmarks/teachers.py unisrec --dataset ml-latest-small --dim 256 --layers 2

The trained teacher is saved under artifacts/teachers/<dataset>/<name> (see ``prmkd_dist.teachers``); one
JSON line with the numbers is appended to artifacts/teachers/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from prmkd_dist.data.paths import artifacts_root
from prmkd_dist.data.prepare import load_split
from prmkd_dist.teachers import EASE, IDTransformerTeacher, ItemTransition, UniSRecTeacher
from prmkd_dist.teachers.ease import DEFAULT_L2_GRID
from prmkd_dist.teachers.training import fit_teacher
from prmkd_dist.train.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=["ease", "transition", "id-transformer", "unisrec"])
    p.add_argument("--dataset", default="ml-latest-small")
    p.add_argument("--name", default=None, help="output name (default: the kind)")
    p.add_argument("--l2-grid", type=float, nargs="+", default=None, help="EASE/transition (default: EASE DEFAULT_L2_GRID)")
    p.add_argument("--window", type=int, default=10, help="transition: previous items a position reads")
    p.add_argument("--decay", type=float, default=2.0, help="transition: positions over which a weight falls by e")
    p.add_argument("--alpha", type=float, default=0.0, help="transition: weight of SLIST's SLIS half (0 = SLIT)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--no-id", action="store_true", help="UniSRec: text only (no learned ID embedding)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="initial weights and training")
    args = p.parse_args(argv)

    data, split = load_split(args.dataset)
    name = args.name or args.kind
    out = artifacts_root() / "teachers" / data.name / name
    t0 = time.perf_counter()
    if args.kind == "ease":
        teacher = EASE.fit_select(split, grid=args.l2_grid or DEFAULT_L2_GRID, name=name)
        teacher.info["test"] = evaluate(teacher, split, "test", ks=(10, 20), max_len=int(data.lengths().max()), progress=False)
    elif args.kind == "transition":
        teacher = ItemTransition.fit_select(split, grid=args.l2_grid or DEFAULT_L2_GRID, window=args.window,
                                            decay=args.decay, name=name, alpha=args.alpha)
        teacher.info["test"] = evaluate(teacher, split, "test", ks=(10, 20), max_len=teacher.max_len, progress=False)
    else:
        common = dict(dim=args.dim, num_layers=args.layers, num_heads=args.heads, max_len=args.max_len, dropout=args.dropout)
        if args.kind == "id-transformer":
            teacher = IDTransformerTeacher.from_data(data, name=name, seed=args.seed, **common)
        else:
            teacher = UniSRecTeacher.from_data(data, name=name, seed=args.seed, num_experts=args.experts,
                                               use_id_embedding=not args.no_id, **common)
        fit_teacher(teacher, split, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
                    eval_every=args.eval_every, num_threads=args.threads, seed=args.seed, progress=False)
    seconds = time.perf_counter() - t0
    teacher.save(out)
    row = {"dataset": data.name, "teacher": name, "kind": args.kind, "parameters": teacher.num_parameters(),
           "seconds": round(seconds, 1), "threads": torch.get_num_threads(), "args": vars(args), "info": teacher.info}
    with open(artifacts_root() / "teachers" / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
