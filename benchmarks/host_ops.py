"""Host-side work of one distillation-loss step: the aten ops each backend's forward+backward issues.

Where B x C is small, a GPU step is bound by the host (Python, dispatch, launches), not by the kernels: on the
H200 of RESULTS.md eager's step costs ~23 us per aten op. This counts the ops on CPU, no GPU needed, with a
``TorchDispatchMode`` around the second of two steps through the public ``kd_loss`` / ``kd_loss_linear``.
For the Triton backend the kernel launches are stubbed out (Triton runs under its CPU interpreter here, whose
own tensor traffic would otherwise be counted): what remains is exactly the wrapper's ops, and the launches are
counted separately. "launching" = ops that run a kernel on a GPU (views, detach and shape ops excluded).

    TRITON_INTERPRET=1 .venv/bin/python benchmarks/host_ops.py --out benchmarks/results/host-ops.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU tensors

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prmkd_dist

# ops that launch no kernel on a GPU (metadata, views, allocation without a fill)
NON_LAUNCHING = {"detach", "view", "select", "unbind", "expand", "unsqueeze", "reshape", "t", "transpose",
                 "slice", "as_strided", "empty", "empty_like", "new_empty", "alias", "_unsafe_view"}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _StubLaunches:
    """Replaces every ``_*_kernel`` of the Triton backend modules by a launcher that only counts."""

    def __init__(self):
        import prmkd_dist.kernels.kd_loss as logits_mod
        import prmkd_dist.kernels.kd_loss_linear as linear_mod

        self.modules, self.saved, self.launches = (logits_mod, linear_mod), {}, 0

    def __enter__(self):
        for mod in self.modules:
            for name in dir(mod):
                if name.startswith("_") and name.endswith("_kernel"):
                    self.saved[(mod, name)] = getattr(mod, name)
                    setattr(mod, name, self)
        return self

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch

    def __exit__(self, *exc):
        for (mod, name), kernel in self.saved.items():
            setattr(mod, name, kernel)


def count(form: str, backend: str, tau: float, batch=8, items=300, teachers=3, slots=5, dim=16) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, items, (batch, teachers, slots), generator=g)
    scores, weights = torch.randn(batch, teachers, slots, generator=g), torch.rand(batch, teachers, generator=g)
    rank, target = torch.rand(batch, teachers, slots, generator=g), torch.randint(0, items, (batch,), generator=g)
    hyper = dict(temperature=tau, lambda_ce=1.0, lambda_kd=1.0, lambda_rank=0.3, backend=backend, check_inputs=False)
    logits = torch.randn(batch, items, generator=g).requires_grad_(True)
    user = torch.randn(batch, dim, generator=g).requires_grad_(True)
    item = torch.randn(items, dim, generator=g).requires_grad_(True)
    bias = torch.zeros(items).requires_grad_(True)

    def step():
        for t in (logits, user, item, bias):
            t.grad = None
        if form == "logits":
            prmkd_dist.kd_loss(logits, target, ids, scores, weights, rank, **hyper).backward()
        else:
            prmkd_dist.kd_loss_linear(user, item, target, ids, scores, weights, rank, item_bias=bias, **hyper).backward()

    stub = _StubLaunches() if backend == "triton" else None
    with stub or contextlib.nullcontext():
        step()  # first step: imports, caches
        if stub:
            stub.launches = 0
        with _Count() as mode:
            step()
    ops = dict(mode.ops.most_common())
    launching = sum(n for op, n in ops.items() if op not in NON_LAUNCHING)
    return {"form": form, "backend": backend, "tau": tau, "aten_ops": sum(ops.values()), "launching": launching,
            "triton_launches": stub.launches if stub else 0, "ops": ops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=["triton", "reference"], choices=["triton", "reference", "cpp"])
    p.add_argument("--temperatures", nargs="+", type=float, default=[1.0, 0.7])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [count(form, backend, tau) for backend in args.backends for form in ("logits", "linear")
            for tau in args.temperatures]
    print("| form | backend | tau | aten ops | of which launch a kernel | Triton launches |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['form']} | {r['backend']} | {r['tau']} | {r['aten_ops']} | {r['launching']} | {r['triton_launches']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
