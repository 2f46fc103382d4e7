"""teacher_weights and importance_weights on hand-computed cases and against naive per-row Python versions."""
from __future__ import annotations

import math

import pytest
import torch

from prmkd_dist import importance_weights, teacher_weights


def _softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


IDS = torch.tensor([[[5, 3, -1], [3, 7, 9]]])            # B = 1, T = 2, K = 3
SCORES = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]])


def test_confidence_consistency_by_hand():
    w = teacher_weights(IDS, SCORES, torch.tensor([3]), alpha=0.5, gamma=0.2)
    c0 = _softmax([2.0, 1.0])[1]          # target 3 sits at teacher 0's second valid slot
    c1 = _softmax([0.0, 1.0, 2.0])[0]
    o0, o1 = 1 / 2, 1 / 3                 # |{5,3} & {3,7,9}| = 1, divided by |S_t|
    want = _softmax([(0.5 * c0 + 0.5 * o0) / 0.2, (0.5 * c1 + 0.5 * o1) / 0.2])
    torch.testing.assert_close(w, torch.tensor([want]))


@pytest.mark.parametrize("strategy,scores", [
    ("uniform", lambda c, o: [0.0, 0.0]),
    ("confidence", lambda c, o: c),
    ("consistency", lambda c, o: o),
])
def test_single_strategies_by_hand(strategy, scores):
    c = [_softmax([2.0, 1.0])[1], _softmax([0.0, 1.0, 2.0])[0]]
    o = [1 / 2, 1 / 3]
    w = teacher_weights(IDS, SCORES, torch.tensor([3]), strategy=strategy, gamma=0.5)
    torch.testing.assert_close(w, torch.tensor([_softmax([v / 0.5 for v in scores(c, o)])]))


def test_target_absent_or_minus_one_has_zero_confidence():
    for target in (4, -1):
        w = teacher_weights(IDS, SCORES, torch.tensor([target]), strategy="confidence")
        torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))


def test_empty_teacher_gets_zero_and_counts_in_others_consistency_mean():
    ids = torch.cat([IDS, torch.full((1, 1, 3), -1)], dim=1)
    scores = torch.cat([SCORES, torch.zeros(1, 1, 3)], dim=1)
    w = teacher_weights(ids, scores, torch.tensor([-1]), strategy="consistency", gamma=1.0)
    o0 = (1 / 2 + 0) / 2   # mean over t' != 0 of the overlaps with teacher 1 and the empty teacher 2
    o1 = (1 / 3 + 0) / 2
    want = _softmax([o0, o1])
    torch.testing.assert_close(w, torch.tensor([[want[0], want[1], 0.0]]))


def test_single_teacher_and_all_empty_rows():
    ids = torch.tensor([[[2, 4]], [[-1, -1]]])
    w = teacher_weights(ids, torch.randn(2, 1, 2), torch.tensor([2, 2]))
    torch.testing.assert_close(w, torch.tensor([[1.0], [0.0]]))  # o = 1 for T = 1; an empty row gets 0


def test_duplicates_within_a_teacher_count_once():
    ids = torch.tensor([[[3, 3, -1], [3, -1, -1]]])
    w = teacher_weights(ids, torch.zeros(1, 2, 3), torch.tensor([-1]), strategy="consistency", gamma=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5]]))  # both overlaps are 1 / 1


def naive_teacher_weights(ids, scores, target, alpha, gamma):
    out = torch.zeros(ids.shape[0], ids.shape[1])
    for b in range(ids.shape[0]):
        sets, conf = [], []
        for t in range(ids.shape[1]):
            valid = [k for k in range(ids.shape[2]) if ids[b, t, k] >= 0]
            sets.append({int(ids[b, t, k]) for k in valid})
            p = _softmax([float(scores[b, t, k]) for k in valid]) if valid else []
            conf.append(sum(pk for pk, k in zip(p, valid) if int(ids[b, t, k]) == int(target[b]) >= 0))
        n_t = ids.shape[1]
        cons = [1.0 if n_t == 1 else sum(len(sets[t] & sets[u]) for u in range(n_t) if u != t)
                / max(len(sets[t]), 1) / (n_t - 1) for t in range(n_t)]
        live = [t for t in range(n_t) if sets[t]]
        sm = _softmax([(alpha * conf[t] + (1 - alpha) * cons[t]) / gamma for t in live]) if live else []
        for t, v in zip(live, sm):
            out[b, t] = v
    return out


