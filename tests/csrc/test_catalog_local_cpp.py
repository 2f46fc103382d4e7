"""The C++ local part of the catalog-parallel loss (``torch.ops.prmkd.kd_catalog_local_stats`` / ``_grad``,
csrc/kd_catalog_local.cpp) against a direct float64 PyTorch computation on the materialised [B, R] logits,
and against the chunked PyTorch reference of the same pair (``reference.catalog_local_*``). The ops compute
in float32, so float32 inputs are held to a relative error of 1e-4, bfloat16 inputs to 1e-2."""
from __future__ import annotations

import pytest
import torch

from prmkd_dist.distill import cpp_backend, reference
from prmkd_dist.distill.loss import resolve_backend


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    ok, why = cpp_backend.available()
    if not ok:  # a missing build is a failure, not a skip: `make install` builds it
        pytest.fail(why)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def direct(user, item, bias, tau, g1, gt, lse1, lse_tau, idx, gsel):
    """Stats and gradients straight from the definition, in float64, on the full local logits."""
    u, w = user.double(), item.double()
    s = u @ w.T + (bias.double() if bias is not None else 0.0)
    if s.shape[1]:
        m = s.max(dim=1).values
        z1 = (s - m[:, None]).exp().sum(dim=1)
        zt = ((s - m[:, None]) / tau).exp().sum(dim=1)
    else:
        m = torch.full((s.shape[0],), float("-inf"), dtype=torch.float64)
        z1 = zt = torch.zeros(s.shape[0], dtype=torch.float64)
    ds = (g1.double()[:, None] * (s - lse1.double()[:, None]).exp()
          + (gt.double() / tau)[:, None] * (s / tau - lse_tau.double()[:, None]).exp())
    for b in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            if idx[b, k] >= 0:
                ds[b, idx[b, k]] += gsel[b, k].double()
    return (m, z1, zt), (ds @ w, ds.T @ u, ds.sum(dim=0) if bias is not None else None)


