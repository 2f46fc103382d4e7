"""kd_loss_linear_catalog_parallel with 2 real gloo processes against the single-process reference: value,
gradient of user_emb, and each rank's gradient of its own rows (and bias), over several configurations.
Every local part is checked: the chunked PyTorch reference (float64, chosen by "auto" for float64), the
fused C++ op (float32 and bfloat16, backend="cpp", on a catalog of 1100 items: more than two 512-row tiles,
not a multiple of any tile size), each also with data-parallel batches (``local_batch=True``: each rank
passes its own rows, split unevenly, one rank empty; the selected ids routed to their owners, in CSR form to the
C++ op, as a padded dense matrix to the others) and, in a second pair of processes, the Triton kernels
(backend="triton", under the interpreter on CPU tensors, on 150 items: several interpreter tiles).

The workers are this file run as a script (``python test_catalog_loss.py RANK WORLD PORT OUT [MODE]``), so
they do not depend on how pytest imports test modules."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

C, D = 23, 5
C_FUSED = 1100  # the fused-op pass: several C++ item tiles, split unevenly
C_TRITON = 150  # the Triton pass: several interpreter item tiles (32 rows), split unevenly; interpreting is slow
TOL = {"float32": 1e-4, "bfloat16": 1e-2}
# (name, rank-0 rows, kwargs): uneven splits, a rank holding nothing, tau = 1 (shared LSE) and != 1
CONFIGS = [
    ("full", 9, dict(temperature=1.7, lambda_ce=0.8, lambda_kd=1.2, lambda_rank=0.6, bias=True, reduction="mean")),
    ("tau1_sum", 14, dict(temperature=1.0, lambda_rank=0.5, bias=False, reduction="sum")),
    ("rows_none", 1, dict(temperature=0.5, lambda_rank=0.0, bias=True, reduction="none")),
    ("no_teachers", 11, dict(temperature=1.0, bias=True, reduction="mean", teachers=0)),
    ("rank0_empty", 0, dict(temperature=2.0, lambda_rank=1.0, bias=True, reduction="mean")),
]


def make_case(kw, seed=0, n_items=C):
    import torch

    g = torch.Generator().manual_seed(seed)
    b, t, k = 7, kw.get("teachers", 3), 4
    user = torch.randn(b, D, generator=g, dtype=torch.float64)
    item = torch.randn(n_items, D, generator=g, dtype=torch.float64)
    bias = torch.randn(n_items, generator=g, dtype=torch.float64) if kw["bias"] else None
    ids = torch.randint(0, n_items, (b, t, k), generator=g)
    ids[torch.rand(b, t, k, generator=g) < 0.3] = -1
    if t > 1:
        ids[1, 1] = ids[1, 0]            # duplicates across teachers
        ids[2, 2] = -1                   # an empty teacher
    target = torch.randint(0, n_items, (b,), generator=g)
    target[3] = -1
    scores = torch.randn(b, t, k, generator=g, dtype=torch.float64)
    weights = torch.rand(b, t, generator=g, dtype=torch.float64)
    rank = torch.rand(b, t, k, generator=g, dtype=torch.float64)
    return user, item, bias, target, ids, scores, weights, rank


def loss_kwargs(kw):
    return {n: kw[n] for n in ("temperature", "lambda_ce", "lambda_kd", "lambda_rank", "reduction") if n in kw}


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (scale-free), in float64."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check_fused(rank: int, name: str, split: int, kw: dict, dtype_name: str, report: dict,
                backend: str = "cpp", n_items: int = C_FUSED) -> None:
    """The fused local part of ``backend`` in ``dtype_name`` against the float64 single-process reference on
    the same (rounded) values: loss, d user_emb, this rank's rows and bias; never NaN."""
    import torch

    from prmkd_dist import kd_loss_linear
    from prmkd_dist.distill.loss import last_resolution
    from prmkd_dist.parallel.catalog_loss import kd_loss_linear_catalog_parallel

    dtype = getattr(torch, dtype_name)
    user, item, bias, target, ids, scores, weights, rank_w = make_case(kw, seed=2, n_items=n_items)
    # the same ids land on either rank: rank 0 owns [0, split), rank 1 the rest (split 0: rank 0 holds nothing)
    split = round(split * n_items / C)
    lo, hi = (0, split) if rank == 0 else (split, n_items)
    user, item = user.to(dtype), item.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    u = user.clone().requires_grad_()
    shard = item[lo:hi].clone().requires_grad_()
    bshard = bias[lo:hi].clone().requires_grad_() if bias is not None else None
    got = kd_loss_linear_catalog_parallel(u, shard, lo, n_items, target, ids, scores, weights, rank_w,
                                          item_bias_shard=bshard, backend=backend, **loss_kwargs(kw))
    assert last_resolution().name == backend, last_resolution()
    got.sum().backward()

    ru, ri = user.double().requires_grad_(), item.double().requires_grad_()
    rb = bias.double().requires_grad_() if bias is not None else None
    want = kd_loss_linear(ru, ri, target, ids, scores, weights, rank_w, item_bias=rb, backend="reference",
                          **loss_kwargs(kw))
    want.sum().backward()
    pairs = [("value", got.detach(), want.detach()), ("d user", u.grad, ru.grad),
             ("d rows", shard.grad, ri.grad[lo:hi])]
    if bias is not None:
        pairs.append(("d bias", bshard.grad, rb.grad[lo:hi]))
    for what, g, w in pairs:
        assert g.dtype == (torch.float32 if what == "value" else dtype), (name, what, g.dtype)
        assert torch.isfinite(g.float()).all(), f"{name} {dtype_name} {what}: not finite"
        if w.numel():
            err = rel_err(g, w)
            assert err <= TOL[dtype_name], f"{name} {dtype_name} {what}: relative error {err:.2e}"
    report[f"{name}/{dtype_name}"] = float(got.detach().double().sum())


