"""Triton ``kd_loss_linear_rows`` (fused linear, [B, C] never materialised) against the reference:
values and the gradients of user_emb, item_emb and item_bias."""
from __future__ import annotations

import pytest
import torch

from prmkd_dist.distill import reference
from prmkd_dist.kernels.kd_loss_linear import kd_loss_linear_rows

# (B, C, d, T, K, tau, with_rank, with_bias): B and C never multiples of the tile sizes, d not a power of 2
CASES = [
    (5, 131, 16, 0, 4, 1.0, False, True),     # T = 0: plain full-softmax cross-entropy
    (6, 300, 24, 1, 1, 1.0, True, False),
    (19, 257, 40, 3, 7, 0.5, True, True),    # two row blocks
    (4, 200, 8, 4, 64, 2.0, True, False),
    (3, 170, 32, 2, 64, 0.8, False, True),
    (3, 40, 16, 2, 5, 1.3, True, True),      # C < 3 item tiles: the interpreter's third catalog split is empty
]
LAMBDAS = (0.9, 1.3, 0.6)  # lambda_ce, lambda_kd, lambda_rank


def _run(backend_fn, user, item, bias, case, tau, row_grad):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (user, item, bias)]
    rows = backend_fn(*leaves, *case.args(tau, *LAMBDAS))
    (rows * row_grad).sum().backward()
    return rows.detach(), [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("batch,n_items,dim,n_teachers,k_slots,tau,with_rank,with_bias", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(batch, n_items, dim, n_teachers, k_slots, tau, with_rank, with_bias, dtype, device,
                           make_case, relative_error):
    seed = 7 * batch + n_items + dim + k_slots
    case = make_case(batch, n_items, n_teachers, k_slots, seed=seed, with_rank=with_rank, device=device)
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(batch, dim, generator=gen).to(device=device, dtype=dtype)
    item = (torch.randn(n_items, dim, generator=gen) * (2.0 / dim ** 0.5)).to(device=device, dtype=dtype)
    bias = torch.randn(n_items, generator=gen).to(device=device, dtype=dtype) if with_bias else None
    row_grad = torch.rand(batch, generator=gen).to(device) + 0.5

    rows, grads = _run(kd_loss_linear_rows, user, item, bias, case, tau, row_grad)
    ref_rows, ref_grads = _run(reference.kd_loss_linear_rows, user, item, bias, case, tau, row_grad)

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    assert relative_error(rows, ref_rows) <= tol
    for name, grad, ref_grad, leaf in zip(("user_emb", "item_emb", "item_bias"), grads, ref_grads, (user, item, bias)):
        if leaf is None:
            continue
        assert grad.dtype == dtype and grad.shape == leaf.shape, name
        assert torch.isfinite(grad.float()).all(), name
        assert relative_error(grad.float(), ref_grad.float()) <= tol, name


def test_same_value_as_logits_form(device, make_case, relative_error):
    """kd_loss_linear is kd_loss on the product: the two Triton paths agree with each other too."""
    from prmkd_dist.kernels.kd_loss import kd_loss_rows

    case = make_case(6, 150, 3, 7, seed=21, with_rank=True, device=device)
    gen = torch.Generator().manual_seed(21)
    user, item = torch.randn(6, 16, generator=gen).to(device), torch.randn(150, 16, generator=gen).to(device)
    fused = kd_loss_linear_rows(user, item, None, *case.args(1.5, *LAMBDAS))
    given = kd_loss_rows((user @ item.T).contiguous(), *case.args(1.5, *LAMBDAS))
    assert relative_error(fused, given) <= 1e-4


def test_rejects_mixed_dtypes(device, make_case):
    case = make_case(2, 40, 1, 3, seed=2, with_rank=False, device=device)
    with pytest.raises(ValueError, match="share a dtype"):
        kd_loss_linear_rows(torch.zeros(2, 8, device=device), torch.zeros(40, 8, device=device, dtype=torch.bfloat16),
                            None, *case.args(1.0, 1.0, 1.0, 0.0))
