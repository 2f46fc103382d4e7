"""Where the distillation step's extra time goes, on one process: the pieces behind the distillation-overhead
figures of benchmarks/RESULTS.md ("Distributed step (issue 7)").

    .venv/bin/python benchmarks/profile_catalog_loss.py [--rows 6400] [--items 9742] [--dim 64] [--out FILE.json]

At the scaling benchmark's shape (128 users x 50 positions = 6,400 rows, ml-latest-small's catalog, d=64, T=3,
K=50), one thread, best of --reps:
  1. teacher_weights (confidence+consistency) of all rows;
  2. the logits at the target and the T*K teacher ids (M = 1 + T*K per row), three ways: one materialised
     [rows, M, d] gather + einsum (what the catalog-parallel loss did), the blocked gather of
     ``reference.selected_logits``, and the C++ catalog-local op picking them out of its tiles (``sel_idx``);
  3. the catalog-parallel loss (gloo, world 1, C++ local op) forward and backward, without and with teachers.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=6400)
    ap.add_argument("--items", type=int, default=9742)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("gloo", rank=0, world_size=1)

    from prmkd_dist.distill import cpp_backend, reference
    from prmkd_dist.distill.weights import teacher_weights
    from prmkd_dist.parallel.catalog_loss import kd_loss_linear_catalog_parallel
    from prmkd_dist.train.engine import no_teachers

    n, c, d, t, k = args.rows, args.items, args.dim, args.teachers, args.k
    g = torch.Generator().manual_seed(0)
    user = torch.randn(n, d, generator=g)
    item = 0.1 * torch.randn(c, d, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    ids = torch.randint(0, c, (n, t, k), generator=g)
    scores = torch.randn(n, t, k, generator=g).sort(dim=-1, descending=True).values
    sel_idx = torch.cat([target[:, None], ids.reshape(n, t * k)], dim=1)

    res = {"teacher_weights": best_ms(lambda: teacher_weights(ids, scores, target), args.reps),
           "selected_logits_one_gather": best_ms(
               lambda: torch.einsum("bd,bmd->bm", user, item[sel_idx]), args.reps),
           "selected_logits_blocked_gather": best_ms(
               lambda: reference.selected_logits(user, item, None, sel_idx), args.reps),
           "local_stats_without_selected": best_ms(
               lambda: cpp_backend.catalog_local_stats(user, item, None, 1.0), args.reps),
           "local_stats_with_selected": best_ms(
               lambda: cpp_backend.catalog_local_stats(user, item, None, 1.0, sel_idx=sel_idx), args.reps)}
    w = teacher_weights(ids, scores, target)

    def loss_ms(with_teachers: bool) -> tuple[float, float]:
        u, e = user.clone().requires_grad_(), item.clone().requires_grad_()
        lists = (ids, scores, w) if with_teachers else no_teachers(n)
        fwd, bwd = [], []
        for _ in range(args.reps + 1):
            u.grad = e.grad = None
            t0 = time.perf_counter()
            loss = kd_loss_linear_catalog_parallel(u, e, 0, c, target, *lists, None, temperature=1.0)
            t1 = time.perf_counter()
            loss.backward()
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)
        return min(fwd[1:]) * 1e3, min(bwd[1:]) * 1e3

    res["loss_plain_fwd"], res["loss_plain_bwd"] = loss_ms(False)
    res["loss_teachers_fwd"], res["loss_teachers_bwd"] = loss_ms(True)
    dist.destroy_process_group()

    print(f"rows {n}, items {c}, d {d}, T x K {t} x {k}, 1 thread, best of {args.reps}")
    print("| piece | ms |\n|---|---:|")
    for name, ms in res.items():
        print(f"| {name} | {ms:.1f} |")
    if args.out is not None:
        args.out.write_text(json.dumps({"config": vars(args) | {"out": str(args.out)}, "ms": res}, indent=2))


if __name__ == "__main__":
    main()