def test_random_batch_matches_naive_version():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (32, 3, 5), generator=g)      # a small id range: overlaps and duplicates
    ids[torch.rand(32, 3, 5, generator=g) < 0.3] = -1
    ids[:4, 1] = -1
    scores = torch.randn(32, 3, 5, generator=g)
    target = torch.randint(-1, 8, (32,), generator=g)
    got = teacher_weights(ids, scores, target, alpha=0.3, gamma=0.4)
    torch.testing.assert_close(got, naive_teacher_weights(ids, scores, target, 0.3, 0.4))


def test_teacher_weights_are_constants_and_validate():
    scores = SCORES.clone().requires_grad_()
    assert not teacher_weights(IDS, scores, torch.tensor([3])).requires_grad
    with pytest.raises(ValueError, match="strategy must be one of"):
        teacher_weights(IDS, SCORES, torch.tensor([3]), strategy="best")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        teacher_weights(IDS, SCORES, torch.tensor([3]), gamma=0.0)
    with pytest.raises(ValueError, match=r"teacher_ids\[0, 1, 2\] = -4"):
        teacher_weights(torch.tensor([[[5, 3, -1], [3, 7, -4]]]), SCORES, torch.tensor([3]))
    with pytest.raises(ValueError, match=r"teacher_scores\[0, 0, 0\] = nan"):
        teacher_weights(IDS, SCORES.index_fill(2, torch.tensor([0]), float("nan")), torch.tensor([3]))


# ------------------------------------------------------------------------------------------- importance
LOGITS = torch.tensor([[0.1, 0.9, 0.3, 0.9, 0.5]])
IMP_IDS = torch.tensor([[[4, -1, 1]]])
IMP_SCORES = torch.tensor([[[2.0, 0.0, 1.0]]])


def test_importance_weights_by_hand():
    rho = importance_weights(IMP_IDS, IMP_SCORES, LOGITS, gamma_position=0.3, gamma_confidence=0.5,
                             gamma_consistency=0.1, position_scale=1.0, student_topk=2)
    pi = _softmax([-1.0, -2.0])          # 1st and 2nd VALID slots
    conf = _softmax([2.0, 1.0])
    # item 4 (0.5) has two strictly larger logits -> rank 2, not < 2; item 1 (0.9, tied) has rank 0
    cons = [0.0, 1.0]
    want = [0.3 * pi[0] + 0.5 * conf[0] + 0.1 * cons[0], 0.0, 0.3 * pi[1] + 0.5 * conf[1] + 0.1 * cons[1]]
    torch.testing.assert_close(rho, torch.tensor([[want]]))


def test_importance_weights_defaults():
    rho = importance_weights(IMP_IDS, IMP_SCORES, LOGITS)  # position_scale = K/4 = 0.75, student_topk = K = 3
    pi = _softmax([-1 / 0.75, -2 / 0.75])
    conf = _softmax([2.0, 1.0])
    want = [0.3 * pi[0] + 0.5 * conf[0] + 0.1, 0.0, 0.3 * pi[1] + 0.5 * conf[1] + 0.1]
    torch.testing.assert_close(rho, torch.tensor([[want]]))


def test_importance_consistency_matches_counted_rank():
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 6, (16, 20), generator=g).float()   # many ties
    ids = torch.randint(-1, 20, (16, 2, 6), generator=g)
    rho = importance_weights(ids, torch.zeros(16, 2, 6), logits, gamma_position=0.0, gamma_confidence=0.0,
                             gamma_consistency=1.0, student_topk=4)
    want = torch.zeros(16, 2, 6)
    for b in range(16):
        for t in range(2):
            for k in range(6):
                i = int(ids[b, t, k])
                if i >= 0:
                    want[b, t, k] = float(int((logits[b] > logits[b, i]).sum()) < 4)
    torch.testing.assert_close(rho, want)


def test_importance_weights_constants_and_errors():
    logits = LOGITS.clone().requires_grad_()
    assert not importance_weights(IMP_IDS, IMP_SCORES, logits).requires_grad
    with pytest.raises(ValueError, match=r"teacher_ids\[0, 0, 0\] = 5: ids must be in \[-1, 5\)"):
        importance_weights(torch.tensor([[[5, -1, 1]]]), IMP_SCORES, LOGITS)
    with pytest.raises(ValueError, match="position_scale must be > 0"):
        importance_weights(IMP_IDS, IMP_SCORES, LOGITS, position_scale=0.0)
    with pytest.raises(ValueError, match="logits must be"):
        importance_weights(IMP_IDS, IMP_SCORES, LOGITS[0])
