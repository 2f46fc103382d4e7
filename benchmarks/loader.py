"""Loader throughput: TeacherShardDataset (0/1/2 DataLoader workers) vs a raw pyarrow scan (all columns,
row group by row group) of the same files, and (if the SASRec student exists) the student's consumption rate on batches of the same shape.

    .venv/bin/python benchmarks/loader.py --rows 1000000 --out benchmarks/results/loader.json

Writes synthetic shards (T teachers x K, histories up to --max-hist) to --dir (reused when it already
holds a finished export of the same shape) or a temp dir, then prints a markdown table and writes JSON.
Goals: loader >= 70% of the raw scan rate; loader >= 10x the student's consumption rate. Each worker count
runs --reps rounds of (raw scan, loader pass) back to back and reports medians; the loader's rate is given
for the whole epoch and after its first batch (worker start-up and the first window excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from prmkd_dist.data.loader import ShardLoader, TeacherShardDataset
from prmkd_dist.data.shards import MANIFEST, ShardMeta, ShardSet, TeacherInfo, TeacherShardWriter


def write_synthetic(out: str, rows: int, teachers: int, k: int, max_hist: int, num_items: int,
                    rows_per_row_group: int, seed: int = 0, chunk: int = 65536) -> None:
    meta = ShardMeta(num_items, "benchmark0000000",
                     tuple(TeacherInfo(f"t{i}", k, "logit", producer="benchmarks/loader.py") for i in range(teachers)),
                     producer="benchmarks/loader.py")
    rng = np.random.default_rng(seed)
    offsets_per_teacher = [rng.choice(num_items, k, replace=False) for _ in range(teachers)]
    # data are valid by construction (distinct ids, sorted scores): skip the writer's row checks
    with TeacherShardWriter(out, meta, rows_per_row_group=rows_per_row_group, rows_per_file=16 * rows_per_row_group,
                            overwrite=True, validate=False) as w:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            lengths = rng.integers(1, max_hist + 1, n)
            offsets = np.zeros(n + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            tl = {}
            for i in range(teachers):
                base = rng.integers(0, num_items, n)
                ids = (base[:, None] + offsets_per_teacher[i][None, :]) % num_items
                scores = -np.cumsum(rng.exponential(size=(n, k)).astype(np.float32), axis=1)
                tl[f"t{i}"] = (ids, scores)
            w.write_batch(example_key=np.arange(start, start + n), user_id=rng.integers(0, 1 << 20, n),
                          history=(offsets, rng.integers(0, num_items, int(offsets[-1]))),
                          target=rng.integers(0, num_items, n), teachers=tl)


def raw_scan(root: str) -> tuple[float, int]:
    """Seconds and rows to read every row group of every file, all columns, with pyarrow."""
    ss = ShardSet.open(root)
    t0 = time.perf_counter()
    rows = 0
    for f in ss.files:
        pf = pq.ParquetFile(f.path)
        for g in range(pf.num_row_groups):
            rows += pf.read_row_group(g).num_rows
    return time.perf_counter() - t0, rows


def loader_pass(root: str, workers: int, batch_size: int, max_len: int) -> dict:
    """One epoch through ShardLoader: seconds, rows, batches, and the wait for the first batch (worker
    start-up, first window), so the rate after it (what an epoch of 10^8 rows sees) can be told apart."""
    ds = TeacherShardDataset(root, batch_size, max_len=max_len, seed=0)
    loader = ShardLoader(ds, num_workers=workers)
    t0 = time.perf_counter()
    rows = batches = 0
    first_s = first_rows = None
    for b in loader:
        rows += b["example_key"].shape[0]
        batches += 1
        if first_s is None:
            first_s, first_rows = time.perf_counter() - t0, rows
    s = time.perf_counter() - t0
    return {"seconds": s, "rows": rows, "batches": batches, "first_batch_s": first_s,
            "rows_per_s": rows / s, "after_first_rows_per_s": (rows - first_rows) / (s - first_s),
            "stats": dict(loader.stats)}


def student_rate(batch: dict, num_items: int, steps: int) -> dict | None:
    """Examples/s of a SASRec forward+backward (CE + KD loss when available) on one loader batch."""
    try:
        from prmkd_dist.models.sasrec import SASRec
    except ImportError:
        return None
    try:
        from prmkd_dist.distill import kd_loss
    except ImportError:
        kd_loss = None
    model = SASRec(num_items, dim=64, max_len=batch["history"].shape[1], num_layers=2, num_heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    T = batch["teacher_ids"].shape[1]
    weights = torch.full((batch["target"].shape[0], T), 1.0 / T)

    def step():
        logits = model.score(batch["history"])
        if kd_loss is not None:
            loss = kd_loss(logits, batch["target"], batch["teacher_ids"], batch["teacher_scores"], weights)
        else:
            loss = torch.nn.functional.cross_entropy(logits, batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return {"examples_per_s": steps * batch["target"].shape[0] / dt, "loss": "kd_loss" if kd_loss else "cross_entropy",
            "model": "SASRec(dim=64, layers=2, heads=2)", "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--max-hist", type=int, default=50)
    p.add_argument("--num-items", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--rows-per-row-group", type=int, default=8192)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--reps", type=int, default=3, help="rounds of (raw scan, loader pass) per worker count")
    p.add_argument("--student-steps", type=int, default=5, help="0 skips the student measurement")
    p.add_argument("--dir", default=None, help="shard dir to (re)use; default: a temp dir removed afterwards")
    p.add_argument("--out", default=None, help="JSON results path")
    args = p.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="prmkd-loader-bench-")
    try:
        shape = dict(rows=args.rows, teachers=args.teachers, k=args.k, max_hist=args.max_hist, num_items=args.num_items)
        reuse = os.path.exists(os.path.join(root, MANIFEST)) and ShardSet.open(root).num_rows == args.rows
        t0 = time.perf_counter()
        if not reuse:
            write_synthetic(root, args.rows, args.teachers, args.k, args.max_hist, args.num_items, args.rows_per_row_group)
        write_s = time.perf_counter() - t0
        size = sum(os.path.getsize(f.path) for f in ShardSet.open(root).files)
        results = {"shape": shape, "batch_size": args.batch_size, "bytes_on_disk": size,
                   "write_s": None if reuse else write_s, "machine": f"{platform.machine()} {os.cpu_count()} CPU(s)",
                   "raw_scan": [], "loader": []}
        raw_scan(root)  # warm-up: page cache and pyarrow's allocator (the first scan runs cold)
        for w in [int(x) for x in args.workers.split(",") if x != ""]:
            # rounds of (raw scan, loader pass) back to back: on a noisy machine each ratio compares
            # measurements taken under the same conditions; medians over the rounds
            rounds = []
            for _ in range(args.reps):
                raw_s, raw_rows = raw_scan(root)
                lp = loader_pass(root, w, args.batch_size, args.max_hist)
                if lp["rows"] != raw_rows:
                    raise RuntimeError(f"loader with {w} worker(s) read {lp['rows']} rows, the shards hold {raw_rows}")
                lp["raw_scan_rows_per_s"] = raw_rows / raw_s
                rounds.append(lp)
            med = {k: float(np.median([r[k] for r in rounds]))
                   for k in ("rows_per_s", "after_first_rows_per_s", "raw_scan_rows_per_s", "first_batch_s")}
            results["raw_scan"].append({"workers_round": w, "rows_per_s": [r["raw_scan_rows_per_s"] for r in rounds]})
            results["loader"].append({"workers": w, "rounds": rounds, **med,
                                      "vs_raw_scan": med["rows_per_s"] / med["raw_scan_rows_per_s"],
                                      "after_first_vs_raw_scan": med["after_first_rows_per_s"] / med["raw_scan_rows_per_s"]})
        if args.student_steps:
            batch = next(iter(ShardLoader(TeacherShardDataset(root, args.batch_size, max_len=args.max_hist))))
            torch.set_num_threads(os.cpu_count() or 1)
            results["student"] = student_rate(batch, args.num_items, args.student_steps)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.rows} rows, T={args.teachers}, K={args.k}, history <= {args.max_hist}, "
          f"{results['bytes_on_disk'] / 2**20:.0f} MiB on disk, batch {args.batch_size}, {results['machine']}\n")
    print(f"medians of {args.reps} rounds of (raw scan, loader pass)\n")
    print("| reader | workers | rows/s | raw pyarrow scan, rows/s | loader / raw | first batch s | rows/s after it | after / raw |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["loader"]:
        print(f"| TeacherShardDataset + ShardLoader | {r['workers']} | {r['rows_per_s']:,.0f} | "
              f"{r['raw_scan_rows_per_s']:,.0f} | {100 * r['vs_raw_scan']:.0f}% | {r['first_batch_s']:.2f} | "
              f"{r['after_first_rows_per_s']:,.0f} | {100 * r['after_first_vs_raw_scan']:.0f}% |")
    st = results.get("student")
    if st:
        best = max(r["rows_per_s"] for r in results["loader"])
        results["loader_over_student"] = best / st["examples_per_s"]
        print(f"| student {st['model']} fwd+bwd ({st['loss']}) | - | {st['examples_per_s']:,.0f} | - | "
              f"best loader / student = {results['loader_over_student']:.1f}x |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