def make(seed, B, R, d, M, dtype, with_bias, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    user = (torch.randn(B, d, generator=gen) * scale).to(dtype)
    item = torch.randn(R, d, generator=gen).to(dtype)
    bias = torch.randn(R, generator=gen).to(dtype) if with_bias else None
    # global LSEs of a larger catalog (this shard's own ones plus something): any values >= the local ones
    s = user.double() @ item.double().T + (bias.double() if with_bias else 0.0)
    extra = torch.rand(B, generator=gen, dtype=torch.float64) * 3
    lse1 = (torch.logsumexp(s, dim=1) if R else torch.zeros(B, dtype=torch.float64)) + extra
    idx = torch.randint(-1, max(R, 1), (B, M), generator=gen) if R else torch.full((B, M), -1)
    if R and M >= 2:
        idx[:, 1] = idx[:, 0]  # the same local row twice in a row (duplicate ids across teachers)
    gsel = torch.randn(B, M, generator=gen)
    g1 = torch.rand(B, generator=gen) + 0.2
    gt = torch.rand(B, generator=gen) + 0.2
    return user, item, bias, g1, gt, lse1, idx, gsel


@pytest.mark.parametrize("B,R,d,M", [(150, 1300, 16, 7), (3, 1, 8, 2), (9, 513, 24, 1), (5, 0, 8, 3)])
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_pair_matches_direct_computation(B, R, d, M, tau, with_bias, dtype):
    # R = 1300 = 2 full 512-row tiles + a partial one, B = 150 = a full 128-row block + a partial one;
    # R = 0: a rank that holds no rows
    user, item, bias, g1, gt, lse1_64, idx, gsel = make(int(tau * 10) + R + with_bias, B, R, d, M, dtype, with_bias)
    # LSE_tau of the same larger catalog (at tau = 1 it IS lse1)
    s = user.double() @ item.double().T + (bias.double() if with_bias else 0.0)
    lse_tau_64 = lse1_64 if tau == 1.0 else (
        (torch.logsumexp(s / tau, dim=1) if R else torch.zeros(B, dtype=torch.float64)) + 0.5)
    lse1, lse_tau = lse1_64.float(), lse_tau_64.float()
    (m, z1, zt), (du, dw, db) = direct(user, item, bias, tau, g1, gt, lse1, lse_tau, idx, gsel)
    tol = 1e-4 if dtype == torch.float32 else 1e-2

    gm, gz1, gzt, gsel_logits = torch.ops.prmkd.kd_catalog_local_stats(user, item, bias, tau, idx)
    assert gm.dtype == gz1.dtype == gzt.dtype == torch.float64 and gm.shape == (B,)
    # the logits at the selected local rows, picked out of the tiles (0 where idx = -1)
    want_sel = torch.where(idx >= 0, s.gather(1, idx.clamp(min=0)) if R else torch.zeros(B, M, dtype=torch.float64),
                           torch.zeros((), dtype=torch.float64))
    assert gsel_logits.dtype == torch.float32 and gsel_logits.shape == (B, M)
    assert rel_err(gsel_logits, want_sel) <= tol and (gsel_logits[idx < 0] == 0).all()
    if R == 0:
        assert torch.isinf(gm).all() and (gm < 0).all() and (gz1 == 0).all() and (gzt == 0).all()
    else:
        # compare the log-sum-exps the caller builds from them (the split into max and sum is an implementation
        # detail only up to rounding)
        assert rel_err(gm + gz1.log(), m + z1.log()) <= tol
        assert rel_err(gm / tau + gzt.log(), m / tau + zt.log()) <= tol
        assert torch.isfinite(gz1).all() and torch.isfinite(gzt).all()

    got = cpp_backend.catalog_local_grad(user, item, bias, g1, gt, lse1, lse_tau, idx, gsel, tau)
    assert got[0].shape == (B, d) and got[1].shape == (R, d)
    assert all(t.dtype == torch.float32 for t in got if t is not None)
    for name, g, w in zip(("d user", "d item", "d bias"), got, (du, dw, db)):
        if w is None:
            assert g is None, name
            continue
        assert torch.isfinite(g).all(), name
        if w.numel():
            assert rel_err(g, w) <= tol, name


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_fused_pair_matches_chunked_reference(tau):
    # the two implementations behind resolve_backend(op="catalog_local") agree (reference on float64 inputs)
    B, R, d, M = 40, 1100, 16, 5
    user, item, bias, g1, gt, lse1, idx, gsel = make(7, B, R, d, M, torch.float32, True, scale=2.0)
    ref_stats = reference.catalog_local_stats(user.double(), item.double(), bias.double(), tau, chunk_rows=97)
    cpp_stats = cpp_backend.catalog_local_stats(user, item, bias, tau)
    assert ref_stats[3] is None and cpp_stats[3] is None
    assert rel_err(cpp_stats[0] + cpp_stats[1].log(), ref_stats[0] + ref_stats[1].log()) <= 1e-4
    ref_sel = reference.catalog_local_stats(user.double(), item.double(), bias.double(), tau, 97, sel_idx=idx)[3]
    cpp_sel = cpp_backend.catalog_local_stats(user, item, bias, tau, sel_idx=idx)[3]
    assert rel_err(cpp_sel, ref_sel) <= 1e-4 and (ref_sel[idx < 0] == 0).all()
    assert rel_err(cpp_stats[0] / tau + cpp_stats[2].log(), ref_stats[0] / tau + ref_stats[2].log()) <= 1e-4
    lse_tau = lse1 if tau == 1.0 else lse1 / tau
    args = (g1, gt, lse1, lse_tau, idx, gsel, tau)
    ref = reference.catalog_local_grad(user.double(), item.double(), bias.double(), *args, chunk_rows=97)
    got = cpp_backend.catalog_local_grad(user, item, bias, *args)
    for g, w in zip(got, ref):
        assert rel_err(g, w) <= 1e-4


@pytest.mark.parametrize("offset", [0, 700, 2900])
def test_global_ids_keep_only_the_shards_own(offset):
    # ids are global: the shard holds items [offset, offset + R); the others (and -1) are skipped by both
    # implementations, which agree entry by entry, and an id that is on the shard is picked / routed
    B, R, d, M = 30, 1100, 8, 9
    user, item, bias, g1, gt, lse1, _, gsel = make(11, B, R, d, M, torch.float32, True)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(-1, 4000, (B, M), generator=gen)
    idx[0, 0] = offset           # first row of the shard
    idx[0, 1] = offset + R - 1   # last row of the shard
    idx[0, 2] = offset + R       # the next shard's first item
    mine = (idx >= offset) & (idx < offset + R)
    cpp_sel = cpp_backend.catalog_local_stats(user, item, bias, 1.3, sel_idx=idx, id_offset=offset)[3]
    ref_sel = reference.catalog_local_stats(user.double(), item.double(), bias.double(), 1.3, 97, sel_idx=idx,
                                            id_offset=offset)[3]
    assert (cpp_sel[~mine] == 0).all() and (ref_sel[~mine] == 0).all()
    s = user.double() @ item.double().T + bias.double()
    local = (idx - offset).clamp(0, R - 1)
    assert rel_err(cpp_sel[mine], s.gather(1, local)[mine]) <= 1e-5
    assert rel_err(cpp_sel, ref_sel) <= 1e-5
    args = (g1, gt, lse1, lse1, idx, gsel, 1.3)
    got = cpp_backend.catalog_local_grad(user, item, bias, *args, id_offset=offset)
    ref = reference.catalog_local_grad(user.double(), item.double(), bias.double(), *args, chunk_rows=97,
                                       id_offset=offset)
    # the same sparse entries with shard-local ids and offset 0: the result does not depend on the id convention
    local_ids = torch.where(mine, idx - offset, torch.full_like(idx, -1))
    as_local = cpp_backend.catalog_local_grad(user, item, bias, g1, gt, lse1, lse1, local_ids, gsel, 1.3)
    for g, w, l in zip(got, ref, as_local):
        assert rel_err(g, w) <= 1e-4
        torch.testing.assert_close(g, l, rtol=0, atol=0)


def test_same_result_on_one_and_two_threads():
    # per-thread states / accumulators are merged at the end; 1 thread has nothing to merge
    user, item, bias, g1, gt, lse1, idx, gsel = make(3, 64, 5000, 16, 4, torch.float32, True)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            stats = torch.ops.prmkd.kd_catalog_local_stats(user, item, bias, 1.5)
            lse = (stats[0] + stats[1].log()).float()
            lse_t = (stats[0] / 1.5 + stats[2].log()).float()
            out.append((lse, lse_t) + cpp_backend.catalog_local_grad(user, item, bias, g1, gt, lse, lse_t, idx,
                                                                     gsel, 1.5))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out):
        assert rel_err(a, b) <= 1e-5


