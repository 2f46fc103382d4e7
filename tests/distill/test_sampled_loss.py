"""The sampled-softmax form of the distillation loss (prmkd_dist/distill/sampled.py): exact when the negatives are
every other item with probability 1 (then it is ``kd_loss_linear``), gradients in float64, repeated candidates and
accidental hits counted once, the log-Q correction unbiased over samples, and its input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prmkd_dist.distill.loss import kd_loss_linear
from prmkd_dist.distill.sampled import kd_loss_sampled, negative_proposal, sample_negatives, selected_ids


def make(seed: int, B: int = 6, C: int = 40, d: int = 5, T: int = 2, K: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(B, d, generator=g, dtype=dtype)
    item = torch.randn(C, d, generator=g, dtype=dtype)
    bias = torch.randn(C, generator=g, dtype=dtype)
    target = torch.randint(0, C, (B,), generator=g)
    ids = torch.randint(0, C, (B, T, K), generator=g)
    ids[0, 1] = ids[0, 0]            # two teachers agreeing
    ids[1, 0, 2] = target[1]         # the target in a teacher's list
    ids[2, 1, K - 1] = -1            # an empty slot
    scores = torch.randn(B, T, K, generator=g, dtype=dtype).sort(dim=-1, descending=True).values
    tw = torch.softmax(torch.randn(B, T, generator=g, dtype=dtype), -1)
    rw = torch.rand(B, T, K, generator=g, dtype=dtype)
    return user, item, bias, target, ids, scores, tw, rw


def lookups(item, bias, target, ids, neg_ids):
    cand = selected_ids(target, ids)
    return item[cand.clamp_min(0)], bias[cand.clamp_min(0)], item[neg_ids], bias[neg_ids]


@pytest.mark.parametrize("tau,lambdas", [(1.0, (1.0, 1.0, 0.0)), (2.0, (0.5, 1.0, 0.3)), (0.7, (1.0, 0.0, 0.0))])
def test_all_items_as_negatives_is_the_exact_loss(tau, lambdas):
    user, item, bias, target, ids, scores, tw, rw = make(1)
    C = item.shape[0]
    neg_ids = torch.arange(C)
    ce, kd, rank = lambdas
    kw = dict(temperature=tau, lambda_ce=ce, lambda_kd=kd, lambda_rank=rank)
    for reduction in ("mean", "none"):
        want = kd_loss_linear(user, item, target, ids, scores, tw, rw, item_bias=bias, backend="reference",
                              reduction=reduction, **kw)
        ce_, cb, ne, nb = lookups(item, bias, target, ids, neg_ids)
        got = kd_loss_sampled(user, ce_, ne, neg_ids, torch.zeros(C, dtype=torch.float64), C, target, ids, scores, tw,
                              rw, cand_bias=cb, neg_bias=nb, reduction=reduction, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradients_float64():
    user, item, bias, target, ids, scores, tw, rw = make(2, B=3, C=12, d=3, T=2, K=3)
    neg_ids = torch.tensor([0, 3, 5, 8, 11])
    log_p = torch.log(torch.tensor([0.5, 0.9, 0.3, 1.0, 0.7], dtype=torch.float64))
    ce_, cb, ne, nb = (t.detach().clone().requires_grad_() for t in lookups(item, bias, target, ids, neg_ids))
    u = user.clone().requires_grad_()

    def f(u, ce_, cb, ne, nb):
        return kd_loss_sampled(u, ce_, ne, neg_ids, log_p, 12, target, ids, scores, tw, rw, cand_bias=cb,
                               neg_bias=nb, temperature=1.5, lambda_rank=0.2)

    assert torch.autograd.gradcheck(f, (u, ce_, cb, ne, nb))


def test_repeats_and_hits_count_once():
    """A row whose candidates are all among the negatives, repeated: the partition is over distinct items."""
    C, d = 10, 4
    g = torch.Generator().manual_seed(3)
    item = torch.randn(C, d, generator=g, dtype=torch.float64)
    user = torch.randn(1, d, generator=g, dtype=torch.float64)
    target = torch.tensor([2])
    ids = torch.tensor([[[2, 5, 5], [5, 7, -1]]])
    scores = torch.zeros(1, 2, 3, dtype=torch.float64)
    tw = torch.full((1, 2), 0.5, dtype=torch.float64)
    neg_ids = torch.tensor([1, 2, 5, 9])  # 2 and 5 are accidental hits
    ce_, _, ne, _ = lookups(item, torch.zeros(C, dtype=torch.float64), target, ids, neg_ids)
    got = kd_loss_sampled(user, ce_, ne, neg_ids, torch.zeros(4, dtype=torch.float64), C, target, ids, scores, tw,
                          lambda_kd=0.0)
    s = (user @ item.T)[0]
    z = torch.logsumexp(s[[2, 5, 7, 1, 9]], 0)  # distinct: candidates 2, 5, 7; negatives 1, 9
    torch.testing.assert_close(got, z - s[2], rtol=1e-12, atol=1e-12)


def test_log_q_correction_is_unbiased():
    """Over many popularity-proposal samples, the mean sampled partition (non-candidate part) matches the exact
    one: the inclusion probabilities of sample_negatives are the right correction."""
    C, d, n = 60, 4, 15
    g = torch.Generator().manual_seed(4)
    item = torch.randn(C, d, generator=g, dtype=torch.float64)
    user = torch.randn(1, d, generator=g, dtype=torch.float64)
    s = (user @ item.T)[0]
    q = negative_proposal(C, np.arange(C) % 7 + 1.0)
    assert float(q.sum()) == pytest.approx(1.0)
    est = []
    for _ in range(4000):
        ids, log_p = sample_negatives(q, n, g)
        assert bool((ids[1:] > ids[:-1]).all())
        est.append(float(torch.exp(s[ids] - log_p).sum()))
    exact = float(s.exp().sum())
    assert np.mean(est) == pytest.approx(exact, rel=0.03)
    assert np.std(est) > 0  # it is an estimate, not the sum itself


def test_uniform_proposal_and_errors():
    q = negative_proposal(5)
    assert torch.allclose(q, torch.full((5,), 0.2, dtype=torch.float64))
    with pytest.raises(ValueError, match="counts must be \\[5\\]"):
        negative_proposal(5, np.ones(4))
    with pytest.raises(ValueError, match="number of negatives must be >= 1"):
        sample_negatives(q, 0, torch.Generator())
    user, item, bias, target, ids, scores, tw, rw = make(5)
    neg_ids = torch.tensor([3, 1])
    ce_, cb, ne, nb = lookups(item, bias, target, ids, neg_ids)
    with pytest.raises(ValueError, match="neg_ids must be sorted ascending and distinct"):
        kd_loss_sampled(user, ce_, ne, neg_ids, torch.zeros(2, dtype=torch.float64), 40, target, ids, scores, tw)
    with pytest.raises(ValueError, match="expected <= 0"):
        kd_loss_sampled(user, ce_, ne, neg_ids.sort().values, torch.ones(2, dtype=torch.float64), 40, target, ids,
                        scores, tw)
    with pytest.raises(ValueError, match="cand_emb must be \\[B, 1 \\+ T\\*K, d\\]"):
        kd_loss_sampled(user, ce_[:, 1:], ne, neg_ids.sort().values, torch.zeros(2, dtype=torch.float64), 40, target,
                        ids, scores, tw)
    with pytest.raises(ValueError, match="neg_ids.*outside|neg_ids"):
        kd_loss_sampled(user, ce_, ne, torch.tensor([1, 40]), torch.zeros(2, dtype=torch.float64), 40, target, ids,
                        scores, tw)


def test_non_finite_embeddings_are_named():
    user, item, bias, target, ids, scores, tw, rw = make(6)
    neg_ids = torch.tensor([1, 3])
    ce_, cb, ne, nb = lookups(item, bias, target, ids, neg_ids)
    ce_ = ce_.clone()
    ce_[2, 4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"candidates' logits \(cand_emb / cand_bias\)\[2, 4\] = nan"):
        kd_loss_sampled(user, ce_, ne, neg_ids, torch.zeros(2, dtype=torch.float64), 40, target, ids, scores, tw)
    ne = ne.clone()
    ne[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"negatives' logits"):
        kd_loss_sampled(user, lookups(item, bias, target, ids, neg_ids)[0], ne, neg_ids,
                        torch.zeros(2, dtype=torch.float64), 40, target, ids, scores, tw)


def test_float32_fused_row_formula_matches_float64_reference():
    """In float32 on CPU the row formula is the fused C++ op (backend auto): the same loss and gradients as the
    float64 reference, to float32 accuracy."""
    user, item, bias, target, ids, scores, tw, rw = make(7, B=9, C=50)
    neg_ids = torch.tensor([0, 4, 9, 20, 33, 49])
    log_p = torch.log(torch.linspace(0.2, 1.0, 6, dtype=torch.float64))
    out = {}
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, "auto")):
        ce_, cb, ne, nb = (t.detach().to(dtype).requires_grad_() for t in lookups(item, bias, target, ids, neg_ids))
        u = user.detach().to(dtype).requires_grad_()
        loss = kd_loss_sampled(u, ce_, ne, neg_ids, log_p, 50, target, ids, scores.to(dtype), tw.to(dtype),
                               rw.to(dtype), cand_bias=cb, neg_bias=nb, temperature=1.3, lambda_rank=0.4,
                               backend=backend)
        loss.backward()
        out[dtype] = [loss.detach()] + [t.grad for t in (u, ce_, ne, cb, nb)]
    for a, b in zip(out[torch.float32], out[torch.float64]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
