"""The C++ CPU backend (csrc/, prmkd_dist.distill.cpp_backend) against the PyTorch reference: per-row values
and gradients, for the logits-given op and the fused linear op, over the edge cases of the spec
(/work/shared/specs/kd-loss.md): T = 0..4, K in {1, 7, 64}, empty slots and empty teachers, duplicate ids
across and within teachers, teacher ids equal to the target, target -1, tau != 1, rank weights None / given,
float32 and bfloat16, catalog sizes that are not multiples of the C++ run / tile sizes."""
from __future__ import annotations

import pytest
import torch

import prmkd_dist
from prmkd_dist.distill import cpp_backend, reference


@pytest.fixture(scope="module", autouse=True)
def _extension_built():
    ok, why = cpp_backend.available()
    if not ok:  # a missing build is a failure, not a skip: `make install` builds it
        pytest.fail(why)


def make_teachers(gen: torch.Generator, B: int, C: int, T: int, K: int, with_rank: bool):
    """Random target / teacher inputs with every structural edge case the spec names."""
    target = torch.randint(0, C, (B,), generator=gen)
    if B:
        target[0] = -1  # a row without CE
    ids = torch.randint(0, C, (B, T, K), generator=gen)
    ids[torch.rand(B, T, K, generator=gen) < 0.25] = -1  # empty slots
    if T >= 1 and K >= 1 and B >= 3:
        ids[1, 0, :] = -1  # a teacher with no valid slot
        ids[2, 0, 0] = target[2]  # a teacher id equal to the target
    if T >= 2 and K >= 1:
        ids[:, 1, 0] = ids[:, 0, 0]  # the same item under two teachers (and empty where teacher 0 is empty)
    if K >= 2:
        ids[:, :, 1] = torch.where(ids[:, :, 0] >= 0, ids[:, :, 0], ids[:, :, 1])  # a duplicate within a teacher
    scores = torch.randn(B, T, K, generator=gen) * 2
    weights = torch.rand(B, T, generator=gen)
    rank = torch.rand(B, T, K, generator=gen) if with_rank else None
    if with_rank and B >= 4 and T >= 1 and K >= 1:
        rank[3, 0, :] = 0.0  # rank weights summing to 0: that teacher's ranking term is 0
    return target, ids, scores, weights, rank


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (scale-free across rows and columns)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def check_rows(dtype, B, C, T, K, tau, with_rank, seed, scale=3.0, lambdas=(1.0, 0.7, 0.3)):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, generator=gen) * scale).to(dtype)
    target, ids, scores, weights, rank = make_teachers(gen, B, C, T, K, with_rank)
    upstream = torch.rand(B, generator=gen) + 0.5  # a non-uniform dL/dl_b exercises grad_rows
    hp = (tau, *lambdas)
    results = []
    for mod in (reference, cpp_backend):
        x = logits.clone().requires_grad_()
        rows = mod.kd_loss_rows(x, target, ids, scores, weights, rank, *hp)
        (rows * upstream).sum().backward()
        results.append((rows.detach(), x.grad))
    (want, want_g), (got, got_g) = results
    assert got.dtype == torch.float32 and got.shape == (B,)
    assert got_g.dtype == dtype and got_g.shape == (B, C)
    assert torch.isfinite(got).all() and torch.isfinite(got_g.float()).all()
    assert rel_err(got, want) <= TOL[dtype], (got, want)
    assert rel_err(got_g, want_g) <= TOL[dtype]


