"""Triton ``kd_loss_rows`` (logits given) against the PyTorch reference: values and gradients, with each row's
forward stream in one program and cut into column splits (ragged, and more splits than columns: empty ones)."""
from __future__ import annotations

import pytest
import torch

import prmkd_dist.kernels.kd_loss as logits_kernels
from prmkd_dist.distill import reference
from prmkd_dist.kernels.kd_loss import kd_loss_rows

# (B, C, T, K, tau, with_rank): T = 0 (pure CE), K in {1, 7, 64}, C never a multiple of the block size
CASES = [
    (4, 131, 0, 5, 1.0, False),
    (5, 300, 1, 1, 1.0, True),
    (6, 257, 2, 7, 0.5, False),
    (6, 300, 3, 7, 2.0, True),
    (4, 200, 4, 64, 0.7, True),
    (3, 190, 2, 64, 1.0, False),
]
LAMBDAS = (0.9, 1.3, 0.6)  # lambda_ce, lambda_kd, lambda_rank


@pytest.fixture(params=[1, 3], ids=["one-program-per-row", "3-column-splits"])
def splits(request, monkeypatch):
    """Column splits of every forward (the interpreter's BLOCK_C is 64: 3 splits of the tests' C are ragged)."""
    monkeypatch.setattr(logits_kernels, "FORCED_SPLITS", request.param)
    return request.param