# local_batch=True: rank 0's share of the 7 batch rows in each configuration (uneven, and either rank empty)
BATCH_SPLITS = [3, 7, 1, 0, 5]


def check_local_batch(rank: int, name: str, split: int, rows0: int, kw: dict, dtype_name: str, backend: str,
                      report: dict, n_items: int | None = None) -> None:
    """Data-parallel batches (each rank passes its own rows) against the single-process loss on the
    concatenated batch: the value (the global loss on every rank; "none": the rank's own rows), the gradient
    of the rank's own user rows, and of its catalog rows (and bias)."""
    import torch
    import torch.distributed as dist

    from prmkd_dist import kd_loss_linear
    from prmkd_dist.parallel.catalog_loss import kd_loss_linear_catalog_parallel

    dtype = getattr(torch, dtype_name)
    n_items = n_items or (C if dtype == torch.float64 else C_FUSED)
    user, item, bias, target, ids, scores, weights, rank_w = make_case(kw, seed=3, n_items=n_items)
    split = round(split * n_items / C)
    lo, hi = (0, split) if rank == 0 else (split, n_items)
    mine = slice(0, rows0) if rank == 0 else slice(rows0, user.shape[0])
    user, item = user.to(dtype), item.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    u = user[mine].clone().requires_grad_()
    shard = item[lo:hi].clone().requires_grad_()
    bshard = bias[lo:hi].clone().requires_grad_() if bias is not None else None
    got = kd_loss_linear_catalog_parallel(u, shard, lo, n_items, target[mine], ids[mine], scores[mine],
                                          weights[mine], rank_w[mine], item_bias_shard=bshard, backend=backend,
                                          local_batch=True, **loss_kwargs(kw))
    got.sum().backward()

    ru, ri = user.double().requires_grad_(), item.double().requires_grad_()
    rb = bias.double().requires_grad_() if bias is not None else None
    want = kd_loss_linear(ru, ri, target, ids, scores, weights, rank_w, item_bias=rb, backend="reference",
                          **loss_kwargs(kw))
    want.sum().backward()
    want_value = want[mine] if kw["reduction"] == "none" else want
    pairs = [("value", got.detach(), want_value.detach()), ("d user", u.grad, ru.grad[mine]),
             ("d rows", shard.grad, ri.grad[lo:hi])]
    if bias is not None:
        pairs.append(("d bias", bshard.grad, rb.grad[lo:hi]))
    tol = 1e-10 if dtype == torch.float64 else TOL[dtype_name]
    for what, g, w in pairs:
        assert g.shape == w.shape, f"local_batch {name} {dtype_name} {what}: shape {tuple(g.shape)} vs {tuple(w.shape)}"
        assert torch.isfinite(g.float()).all(), f"local_batch {name} {dtype_name} {what}: not finite"
        if w.numel():
            err = rel_err(g, w)
            assert err <= tol, f"local_batch {name} {dtype_name} {what}: relative error {err:.2e}"
    total = got.detach().double().sum().reshape(1)
    if kw["reduction"] == "none":  # the ranks hold different rows: report the global sum
        dist.all_reduce(total)
    report[f"local_batch/{name}/{dtype_name}/{backend}"] = float(total)


def triton_checks(rank: int) -> dict:
    """The Triton local part (interpreted on CPU tensors: TRITON_INTERPRET=1), every configuration."""
    report = {}
    for name, split, kw in CONFIGS:
        for dtype_name in TOL:
            check_fused(rank, name, split, kw, dtype_name, report, backend="triton", n_items=C_TRITON)
    # data-parallel batches: the routed ids reach the Triton kernels as a padded dense matrix
    for (name, split, kw), rows0 in list(zip(CONFIGS, BATCH_SPLITS))[::4]:
        check_local_batch(rank, name, split, rows0, kw, "float32", "triton", report, n_items=C_TRITON)
    return report


