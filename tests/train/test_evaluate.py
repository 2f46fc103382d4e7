import numpy as np
import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.train.evaluate import evaluate, evaluate_sampled, sample_negatives, stage_histories

from .conftest import tiny_data


class ByIdScorer:
    """Scores item i with i (higher id = better), whatever the history; records the histories seen."""

    def __init__(self, num_items: int):
        self.num_items = num_items
        self.seen = []

    def score(self, history: torch.Tensor) -> torch.Tensor:
        self.seen.append(history.clone())
        return torch.arange(self.num_items, dtype=torch.float32).expand(history.shape[0], -1)


@pytest.fixture
def tiny_split():
    # user 0: train [5, 4], valid 2, test 3; user 1: train [4], valid 1, test 4 (a repeated target);
    # user 2: too short to have targets
    return LeaveOneOutSplit.of(tiny_data([[5, 4, 2, 3], [4, 1, 4], [0, 1]], num_items=6))


def test_full_ranking_excludes_history_but_not_the_target(tiny_split):
    # valid: user 0 target 2, {5, 4} excluded -> only item 3 ahead: rank 1.
    #        user 1 target 1, {4} excluded -> 2, 3, 5 ahead: rank 3.
    m = evaluate(ByIdScorer(6), tiny_split, "valid", ks=(2, 4), max_len=4, progress=False)
    assert m["users"] == 2
    assert m["HR@2"] == pytest.approx(0.5) and m["HR@4"] == pytest.approx(1.0)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    # test: user 0 target 3, {5, 4, 2} excluded -> rank 0; user 1 target 4 is in its own history
    # ({4, 1}) but stays rankable -> only 5 ahead: rank 1 (excluding it would give rank 5).
    m = evaluate(ByIdScorer(6), tiny_split, "test", ks=(1,), max_len=4, progress=False)
    assert m["MRR"] == pytest.approx((1 + 1 / 2) / 2)
    assert m["HR@1"] == pytest.approx(0.5)


def test_without_exclusion_every_item_competes(tiny_split):
    m = evaluate(ByIdScorer(6), tiny_split, "valid", ks=(10,), exclude_history=False, max_len=4, progress=False)
    # user 0 target 2: 3, 4, 5 ahead; user 1 target 1: 2, 3, 4, 5 ahead
    assert m["MRR"] == pytest.approx((1 / 4 + 1 / 5) / 2)


def test_scorer_sees_left_padded_stage_histories(tiny_split):
    s = ByIdScorer(6)
    evaluate(s, tiny_split, "test", max_len=4, progress=False)
    # users in order of history length (user 1: 2 items, user 0: 3), the batch only as wide as its longest
    assert s.seen[0].tolist() == [[PAD_ID, 4, 1], [5, 4, 2]]
    offsets, items = stage_histories(tiny_split, "valid", np.array([0, 1]))
    assert offsets.tolist() == [0, 2, 3] and items.tolist() == [5, 4, 4]


def test_wrong_score_shape_is_an_error(tiny_split):
    class Bad:
        def score(self, history):
            return torch.zeros(history.shape[0], 5)

    with pytest.raises(ValueError, match=r"expected \[2, 6\]"):
        evaluate(Bad(), tiny_split, "valid", progress=False)
    with pytest.raises(ValueError, match="stage"):
        evaluate(ByIdScorer(6), tiny_split, "train", progress=False)


def test_sampled_negatives_avoid_history_and_target_and_are_seeded(ml_split):
    users = ml_split.eval_users("test")
    neg = sample_negatives(ml_split, users, 100, seed=7)
    assert neg.shape == (len(users), 100)
    for row, u in zip(neg, users):
        seen = set(ml_split.data.sequence(u).tolist())  # includes valid and test targets
        assert not seen.intersection(row.tolist())
        assert len(set(row.tolist())) == 100
    assert np.array_equal(neg, sample_negatives(ml_split, users, 100, seed=7))
    assert not np.array_equal(neg, sample_negatives(ml_split, users, 100, seed=8))
    # not every user draws the same items: uniform over each user's own complement
    assert len(np.unique(neg)) > 0.5 * ml_split.data.num_items


def test_sampled_protocol_by_hand(tiny_split):
    # 6 items; user 0 interacted with {5, 4, 2, 3} -> only {0, 1} are negatives
    m = evaluate_sampled(ByIdScorer(6), tiny_split, "test", num_negatives=2, seed=0, ks=(1,), max_len=4, progress=False)
    # user 0 target 3 beats 0 and 1 -> rank 0; user 1 target 4 vs two of {0, 2, 3, 5}
    neg = sample_negatives(tiny_split, np.array([0, 1]), 2, seed=0)
    assert sorted(neg[0].tolist()) == [0, 1]
    assert set(neg[1].tolist()) <= {0, 2, 3, 5}
    assert m["users"] == 2
    assert m["HR@1"] == pytest.approx((1 + (5 not in neg[1])) / 2)
    with pytest.raises(ValueError, match="only 2 non-interacted items"):
        evaluate_sampled(ByIdScorer(6), tiny_split, "test", num_negatives=3, seed=0, max_len=4, progress=False)


def test_sampled_protocol_oracle_scores_one(ml_split):
    targets = torch.from_numpy(ml_split.test_target)

    class Oracle:
        needs_users = True  # evaluate() passes the batch's user ids (batches are in history-length order)

        def score(self, history, users):
            s = torch.zeros(history.shape[0], ml_split.data.num_items)
            s[torch.arange(len(users)), targets[users]] = 1.0
            return s

    m = evaluate_sampled(Oracle(), ml_split, "test", num_negatives=100, seed=0, batch_size=128, progress=False)
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == 1.0


def test_batches_trimmed_to_their_longest_history_give_the_same_metrics(ml_split):
    """evaluate() orders users by history length and trims each batch's padding; a real student scored on
    histories padded back to the full width gets the same metrics."""
    from prmkd_dist.models import build_student

    torch.manual_seed(0)
    model = build_student("sasrec", ml_split.data.num_items, dim=16, max_len=50, num_layers=2, num_heads=2).eval()
    widths = []

    class FullWidth(torch.nn.Module):
        def score(self, history):
            widths.append(history.shape[1])
            pad = torch.full((history.shape[0], 50 - history.shape[1]), PAD_ID, dtype=history.dtype)
            return model.score(torch.cat([pad, history], dim=1))

    got = evaluate(model, ml_split, "valid", batch_size=64, max_len=50, progress=False)
    want = evaluate(FullWidth(), ml_split, "valid", batch_size=64, max_len=50, progress=False)
    assert got == pytest.approx(want, rel=1e-6)
    assert min(widths) < 50 and max(widths) == 50  # short-history batches were trimmed, the longest kept