def _run(backend_fn, logits, case, tau, lambdas, row_grad, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    rows = backend_fn(x, *case.args(tau, *lambdas), **kwargs)
    (rows * row_grad).sum().backward()
    return rows.detach(), x.grad


@pytest.mark.parametrize("batch,n_items,n_teachers,k_slots,tau,with_rank", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(batch, n_items, n_teachers, k_slots, tau, with_rank, dtype, device, make_case,
                           relative_error, splits):
    seed = batch * 1000 + n_items + 17 * n_teachers + k_slots
    case = make_case(batch, n_items, n_teachers, k_slots, seed=seed, with_rank=with_rank, device=device)
    gen = torch.Generator().manual_seed(seed)
    logits = (4.0 * torch.randn(batch, n_items, generator=gen)).to(device=device, dtype=dtype)
    row_grad = torch.rand(batch, generator=gen).to(device) + 0.5  # distinct upstream gradient per row

    rows, grad = _run(kd_loss_rows, logits, case, tau, LAMBDAS, row_grad)
    ref_rows, ref_grad = _run(reference.kd_loss_rows, logits, case, tau, LAMBDAS, row_grad)

    assert rows.dtype == torch.float32 and rows.shape == (batch,)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert torch.isfinite(rows).all() and torch.isfinite(grad.float()).all()
    value_tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert relative_error(rows, ref_rows) <= value_tol
    # bf16 gradients are rounded to bf16 on output: compare at bf16's precision
    assert relative_error(grad.float(), ref_grad.float()) <= value_tol


def test_extreme_logits_stay_finite(device, make_case, relative_error, splits):
    """Large logits and a small temperature overflow a naive exp; the streamed LSEs must not."""
    case = make_case(4, 150, 3, 7, seed=5, with_rank=True, device=device)
    gen = torch.Generator().manual_seed(5)
    logits = (60.0 * torch.randn(4, 150, generator=gen)).to(device)
    row_grad = torch.ones(4, device=device)
    rows, grad = _run(kd_loss_rows, logits, case, 0.05, LAMBDAS, row_grad)
    ref_rows, ref_grad = _run(reference.kd_loss_rows, logits, case, 0.05, LAMBDAS, row_grad)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert relative_error(rows, ref_rows) <= 1e-4
    assert relative_error(grad, ref_grad) <= 1e-4


def test_mean_of_rows_backward(device, make_case, relative_error):
    """``.mean()`` sends a stride-0 upstream gradient; the kernel must read it as one value per row."""
    case = make_case(5, 100, 2, 7, seed=11, with_rank=False, device=device)
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(11)).to(device)
    grads = []
    for fn in (kd_loss_rows, reference.kd_loss_rows):
        x = logits.clone().requires_grad_(True)
        fn(x, *case.args(1.0, 1.0, 1.0, 0.0)).mean().backward()
        grads.append(x.grad)
    assert relative_error(grads[0], grads[1]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_inplace_overwrites_logits_with_the_gradient(dtype, device, make_case, relative_error, splits):
    case = make_case(4, 140, 3, 7, seed=3, with_rank=True, device=device)
    gen = torch.Generator().manual_seed(3)
    base = (3.0 * torch.randn(4, 140, generator=gen)).to(device=device, dtype=dtype)
    row_grad = torch.rand(4, generator=gen).to(device) + 0.5
    ref_rows, ref_grad = _run(reference.kd_loss_rows, base, case, 0.8, LAMBDAS, row_grad)

    leaf = base.clone().requires_grad_(True)
    logits = leaf * 1  # a non-leaf, like a model's output: its buffer may be recycled
    rows = kd_loss_rows(logits, *case.args(0.8, *LAMBDAS), grad_inplace=True)
    (rows * row_grad).sum().backward()

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert relative_error(rows, ref_rows) <= tol
    assert relative_error(leaf.grad.float(), ref_grad.float()) <= tol
    # the gradient was written over the logits' own storage (no [B, C] allocation)
    assert torch.equal(logits.detach(), leaf.grad)


def test_empty_splits_contribute_nothing(device, make_case, relative_error, monkeypatch):
    """More splits than column tiles: the splits past C stream nothing, and the merge must weigh their
    states by exactly 0."""
    monkeypatch.setattr(logits_kernels, "FORCED_SPLITS", 7)
    case = make_case(4, 131, 3, 7, seed=9, with_rank=True, device=device)
    gen = torch.Generator().manual_seed(9)
    logits = (4.0 * torch.randn(4, 131, generator=gen)).to(device)
    row_grad = torch.rand(4, generator=gen).to(device) + 0.5
    for tau in (1.0, 0.6):
        rows, grad = _run(kd_loss_rows, logits, case, tau, LAMBDAS, row_grad)
        ref_rows, ref_grad = _run(reference.kd_loss_rows, logits, case, tau, LAMBDAS, row_grad)
        assert relative_error(rows, ref_rows) <= 1e-4
        assert relative_error(grad, ref_grad) <= 1e-4


def test_column_splits_heuristic(monkeypatch):
    """One program per row off CUDA and from 4 rows per SM on; on a 132-SM GPU B = 256, C = 1e6 gets 5
    splits and a narrow catalog none."""
    monkeypatch.setattr(logits_kernels, "FORCED_SPLITS", 0)
    assert logits_kernels.column_splits(256, 10**6, torch.device("cpu")) == 1
    monkeypatch.setattr(logits_kernels, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert logits_kernels.column_splits(256, 10**6, cuda) == 5
    assert logits_kernels.column_splits(256, 10**5, cuda) == 3  # capped by SPLIT_MIN_COLS
    assert logits_kernels.column_splits(256, 10**4, cuda) == 1
    assert logits_kernels.column_splits(1024, 10**6, cuda) == 1
    assert logits_kernels.column_splits(512, 10**6, cuda) == 3
    assert logits_kernels.column_splits(0, 10**6, cuda) == 1


def test_grad_inplace_invalidates_other_users_of_the_logits(device, make_case):
    """An op that saved the logits for its own backward must fail loudly, not read the gradient."""
    case = make_case(3, 90, 1, 5, seed=4, with_rank=False, device=device)
    leaf = torch.randn(3, 90, device=device, requires_grad=True)
    logits = leaf * 1
    other = (logits * logits).sum()  # saves `logits`
    rows = kd_loss_rows(logits, *case.args(1.0, 1.0, 1.0, 0.0), grad_inplace=True)
    rows.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        other.backward()


def test_rejects_unsupported_logits(device, make_case):
    case = make_case(2, 50, 1, 3, seed=1, with_rank=False, device=device)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kd_loss_rows(torch.zeros(2, 50, dtype=torch.float16, device=device), *case.args(1.0, 1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="contiguous rows"):
        kd_loss_rows(torch.zeros(50, 2, device=device).T, *case.args(1.0, 1.0, 1.0, 0.0))