def all_checks(rank: int) -> dict:
    """The chunked reference (float64) and the fused C++ local part (float32 / bfloat16) of every configuration,
    the default chunking, and the refusal of ranges that do not tile the catalog."""
    import torch
    import torch.distributed as dist

    from prmkd_dist import kd_loss_linear
    from prmkd_dist.distill.loss import last_resolution
    from prmkd_dist.parallel.catalog_loss import kd_loss_linear_catalog_parallel

    report = {}
    for name, split, kw in CONFIGS:
        user, item, bias, target, ids, scores, weights, rank_w = make_case(kw)
        lo, hi = (0, split) if rank == 0 else (split, C)
        u = user.clone().requires_grad_()
        shard = item[lo:hi].clone().requires_grad_()
        bshard = bias[lo:hi].clone().requires_grad_() if bias is not None else None
        got = kd_loss_linear_catalog_parallel(u, shard, lo, C, target, ids, scores, weights, rank_w,
                                              item_bias_shard=bshard, chunk_rows=4, **loss_kwargs(kw))
        assert last_resolution().name == "reference"  # "auto" sends float64 to the chunked reference
        got.sum().backward()

        ru, ri = user.clone().requires_grad_(), item.clone().requires_grad_()
        rb = bias.clone().requires_grad_() if bias is not None else None
        want = kd_loss_linear(ru, ri, target, ids, scores, weights, rank_w, item_bias=rb, backend="reference",
                              **loss_kwargs(kw))
        want.sum().backward()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name} value: {m}")
        torch.testing.assert_close(u.grad, ru.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name} d user: {m}")
        torch.testing.assert_close(shard.grad, ri.grad[lo:hi], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name} d rows: {m}")
        if bias is not None:
            torch.testing.assert_close(bshard.grad, rb.grad[lo:hi], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name} d bias: {m}")
        report[name] = float(got.detach().sum())

    # the fused C++ local part, float32 and bfloat16
    for name, split, kw in CONFIGS:
        for dtype_name in ("float32", "bfloat16"):
            check_fused(rank, name, split, kw, dtype_name, report)

    # data-parallel batches: each rank brings its own rows (reference in float64, the C++ op in float32)
    for (name, split, kw), rows0 in zip(CONFIGS, BATCH_SPLITS):
        check_local_batch(rank, name, split, rows0, kw, "float64", "reference", report)
        check_local_batch(rank, name, split, rows0, kw, "float32", "cpp", report)

    # float32 with the default chunking agrees too, through the chunked reference and through "auto" (C++)
    user, item, bias, target, ids, scores, weights, rank_w = make_case(CONFIGS[0][2], seed=1)
    lo, hi = (0, 12) if rank == 0 else (12, C)
    want = kd_loss_linear(user.float(), item.float(), target, ids, scores, weights, rank_w,
                          item_bias=bias.float(), lambda_rank=0.3, backend="reference")
    for backend, name in (("reference", "reference"), ("auto", "cpp")):
        got = kd_loss_linear_catalog_parallel(user.float(), item[lo:hi].float(), lo, C, target, ids, scores,
                                              weights, rank_w, item_bias_shard=bias[lo:hi].float(),
                                              lambda_rank=0.3, backend=backend)
        assert last_resolution().name == name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # ranges that do not tile the catalog are refused on every rank
    lo, hi = (0, 10) if rank == 0 else (9, C)
    try:
        kd_loss_linear_catalog_parallel(user, item[lo:hi], lo, C, target, ids, scores, weights)
    except ValueError as exc:
        report["tiling_error"] = str(exc)
    dist.barrier()
    return report


def worker(rank: int, world: int, port: int, out: str, mode: str = "all") -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        report = triton_checks(rank) if mode == "triton" else all_checks(rank)
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path, mode: str, **env) -> list[dict]:
    """Run ``worker`` as 2 gloo ranks in ``mode``; each rank's report."""
    port = _free_port()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(port), str(outs[r]), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    reports = [json.loads(o.read_text()) for o in outs]
    assert reports[0] == reports[1]  # the same loss on both ranks
    return reports


@pytest.mark.multiproc
def test_two_gloo_ranks_match_single_process_reference(tmp_path):
    reports = run_two_ranks(tmp_path, "all")
    fused = {f"{name}/{dt}" for name, _, _ in CONFIGS for dt in TOL}
    local_batch = {f"local_batch/{name}/{dt}/{be}" for name, _, _ in CONFIGS
                   for dt, be in (("float64", "reference"), ("float32", "cpp"))}
    assert set(reports[0]) == {name for name, _, _ in CONFIGS} | fused | local_batch | {"tiling_error"}
    assert "do not tile [0, 23)" in reports[0]["tiling_error"]


@pytest.mark.multiproc
def test_two_gloo_ranks_triton_local_part(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    reports = run_two_ranks(tmp_path, "triton", TRITON_INTERPRET="1")
    assert set(reports[0]) == ({f"{name}/{dt}" for name, _, _ in CONFIGS for dt in TOL}
                               | {f"local_batch/{name}/float32/triton" for name in ("full", "rank0_empty")})


@pytest.mark.multiproc
def test_needs_an_initialised_process_group():
    import torch

    from prmkd_dist.parallel.catalog_loss import kd_loss_linear_catalog_parallel

    user, item, bias, target, ids, scores, weights, rank = make_case(CONFIGS[0][2])
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        kd_loss_linear_catalog_parallel(user, item, 0, C, target, ids, scores, weights)
    assert torch.distributed.is_available()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], *sys.argv[5:])