def test_ops_reject_malformed_inputs():
    user, item = torch.randn(4, 8), torch.randn(10, 8)
    ones = torch.ones(4)
    idx, g = torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2)
    grad = torch.ops.prmkd.kd_catalog_local_grad
    with pytest.raises(RuntimeError, match=r"sparse_idx\[0, 0\] = -2: item ids must be >= -1"):
        grad(user, item, None, ones, ones, ones, ones, torch.full((4, 2), -2), g, 1.0)
    with pytest.raises(RuntimeError, match="id_offset must be >= 0"):
        grad(user, item, None, ones, ones, ones, ones, idx, g, 1.0, -1)
    with pytest.raises(RuntimeError, match="sparse_grad"):
        grad(user, item, None, ones, ones, ones, ones, idx, torch.zeros(4, 3), 1.0)
    with pytest.raises(RuntimeError, match="coef_lse1"):
        grad(user, item, None, torch.ones(5), ones, ones, ones, idx, g, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.prmkd.kd_catalog_local_stats(user, item, None, 0.0)
    bad = torch.zeros(4, 2, dtype=torch.long)
    bad[2, 1] = -5
    with pytest.raises(RuntimeError, match=r"sel_idx\[2, 1\] = -5: item ids must be >= -1"):
        torch.ops.prmkd.kd_catalog_local_stats(user, item, None, 1.0, bad)
    with pytest.raises(RuntimeError, match="sel_idx"):
        torch.ops.prmkd.kd_catalog_local_stats(user, item, None, 1.0, torch.zeros(5, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="share d"):
        torch.ops.prmkd.kd_catalog_local_stats(user, torch.randn(10, 9), None, 1.0)
    with pytest.raises(RuntimeError, match="item_bias"):
        torch.ops.prmkd.kd_catalog_local_stats(user, item, torch.randn(9), 1.0)


def test_fake_kernels_pass_opcheck():
    user, item, bias = torch.randn(4, 8), torch.randn(30, 8), torch.randn(30)
    ones = torch.ones(4)
    idx, g = torch.randint(-1, 30, (4, 3)), torch.randn(4, 3)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.prmkd.kd_catalog_local_stats, (user, item, b, 2.0),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.prmkd.kd_catalog_local_stats, (user, item, b, 2.0, idx),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.prmkd.kd_catalog_local_grad, (user, item, b, ones, ones, ones, ones, idx, g, 2.0),
                              test_utils=("test_schema", "test_faketensor"))


def test_dispatch_of_the_local_part():
    # one place decides: the fused op for CPU float32 / bfloat16, the chunked reference for float64
    assert resolve_backend("auto", "cpu", torch.float32, op="catalog_local").name == "cpp"
    assert resolve_backend("auto", "cpu", torch.bfloat16, op="catalog_local").name == "cpp"
    res = resolve_backend("auto", "cpu", torch.float64, op="catalog_local")
    assert res.name == "reference" and "float64" in res.reason
    with pytest.raises(RuntimeError, match="float64"):
        resolve_backend("cpp", "cpu", torch.float64, op="catalog_local")
    with pytest.raises(ValueError, match="op must be one of"):
        resolve_backend("auto", "cpu", torch.float32, op="nope")
