"""The reference distillation loss against hand-computed values (math / numpy), term by term, and against an
independent per-row numpy implementation of the spec on random inputs; gradients by gradcheck."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prmkd_dist import kd_loss, kd_loss_linear


def _lse(x) -> float:
    m = max(x)
    return m + math.log(sum(math.exp(v - m) for v in x))


def _softmax(x) -> list[float]:
    z = _lse(x)
    return [math.exp(v - z) for v in x]


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


def ref(logits, target, ids, scores, weights, rank=None, **kw):
    return kd_loss(logits, torch.tensor(target), torch.tensor(ids), scores, weights, rank,
                   backend="reference", **kw)


# ------------------------------------------------------------------------------------------- hand-computed
S = [1.0, 2.0, 0.5]  # B = 1, C = 3


def test_cross_entropy_alone():
    loss = ref(t64([S]), [1], [[[2, 0]]], t64([[[1.0, 3.0]]]), t64([[0.7]]), lambda_kd=0.0)
    assert loss.item() == pytest.approx(_lse(S) - 2.0, rel=1e-12)


def test_cross_entropy_skipped_for_target_minus_one():
    loss = ref(t64([S]), [-1], [[[2, 0]]], t64([[[1.0, 3.0]]]), t64([[0.7]]), lambda_kd=0.0)
    assert loss.item() == 0.0


def _kl_hand(ids, scores, tau):
    p = _softmax([v / tau for v in scores])
    lse_tau = _lse([v / tau for v in S])
    return sum(pk * (math.log(pk) - (S[i] / tau - lse_tau)) for pk, i in zip(p, ids))


def test_kl_term_with_temperature_and_weight():
    tau = 2.0
    loss = ref(t64([S]), [-1], [[[2, 0]]], t64([[[1.0, 3.0]]]), t64([[0.7]]), temperature=tau,
               lambda_ce=0.0, lambda_kd=1.5)
    assert loss.item() == pytest.approx(1.5 * tau**2 * 0.7 * _kl_hand([2, 0], [1.0, 3.0], tau), rel=1e-12)


def test_empty_slot_is_ignored_whatever_its_score():
    tau = 2.0
    loss = ref(t64([S]), [-1], [[[2, -1, 0]]], t64([[[1.0, 99.0, 3.0]]]), t64([[0.7]]), temperature=tau,
               lambda_ce=0.0)
    assert loss.item() == pytest.approx(tau**2 * 0.7 * _kl_hand([2, 0], [1.0, 3.0], tau), rel=1e-12)


def test_empty_teacher_contributes_nothing():
    loss = ref(t64([S]), [0], [[[-1, -1]]], t64([[[1.0, 3.0]]]), t64([[5.0]]),
               t64([[[1.0, 1.0]]]), lambda_rank=2.0)
    assert loss.item() == pytest.approx(_lse(S) - S[0], rel=1e-12)


def test_ranking_term_normalises_rank_weights_over_valid_slots():
    rank = t64([[[1.0, 7.0, 3.0]]])  # the 7 sits on an empty slot: rho_hat = [1/4, 3/4]
    loss = ref(t64([S]), [-1], [[[2, -1, 0]]], t64([[[1.0, 0.0, 3.0]]]), t64([[0.7]]), rank,
               lambda_ce=0.0, lambda_kd=0.0, lambda_rank=0.5)
    expected = 0.5 * 0.7 * -(0.25 * _logsig(S[2]) + 0.75 * _logsig(S[0]))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ranking_term_is_zero_when_valid_rank_weights_sum_to_zero_or_none():
    args = (t64([S]), [-1], [[[2, -1]]], t64([[[1.0, 0.0]]]), t64([[0.7]]))
    zero_sum = ref(*args, t64([[[0.0, 5.0]]]), lambda_ce=0.0, lambda_kd=0.0, lambda_rank=1.0)
    none = ref(*args, None, lambda_ce=0.0, lambda_kd=0.0, lambda_rank=1.0)
    assert zero_sum.item() == 0.0 and none.item() == 0.0


def test_duplicate_ids_across_teachers_and_target_terms_add():
    tau = 1.5
    ids = [[[0, 2], [2, 0]]]  # both teachers list items 0 and 2; item 0 is also the target
    scores = t64([[[3.0, 1.0], [0.5, 2.5]]])
    rank = t64([[[1.0, 1.0], [2.0, 1.0]]])
    loss = ref(t64([S]), [0], ids, scores, t64([[0.25, 2.0]]), rank, temperature=tau, lambda_ce=0.3,
               lambda_kd=0.9, lambda_rank=0.4)
    kl = 0.25 * _kl_hand([0, 2], [3.0, 1.0], tau) + 2.0 * _kl_hand([2, 0], [0.5, 2.5], tau)
    rk = 0.25 * -(0.5 * _logsig(S[0]) + 0.5 * _logsig(S[2])) + 2.0 * -(2 / 3 * _logsig(S[2]) + 1 / 3 * _logsig(S[0]))
    expected = 0.3 * (_lse(S) - S[0]) + 0.9 * tau**2 * kl + 0.4 * rk
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_no_teachers_is_plain_cross_entropy_for_t0_and_k0():
    torch.manual_seed(0)
    logits = torch.randn(5, 9)
    target = torch.tensor([0, 8, -1, 3, 3])
    expected = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum") / 5
    t0 = kd_loss(logits, target, torch.empty(5, 0, 4, dtype=torch.long), torch.empty(5, 0, 4),
                 torch.empty(5, 0))
    k0 = kd_loss(logits, target, torch.empty(5, 2, 0, dtype=torch.long), torch.empty(5, 2, 0),
                 torch.ones(5, 2), torch.empty(5, 2, 0), lambda_rank=1.0)
    assert t0.item() == pytest.approx(expected.item(), rel=1e-6)
    assert k0.item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------- random vs numpy
def numpy_rows(s, target, ids, scores, w, rank, tau, lce, lkd, lrank):
    """The spec, row by row, slot by slot, in numpy float64."""
    s = np.asarray(s, dtype=np.float64)
    out = []
    for b in range(s.shape[0]):
        row = s[b]
        lse1 = np.log(np.exp(row - row.max()).sum()) + row.max()
        lse_t = np.log(np.exp(row / tau - (row / tau).max()).sum()) + (row / tau).max()
        ce = lse1 - row[target[b]] if target[b] >= 0 else 0.0
        kl_sum = rk_sum = 0.0
        for t in range(ids.shape[1]):
            valid = [k for k in range(ids.shape[2]) if ids[b, t, k] >= 0]
            if not valid:
                continue
            z = np.array([scores[b, t, k] / tau for k in valid])
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            logq = np.array([row[ids[b, t, k]] / tau - lse_t for k in valid])
            kl_sum += w[b, t] * float((p * (np.log(p) - logq)).sum())
            if rank is not None:
                rw = np.array([rank[b, t, k] for k in valid])
                if rw.sum() > 0:
                    rho = rw / rw.sum()
                    sig = np.array([row[ids[b, t, k]] for k in valid])
                    rk_sum += w[b, t] * float(-(rho * -np.log1p(np.exp(-sig))).sum())
        out.append(lce * ce + lkd * tau * tau * kl_sum + lrank * rk_sum)
    return np.array(out)


def random_case(seed, b=6, c=11, t=3, k=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype) * 2
    ids = torch.randint(0, c, (b, t, k), generator=g)
    ids[torch.rand(b, t, k, generator=g) < 0.3] = -1      # empty slots
    ids[0, 1] = -1                                          # an empty teacher
    ids[1, 1] = ids[1, 0]                                   # duplicate ids across teachers
    target = torch.randint(0, c, (b,), generator=g)
    target[2] = -1
    ids[3, 0, 0] = target[3]                                # a teacher id equal to the target
    scores = torch.randn(b, t, k, generator=g, dtype=dtype) * 3
    weights = torch.rand(b, t, generator=g, dtype=dtype) * 2
    rank = torch.rand(b, t, k, generator=g, dtype=dtype)
    rank[b - 1, t - 1] = 0.0                                # a teacher whose rank weights sum to 0
    return logits, target, ids, scores, weights, rank


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
def test_random_batch_matches_independent_numpy_rows(tau):
    logits, target, ids, scores, weights, rank = random_case(1)
    got = kd_loss(logits, target, ids, scores, weights, rank, temperature=tau, lambda_ce=0.7, lambda_kd=1.3,
                  lambda_rank=0.6, reduction="none", backend="reference")
    want = numpy_rows(logits.numpy(), target.numpy(), ids.numpy(), scores.numpy(), weights.numpy(), rank.numpy(),
                      tau, 0.7, 1.3, 0.6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_reductions():
    logits, target, ids, scores, weights, rank = random_case(2)
    kw = dict(temperature=2.0, lambda_rank=0.5, backend="reference")
    rows = kd_loss(logits, target, ids, scores, weights, rank, reduction="none", **kw)
    assert rows.shape == (6,)
    assert kd_loss(logits, target, ids, scores, weights, rank, reduction="sum", **kw).item() == pytest.approx(rows.sum().item())
    assert kd_loss(logits, target, ids, scores, weights, rank, reduction="mean", **kw).item() == pytest.approx(rows.mean().item())


def test_large_logits_are_stable():
    logits, target, ids, scores, weights, rank = random_case(3, dtype=torch.float32)
    logits = logits * 1e4  # exp would overflow without the max shift
    out = kd_loss(logits, target, ids, scores, weights, rank, lambda_rank=0.5, reduction="none", backend="reference")
    assert torch.isfinite(out).all()


def test_bfloat16_logits_are_computed_in_float32():
    logits, target, ids, scores, weights, rank = random_case(4, dtype=torch.float32)
    bf = logits.to(torch.bfloat16).requires_grad_()
    got = kd_loss(bf, target, ids, scores, weights, rank, temperature=1.5, lambda_rank=0.5, reduction="none",
                  backend="reference")
    assert got.dtype == torch.float32
    want = kd_loss(bf.detach().float(), target, ids, scores, weights, rank, temperature=1.5, lambda_rank=0.5,
                   reduction="none", backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    assert bf.grad.dtype == torch.bfloat16 and torch.isfinite(bf.grad.float()).all()


def test_teacher_inputs_get_no_gradient():
    logits, target, ids, scores, weights, rank = random_case(5)
    scores.requires_grad_()
    weights.requires_grad_()
    rank.requires_grad_()
    logits.requires_grad_()
    kd_loss(logits, target, ids, scores, weights, rank, lambda_rank=1.0, backend="reference").backward()
    assert logits.grad is not None
    assert scores.grad is None and weights.grad is None and rank.grad is None


# --------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_kd_loss(reduction):
    logits, target, ids, scores, weights, rank = random_case(6, b=4, c=7, t=2, k=3)
    logits.requires_grad_()

    def f(x):
        return kd_loss(x, target, ids, scores, weights, rank, temperature=1.7, lambda_ce=0.8, lambda_kd=1.1,
                       lambda_rank=0.6, reduction=reduction, backend="reference")

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_kd_loss_linear_with_bias(reduction):
    _, target, ids, scores, weights, rank = random_case(7, b=4, c=7, t=2, k=3)
    g = torch.Generator().manual_seed(7)
    user = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    item = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)

    def f(u, w, b):
        return kd_loss_linear(u, w, target, ids, scores, weights, rank, item_bias=b, temperature=0.6,
                              lambda_rank=0.9, reduction=reduction, backend="reference")

    assert torch.autograd.gradcheck(f, (user, item, bias), eps=1e-6, atol=1e-7)
    # and it is kd_loss on the product
    torch.testing.assert_close(f(user, item, bias), kd_loss(user @ item.T + bias, target, ids, scores, weights, rank,
                                                            temperature=0.6, lambda_rank=0.9, reduction=reduction))


def test_kd_loss_linear_t0_is_full_softmax_cross_entropy():
    g = torch.Generator().manual_seed(8)
    user = torch.randn(6, 4, generator=g, requires_grad=True)
    item = torch.randn(13, 4, generator=g, requires_grad=True)
    target = torch.tensor([0, 12, 5, -1, 5, 7])
    loss = kd_loss_linear(user, item, target, torch.empty(6, 0, 0, dtype=torch.long), torch.empty(6, 0, 0),
                          torch.empty(6, 0), backend="reference")
    want = F.cross_entropy(user @ item.T, target, ignore_index=-1, reduction="sum") / 6
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert user.grad.abs().sum() > 0 and item.grad.abs().sum() > 0
