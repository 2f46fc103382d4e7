"""The per-row distillation work of the C++ backend, on its own: what the teachers add to a catalog-parallel step.

- ``kd_rows_fwd`` / ``kd_rows_bwd``: the row formula (CE + per-teacher KL, optionally the ranking term) from the
  statistics and the logits at the target and T x K teacher slots;
- ``kd_catalog_local_stats`` / ``_grad`` on one rank's item shard, with and without the selected ids: the
  difference is the picking of the selected logits out of the logits tiles (stats) and the folding of their
  gradients back into them (grad).

Medians over ``--reps`` calls at ``--threads`` intra-op threads; prints a table and writes JSON.

    .venv/bin/python benchmarks/row_ops.py --out benchmarks/results/row-ops.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from prmkd_dist.distill import cpp_backend


def median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=6400, help="rows (the scaling benchmark's 128 windows x 50)")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--shard-rows", type=int, default=4871, help="item rows of one rank's shard (ml catalog / 2)")
    p.add_argument("--catalog", type=int, default=9742)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, T, K, R, C, d = args.batch, args.teachers, args.k, args.shard_rows, args.catalog, args.dim
    g = torch.Generator().manual_seed(0)
    op = torch.ops.prmkd

    # row formula inputs: random statistics, a few empty slots
    sel = torch.randn(B, 1 + T * K, generator=g) * 3
    lse1 = sel.logsumexp(1) + 5
    target = torch.randint(0, C, (B,), generator=g)
    ids = torch.randint(0, C, (B, T, K), generator=g)
    ids[::7, -1, K // 2:] = -1
    scores = torch.randn(B, T, K, generator=g) * 2
    weights = torch.rand(B, T, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    rank = torch.rand(B, T, K, generator=g)
    upstream = torch.rand(B, generator=g)
    rows = {}
    for name, rw, lam in (("KL", None, 0.0), ("KL + ranking", rank, 0.5)):
        rows[f"kd_rows_fwd, {name}"] = median_ms(
            lambda: op.kd_rows_fwd(lse1, lse1, sel, target, ids, scores, weights, rw, 1.0, 1.0, 1.0, lam), args.reps)
        rows[f"kd_rows_bwd, {name}"] = median_ms(
            lambda: op.kd_rows_bwd(upstream, sel, target, ids, scores, weights, rw, 1.0, 1.0, 1.0, lam), args.reps)

    # one rank's shard (items 0 .. R-1 of C): about R / C of the selected ids are its own
    user = torch.randn(B, d, generator=g)
    item = torch.randn(R, d, generator=g)
    bias = torch.randn(R, generator=g)
    sel_ids = torch.randint(0, C, (B, 1 + T * K), generator=g)
    m, z1, _, _ = cpp_backend.catalog_local_stats(user, item, bias, 1.0)
    lse = (m + z1.log()).float()
    c1, ct, sparse = torch.rand(B, generator=g), torch.rand(B, generator=g), torch.randn(B, 1 + T * K, generator=g)
    none_i, none_g = torch.empty(B, 0, dtype=torch.int64), torch.empty(B, 0)
    stats = {
        "stats, no ids": lambda: cpp_backend.catalog_local_stats(user, item, bias, 1.0),
        "stats, selected ids": lambda: cpp_backend.catalog_local_stats(user, item, bias, 1.0, sel_idx=sel_ids),
        "grad, no ids": lambda: cpp_backend.catalog_local_grad(user, item, bias, c1, ct, lse, lse, none_i, none_g, 1.0),
        "grad, selected ids": lambda: cpp_backend.catalog_local_grad(user, item, bias, c1, ct, lse, lse, sel_ids,
                                                                     sparse, 1.0),
    }
    for name, fn in stats.items():
        rows[f"kd_catalog_local_{name}"] = median_ms(fn, args.reps)

    print(f"B {B}, {T} x {K} teacher slots, shard {R} x {d} of {C} items, {args.threads} thread(s), "
          f"median of {args.reps}")
    print("| op | ms |\n|---|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} |")
    extra = {k: rows[f"kd_catalog_local_{k}, selected ids"] - rows[f"kd_catalog_local_{k}, no ids"]
             for k in ("stats", "grad")}
    print(f"selected ids add: stats {extra['stats']:+.2f} ms, grad {extra['grad']:+.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "ms": rows,
                                        "selected_ids_extra_ms": extra,
                                        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                                    "threads": args.threads}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
