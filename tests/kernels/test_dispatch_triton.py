"""The Triton backend through the public API (``prmkd_dist.kd_loss(..., backend="triton")``): the
dispatcher's validation, normalisation and reduction in front of the kernels, against the reference.
On CPU the dispatcher serves an explicit backend="triton" through the interpreter (TRITON_INTERPRET=1)."""
from __future__ import annotations

import pytest
import torch

import prmkd_dist

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_loss_triton_backend(reduction, device, make_case, relative_error):
    case = make_case(5, 210, 3, 7, seed=31, with_rank=True, device=device)
    logits = (3.0 * torch.randn(5, 210, generator=torch.Generator().manual_seed(31))).to(device)
    kwargs = dict(temperature=0.7, lambda_ce=1.0, lambda_kd=0.5, lambda_rank=0.3)
    out = {}
    for backend in ("triton", "reference"):
        x = logits.clone().requires_grad_(True)
        loss = prmkd_dist.kd_loss(x, case.target, case.teacher_ids, case.teacher_scores, case.teacher_weights,
                                  case.rank_weights, backend=backend, reduction=reduction, **kwargs)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape)).sum().backward()
        out[backend] = (loss.detach(), x.grad)
    assert out["triton"][0].shape == ((5,) if reduction == "none" else ())
    assert relative_error(out["triton"][0], out["reference"][0]) <= 1e-4
    assert relative_error(out["triton"][1], out["reference"][1]) <= 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_kd_loss_linear_triton_backend(reduction, device, make_case, relative_error):
    case = make_case(7, 160, 2, 5, seed=32, with_rank=False, device=device)
    gen = torch.Generator().manual_seed(32)
    user, item = torch.randn(7, 24, generator=gen).to(device), (0.3 * torch.randn(160, 24, generator=gen)).to(device)
    bias = torch.randn(160, generator=gen).to(device)
    out = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (user, item, bias)]
        loss = prmkd_dist.kd_loss_linear(leaves[0], leaves[1], case.target, case.teacher_ids, case.teacher_scores,
                                         case.teacher_weights, item_bias=leaves[2], reduction=reduction, backend=backend)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape)).sum().backward()
        out[backend] = [loss.detach()] + [t.grad for t in leaves]
    for got, want in zip(out["triton"], out["reference"]):
        assert relative_error(got, want) <= 1e-4


def test_auto_never_picks_the_interpreter_on_cpu():
    """"auto" on CPU tensors is a speed choice: the Triton interpreter must never be it."""
    from prmkd_dist.distill.loss import resolve_backend

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert resolve_backend("auto", "cpu", torch.float32).name != "triton"


def test_catalog_local_part_resolves_to_the_triton_kernels():
    """The catalog-parallel local part: "auto" takes the Triton kernels for CUDA tensors (never for CPU
    tensors), and an explicit request serves CPU tensors through the interpreter."""
    from prmkd_dist.distill.loss import available_backends, resolve_backend
    from prmkd_dist.kernels import kd_catalog_local

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res = resolve_backend("triton", dev, torch.bfloat16, op="catalog_local")
    assert res.module.catalog_local_stats is kd_catalog_local.catalog_local_stats
    assert res.module.catalog_local_grad is kd_catalog_local.catalog_local_grad
    if torch.cuda.is_available():
        assert resolve_backend("auto", "cuda", torch.float32, op="catalog_local").name == "triton"
        assert available_backends("cuda", op="catalog_local")["triton"] == (True, "")
    else:
        assert resolve_backend("auto", "cpu", torch.float32, op="catalog_local").name != "triton"