@pytest.mark.parametrize("T", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("K", [1, 7, 64])
def test_rows_float32_matches_reference(T, K):
    # C = 2500 spans a full and a partial 2048-column run; tau and rank weights vary with the case
    check_rows(torch.float32, B=6, C=2500, T=T, K=K, tau=[1.0, 0.5, 2.0][(T + K) % 3],
               with_rank=(T + K) % 2 == 0, seed=100 * T + K)


@pytest.mark.parametrize("tau", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("with_rank", [False, True])
def test_rows_bfloat16_matches_reference(tau, with_rank):
    check_rows(torch.bfloat16, B=5, C=2100, T=3, K=7, tau=tau, with_rank=with_rank, seed=int(tau * 10) + with_rank)


def test_rows_large_logits_and_single_column_stay_finite():
    # logits of magnitude ~1e3 overflow a naive exp; C = 1 makes every softmax trivially 1
    check_rows(torch.float32, B=4, C=3000, T=2, K=7, tau=0.5, with_rank=True, seed=7, scale=1000.0)
    check_rows(torch.float32, B=4, C=1, T=2, K=3, tau=2.0, with_rank=True, seed=8)


def test_rows_only_ranking_term():
    # lambda_ce = lambda_kd = 0: the dense gradient vanishes and only the sparse ranking terms remain
    check_rows(torch.float32, B=6, C=500, T=3, K=7, tau=1.0, with_rank=True, seed=9, lambdas=(0.0, 0.0, 1.0))


@pytest.mark.parametrize("T", [0, 1, 3, 4])
@pytest.mark.parametrize("K", [1, 7, 64])
def test_rows_from_selected_logits_match_reference(T, K):
    """The stats form (what the catalog-parallel loss evaluates after its all-reduces): the row loss from LSE_1,
    LSE_tau and the logits at the target and the teacher slots, values and gradients wrt all three."""
    gen = torch.Generator().manual_seed(1000 + 10 * T + K)
    B, C = 9, 300
    target, ids, scores, weights, rank = make_teachers(gen, B, C, T, K, with_rank=(T + K) % 2 == 1)
    tau = [1.0, 0.6, 2.5][(T + K) % 3]
    logits = torch.randn(B, C, generator=gen) * 3
    lse1 = torch.logsumexp(logits, 1)
    lse_tau = torch.logsumexp(logits / tau, 1)
    sel = torch.cat([logits.gather(1, target.clamp(min=0)[:, None]),
                     logits.gather(1, ids.clamp(min=0).reshape(B, T * K))], 1)
    upstream = torch.rand(B, generator=gen) + 0.5
    results = []
    for fn in (reference.kd_rows_from_sel, cpp_backend.kd_rows_from_sel):
        leaves = [t.clone().requires_grad_() for t in (lse1, lse_tau, sel)]
        rows = fn(*leaves, target, ids, scores, weights, rank, tau, 1.0, 0.7, 0.3)
        (rows * upstream).sum().backward()
        results.append((rows.detach(), [t.grad for t in leaves]))
    (want, want_g), (got, got_g) = results
    assert got.dtype == torch.float32 and got.shape == (B,) and torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5
    for name, g, w in zip(("lse1", "lse_tau", "sel"), got_g, want_g):
        w = torch.zeros_like(g) if w is None else w  # the reference's graph may not reach an unused input
        assert g.shape == w.shape and (rel_err(g, w) <= 1e-5 if w.abs().max() > 0 else g.abs().max() == 0), name
    # the reference's loss on full logits agrees too (the stats form is the same function)
    full = reference.kd_loss_rows(logits, target, ids, scores, weights, rank, tau, 1.0, 0.7, 0.3)
    assert rel_err(got, full) <= 1e-5


def test_rows_ranking_term_elementwise_over_a_wide_logit_range():
    """The ranking term's log sigmoid / sigmoid run in float32 with a polynomial exp and log1p: every row value
    and every slot's gradient must match the float64 reference to ~1e-5 relative ELEMENTWISE (a max-scaled
    error would hide a bad tail), for logits from -60 to 60, around 0 and at the float32 tails."""
    gen = torch.Generator().manual_seed(77)
    B, T, K = 8, 2, 33
    target, ids, scores, weights, rank = make_teachers(gen, B, 500, T, K, with_rank=True)
    rank[3, 0, :] = torch.rand(K, generator=gen)  # make_teachers zeroes this row; keep every list ranked here
    sel = torch.linspace(-60.0, 60.0, B * (1 + T * K)).reshape(B, 1 + T * K)
    sel = sel[:, torch.randperm(1 + T * K, generator=gen)]
    sel[0, 1:8] = torch.tensor([0.0, 1e-6, -1e-6, 1e-3, -1e-3, 88.5, -88.5])
    lse1 = torch.logsumexp(sel, 1) + 3.0
    upstream = torch.rand(B, generator=gen) + 0.5
    results = []
    for fn in (reference.kd_rows_from_sel, cpp_backend.kd_rows_from_sel):
        leaf = sel.clone().double().requires_grad_() if fn is reference.kd_rows_from_sel else sel.clone().requires_grad_()
        l1 = lse1.to(leaf.dtype)
        rows = fn(l1, l1, leaf, target, ids, scores.to(leaf.dtype), weights.to(leaf.dtype),
                  rank.to(leaf.dtype), 1.0, 0.0, 0.0, 1.0)
        (rows * upstream.to(leaf.dtype)).sum().backward()
        results.append((rows.detach().double(), leaf.grad.double()))
    (want, want_g), (got, got_g) = results
    assert torch.isfinite(got).all() and torch.isfinite(got_g).all()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=2e-6, atol=1e-30)


def check_linear(dtype, B, C, d, T, K, tau, with_rank, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(B, d, generator=gen).to(dtype)
    item = torch.randn(C, d, generator=gen).to(dtype)
    bias = torch.randn(C, generator=gen).to(dtype) if with_bias else None
    target, ids, scores, weights, rank = make_teachers(gen, B, C, T, K, with_rank)
    upstream = torch.rand(B, generator=gen) + 0.5
    hp = (tau, 1.0, 0.7, 0.3)
    results = []
    for mod in (reference, cpp_backend):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (user, item, bias)]
        rows = mod.kd_loss_linear_rows(*leaves, target, ids, scores, weights, rank, *hp)
        (rows * upstream).sum().backward()
        results.append((rows.detach(), [t.grad if t is not None else None for t in leaves]))
    (want, want_g), (got, got_g) = results
    assert got.dtype == torch.float32 and got.shape == (B,)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= TOL[dtype]
    for name, g, w, leaf in zip(("user_emb", "item_emb", "item_bias"), got_g, want_g, (user, item, bias)):
        if leaf is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == leaf.shape, name
        assert torch.isfinite(g.float()).all(), name
        assert rel_err(g, w) <= TOL[dtype], name


@pytest.mark.parametrize("T,K", [(0, 1), (1, 1), (2, 7), (3, 64), (4, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_float32_matches_reference(T, K, with_bias):
    # C = 1300 = 2 full 512-item tiles + a partial one; B = 150 = a full 128-row block + a partial one
    check_linear(torch.float32, B=150, C=1300, d=16, T=T, K=K, tau=[1.0, 2.0, 0.5][T % 3],
                 with_rank=T % 2 == 1, with_bias=with_bias, seed=10 * T + K + with_bias)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_bfloat16_matches_reference(with_bias):
    check_linear(torch.bfloat16, B=40, C=1100, d=32, T=3, K=7, tau=2.0, with_rank=True, with_bias=with_bias,
                 seed=55 + with_bias)


def test_linear_same_result_on_one_and_two_threads():
    # the per-thread LSE states and d user accumulators are merged at the end; 1 thread has nothing to merge
    gen = torch.Generator().manual_seed(3)
    B, C, d = 64, 5000, 16
    user, item = torch.randn(B, d, generator=gen), torch.randn(C, d, generator=gen)
    target, ids, scores, weights, rank = make_teachers(gen, B, C, 2, 7, True)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            u, i = user.clone().requires_grad_(), item.clone().requires_grad_()
            rows = cpp_backend.kd_loss_linear_rows(u, i, None, target, ids, scores, weights, rank, 1.5, 1.0, 1.0, 0.5)
            rows.sum().backward()
            out.append((rows.detach(), u.grad, i.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out):
        assert rel_err(a, b) <= 1e-5


def test_public_dispatcher_uses_cpp_backend():
    gen = torch.Generator().manual_seed(11)
    B, C = 8, 700
    logits = torch.randn(B, C, generator=gen)
    target, ids, scores, weights, rank = make_teachers(gen, B, C, 3, 7, True)
    kw = dict(temperature=2.0, lambda_ce=1.0, lambda_kd=0.5, lambda_rank=0.2, reduction="sum")
    grads = []
    values = []
    for backend in ("reference", "cpp"):
        x = logits.clone().requires_grad_()
        loss = prmkd_dist.kd_loss(x, target, ids, scores, weights, rank, backend=backend, **kw)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    assert prmkd_dist.distill.loss.last_resolution().name == "cpp"
    assert rel_err(values[1], values[0]) <= 1e-4
    assert rel_err(grads[1], grads[0]) <= 1e-4

    user, item = torch.randn(B, 16, generator=gen), torch.randn(C, 16, generator=gen)
    lin = [prmkd_dist.kd_loss_linear(user, item, target, ids, scores, weights, rank, backend=b, **kw)
           for b in ("reference", "cpp")]
    assert rel_err(lin[1], lin[0]) <= 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_reduction_through_the_dispatcher(reduction, dtype):
    # the public functions reduce the C++ rows; values and gradients against the reference, both forms
    gen = torch.Generator().manual_seed(13)
    B, C, d = 9, 1030, 16
    logits = (torch.randn(B, C, generator=gen) * 3).to(dtype)
    user, item = torch.randn(B, d, generator=gen).to(dtype), torch.randn(C, d, generator=gen).to(dtype)
    bias = torch.randn(C, generator=gen).to(dtype)
    target, ids, scores, weights, rank = make_teachers(gen, B, C, 3, 7, True)
    kw = dict(temperature=0.6, lambda_ce=0.9, lambda_kd=1.1, lambda_rank=0.4, reduction=reduction)
    upstream = torch.rand(B, generator=gen) + 0.5
    out = {}
    for backend in ("reference", "cpp"):
        x = logits.clone().requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (user, item, bias)]
        a = prmkd_dist.kd_loss(x, target, ids, scores, weights, rank, backend=backend, **kw)
        b = prmkd_dist.kd_loss_linear(leaves[0], leaves[1], target, ids, scores, weights, rank, item_bias=leaves[2],
                                      backend=backend, **kw)
        assert a.shape == b.shape == ((B,) if reduction == "none" else ())
        ((a * upstream).sum() if reduction == "none" else a).backward()
        ((b * upstream).sum() if reduction == "none" else b).backward()
        out[backend] = [a.detach(), b.detach(), x.grad] + [t.grad for t in leaves]
    for got, want in zip(out["cpp"], out["reference"]):
        assert torch.isfinite(got.float()).all()
        assert rel_err(got, want) <= TOL[dtype]


def test_ops_reject_malformed_inputs():
    # the dispatcher validates values; the ops themselves still refuse shapes that would read out of bounds
    logits = torch.randn(4, 10)
    ids = torch.zeros(4, 2, 3, dtype=torch.long)
    good = (torch.zeros(4, dtype=torch.long), ids, torch.zeros(4, 2, 3), torch.ones(4, 2))
    with pytest.raises(RuntimeError, match="teacher_weights"):
        torch.ops.prmkd.kd_loss_fwd(logits, *good[:3], torch.ones(4, 3), None, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="target"):
        torch.ops.prmkd.kd_loss_fwd(logits, torch.zeros(5, dtype=torch.long), *good[1:], None, 1.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.prmkd.kd_loss_fwd(logits, *good, None, 0.0, 1.0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="share d"):
        torch.ops.prmkd.kd_loss_linear_fwd(torch.randn(4, 8), torch.randn(10, 9), None, *good, None,
                                           1.0, 1.0, 1.0, 0.0)


def test_fake_kernels_pass_opcheck():
    # schema and fake (meta) kernels agree with the real ones, so torch.compile can trace the ops
    gen = torch.Generator().manual_seed(5)
    B, C = 4, 300
    target, ids, scores, weights, rank = make_teachers(gen, B, C, 2, 5, True)
    teach = (target, ids, scores, weights, rank, 2.0, 1.0, 1.0, 0.5)
    logits = torch.randn(B, C, generator=gen)
    loss, lse1, lse_tau = torch.ops.prmkd.kd_loss_fwd(logits, *teach)
    user, item, bias = torch.randn(B, 8), torch.randn(C, 8), torch.randn(C)
    lin = torch.ops.prmkd.kd_loss_linear_fwd(user, item, bias, *teach)
    cases = [
        (torch.ops.prmkd.kd_loss_fwd, (logits, *teach)),
        (torch.ops.prmkd.kd_loss_bwd, (torch.ones(B), logits, lse1, lse_tau, *teach)),
        (torch.ops.prmkd.kd_loss_linear_fwd, (user, item, bias, *teach)),
        (torch.ops.prmkd.kd_loss_linear_bwd, (torch.ones(B), user, item, bias, lin[1], lin[2], *teach)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_empty_batch_and_zero_slots():
    # B = 0 and K = 0 ([B, T, 0] teachers: cross-entropy only) are legal shapes of the contract
    gen = torch.Generator().manual_seed(12)
    for B, T, K in ((0, 2, 3), (5, 2, 0)):
        logits = torch.randn(B, 300, generator=gen)
        target, ids, scores, weights, _ = make_teachers(gen, B, 300, T, K, False)
        x = logits.clone().requires_grad_()
        got = cpp_backend.kd_loss_rows(x, target, ids, scores, weights, None, 1.0, 1.0, 1.0, 0.0)
        got.sum().backward()
        assert got.shape == (B,) and x.grad.shape == (B, 300)
        if B:  # (the reference itself cannot reshape an empty batch; the C++ ops must just not fail)
            want = reference.kd_loss_rows(logits, target, ids, scores, weights, None, 1.0, 1.0, 1.0, 0.0)
            assert rel_err(got, want) <= 1e-4
        user, item = torch.randn(B, 8, generator=gen), torch.randn(300, 8, generator=gen)
        lin = cpp_backend.kd_loss_linear_rows(user, item, None, target, ids, scores, weights, None, 1.0, 1.0, 1.0, 0.0)
        if B:
            assert rel_err(lin, reference.kd_loss_linear_rows(user, item, None, target, ids, scores, weights, None,
                                                              1.0, 1.0, 1.0, 0.0)) <= 1e-4
        assert lin.shape == (B,)
