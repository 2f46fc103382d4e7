"""Triton local part of the catalog-parallel loss (``prmkd_dist.kernels.kd_catalog_local``) against the chunked
PyTorch reference of the same pair (``reference.catalog_local_stats`` / ``catalog_local_grad``): the statistics,
the selected logits and the three gradients, on fresh random inputs."""
from __future__ import annotations

import pytest
import torch

from prmkd_dist.distill import reference
from prmkd_dist.kernels.kd_catalog_local import catalog_local_grad, catalog_local_stats

B, D, M = 19, 24, 21  # two row blocks, d not a power of 2, M over two gather programs (interpreter tiles 16 / 32)


def make(seed: int, rows: int, dtype: torch.dtype, with_bias: bool, tau: float, device: torch.device):
    """Shard inputs with -1 and duplicate selected / sparse rows, the last (ragged-tile) row selected, NaN
    upstream values at -1 entries (never read), and global LSEs of a larger catalog than the shard."""
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(B, D, generator=gen).to(dtype)
    item = (torch.randn(rows, D, generator=gen) * 0.6).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype) if with_bias else None
    idx = torch.randint(-1, max(rows, 1), (B, M), generator=gen) if rows else torch.full((B, M), -1)
    if rows:
        idx[:, 1] = idx[:, 0]  # duplicates within a row
        idx[0, 2] = rows - 1
        idx[1] = -1  # a row with nothing on this shard
    s = user.double() @ item.double().T + (bias.double() if with_bias else 0.0)
    local = lambda x: torch.logsumexp(x, dim=1) if rows else torch.zeros(B, dtype=torch.float64)  # noqa: E731
    lse1 = local(s) + torch.rand(B, generator=gen, dtype=torch.float64) * 2
    # at tau = 1 too the rows' LSE_tau differs from LSE_1 here: the reference's formula allows any value
    lse_tau = local(s / tau) + torch.rand(B, generator=gen, dtype=torch.float64) * 2
    coef1 = torch.randn(B, generator=gen)
    coef_tau = torch.randn(B, generator=gen)
    sparse_grad = torch.randn(B, M, generator=gen).masked_fill(idx < 0, float("nan"))
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return [move(x) for x in (user, item, bias, idx, coef1, coef_tau, lse1.float(), lse_tau.float(), sparse_grad)]


@pytest.mark.parametrize("rows", [75, 0])  # 75: three catalog splits, ragged tiles; 0: an empty shard
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(rows, with_bias, tau, dtype, device, relative_error):
    user, item, bias, idx, coef1, coef_tau, lse1, lse_tau, sparse_grad = make(
        rows + 3 * with_bias + int(10 * tau), rows, dtype, with_bias, tau, device)
    tol = 1e-4 if dtype == torch.float32 else 1e-2

    got = catalog_local_stats(user, item, bias, tau, sel_idx=idx)
    want = reference.catalog_local_stats(user, item, bias, tau, 16, idx)
    for name, g in zip(("m", "z1", "zt"), got[:3]):
        assert g.dtype == torch.float64 and g.shape == (B,), name
    assert got[3].dtype == torch.float32 and got[3].shape == (B, M)
    if rows == 0:
        assert torch.isneginf(got[0]).all() and not got[1].any() and not got[2].any() and not got[3].any()
    else:
        for name, g, w in zip(("m", "z1", "zt", "selected logits"), got, want):
            assert relative_error(g, w) <= tol, name
        assert not got[3][idx < 0].any()  # 0 where nothing is selected
    assert catalog_local_stats(user, item, bias, tau, chunk_rows=7)[3] is None

    got = catalog_local_grad(user, item, bias, coef1, coef_tau, lse1, lse_tau, idx, sparse_grad, tau)
    want = reference.catalog_local_grad(user, item, bias, coef1, coef_tau, lse1, lse_tau, idx, sparse_grad, tau, 16)
    assert (got[2] is None) == (not with_bias) == (want[2] is None)
    for name, g, w, shape in zip(("d user", "d item", "d bias"), got, want, ((B, D), (rows, D), (rows,))):
        if g is None:
            continue
        assert g.dtype == torch.float32 and g.shape == shape, name
        assert torch.isfinite(g).all(), name
        if rows:
            assert relative_error(g, w) <= tol, name
        else:
            assert not g.any(), name


def test_global_ids_with_an_offset(device, relative_error):
    """Global ids on a shard holding items [30, 30 + 75): the others (and -1) are skipped, as in the reference."""
    user, item, bias, idx, coef1, coef_tau, lse1, lse_tau, sparse_grad = make(9, 75, torch.float32, True, 0.8, device)
    gen = torch.Generator().manual_seed(9)
    gidx = torch.randint(-1, 200, idx.shape, generator=gen).to(device)
    sparse_grad = torch.randn(sparse_grad.shape, generator=gen).to(device)
    got = catalog_local_stats(user, item, bias, 0.8, sel_idx=gidx, id_offset=30)
    want = reference.catalog_local_stats(user, item, bias, 0.8, 16, gidx, id_offset=30)
    assert relative_error(got[3], want[3]) <= 1e-4
    assert not got[3][(gidx < 30) | (gidx >= 105)].any()
    got = catalog_local_grad(user, item, bias, coef1, coef_tau, lse1, lse_tau, gidx, sparse_grad, 0.8, id_offset=30)
    want = reference.catalog_local_grad(user, item, bias, coef1, coef_tau, lse1, lse_tau, gidx, sparse_grad, 0.8, 16,
                                        id_offset=30)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= 1e-4


def test_no_selected_and_no_sparse_columns(device, relative_error):
    """M = 0: no selected logits to gather and no sparse entries, only the dense softmax part."""
    user, item, bias, idx, coef1, coef_tau, lse1, lse_tau, _ = make(5, 40, torch.float32, True, 1.4, device)
    none = idx[:, :0]
    assert catalog_local_stats(user, item, bias, 1.4, sel_idx=none)[3].shape == (B, 0)
    got = catalog_local_grad(user, item, bias, coef1, coef_tau, lse1, lse_tau, none, none.float(), 1.4)
    want = reference.catalog_local_grad(user, item, bias, coef1, coef_tau, lse1, lse_tau, none, none.float(), 1.4, 16)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= 1e-4


def test_rejects_mixed_dtypes(device):
    with pytest.raises(ValueError, match="share a dtype"):
        catalog_local_stats(torch.zeros(2, 8, device=device), torch.zeros(4, 8, device=device, dtype=torch.bfloat16),
                            None, 1.0)
