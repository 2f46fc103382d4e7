"""Time of the local part of the catalog-parallel loss: one rank's statistics + gradient over its item shard.

``catalog_local_stats`` (max and two sum-exps over the shard, logits at the selected ids) followed by
``catalog_local_grad`` (d user_emb, d item rows, d bias), for each backend that serves the device: the chunked
PyTorch reference, the C++ op (CPU) and the Triton kernels (CUDA). This is the per-rank work behind the
100M-user estimate of ``benchmarks/RESULTS.md`` (issue 7); the collectives around it are not timed here.

    python benchmarks/catalog_local.py --batch 1024 --rows 1e6 --dim 64 --out catalog_local.json   # a GPU
    .venv/bin/python benchmarks/catalog_local.py --batch 256 --rows 1e5 --reps 2                    # CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from prmkd_dist.distill.loss import resolve_backend


def _count(text: str) -> int:
    return int(float(text))


def time_backend(name: str, device: torch.device, dtype: torch.dtype, batch: int, rows: int, dim: int,
                 selected: int, tau: float, warmup: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    user = torch.randn(batch, dim, generator=gen).to(device, dtype)
    item = (0.1 * torch.randn(rows, dim, generator=gen)).to(device, dtype)
    bias = torch.zeros(rows, device=device, dtype=dtype)
    sel = torch.randint(-1, rows, (batch, selected), generator=gen).to(device)
    mod = resolve_backend(name, device, dtype, op="catalog_local").module
    chunk = max(64, (1 << 22) // batch)

    def step() -> None:
        m, z1, zt, s = mod.catalog_local_stats(user, item, bias, tau, chunk, sel)
        lse1 = (m + z1.log()).float()
        lset = (m / tau + zt.log()).float()
        coef = torch.full((batch,), 1.0 / batch, device=device)
        mod.catalog_local_grad(user, item, bias, coef, coef, lse1, lset, sel, torch.full_like(s, 1e-3), tau, chunk)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    flops = 4 * 2 * batch * rows * dim  # logits in the stats pass, recomputed twice, dU and dE
    return {"backend": name, "batch": batch, "rows": rows, "dim": dim, "selected": selected, "ms": ms,
            "tflops": flops / (ms * 1e-3) / 1e12}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=None, help="default: reference + what serves the device")
    p.add_argument("--batch", nargs="+", type=_count, default=[1024])
    p.add_argument("--rows", nargs="+", type=_count, default=[10**5, 10**6], help="R, item rows of the shard")
    p.add_argument("--dim", nargs="+", type=_count, default=[64])
    p.add_argument("--selected", type=int, default=151, help="selected ids per row (T x K teacher slots + target)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = args.backends or ["reference", "triton" if device.type == "cuda" else "cpp"]
    results = []
    for batch in args.batch:
        for rows in args.rows:
            for dim in args.dim:
                for name in backends:
                    # the reference computes in float64 for every input dtype on CPU, fp32 on CUDA
                    r = time_backend(name, device, dtype, batch, rows, dim, args.selected, args.temperature,
                                     args.warmup, args.reps)
                    results.append(r)
                    print(f"B={batch} R={rows:.0e} d={dim} {name:9s} {r['ms']:9.2f} ms {r['tflops']:7.2f} TFLOP/s",
                          file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {device_name}; dtype {dtype}; tau {args.temperature}; {args.selected} selected ids per row; "
          f"median of {args.reps}\n")
    print("| B | R | d | backend | stats + grad ms | TFLOP/s (4 logit-sized matmuls) |")
    print("|---:|---:|---:|---|---:|---:|")
    for r in results:
        print(f"| {r['batch']} | {r['rows']:.0e} | {r['dim']} | {r['backend']} | {r['ms']:.2f} | {r['tflops']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"device": device_name, "dtype": str(dtype), "args": vars(args) | {"out": str(args.out)},
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
