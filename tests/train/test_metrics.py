import math

import pytest
import torch

from prmkd_dist.train.metrics import MetricAccumulator, metrics_from_ranks, ranking_metrics, target_rank


def test_rank_counts_ties_against_the_target():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2],
                           [0.9, 0.5, 0.5, 0.2],
                           [0.3, 0.3, 0.3, 0.3]])
    ranks = target_rank(scores, torch.tensor([1, 0, 2]))
    assert ranks.tolist() == [1, 0, 3]  # tie -> behind; strict best -> 0; constant model -> last


def test_constant_model_is_not_perfect():
    m = ranking_metrics(torch.zeros(4, 50), torch.tensor([0, 10, 20, 49]), ks=(10,))
    assert m["HR@10"] == 0.0 and m["NDCG@10"] == 0.0
    assert m["MRR"] == pytest.approx(1 / 50)


def test_minus_inf_columns_never_outrank_a_finite_target():
    scores = torch.tensor([[-math.inf, 0.0, -math.inf, -1.0]])
    assert target_rank(scores, torch.tensor([3])).tolist() == [1]


def test_k_boundaries_ndcg_and_mrr_by_hand():
    m = metrics_from_ranks(torch.tensor([0, 1, 9, 10, 19, 20]), ks=(10, 20))
    assert m["HR@10"].tolist() == [1, 1, 1, 0, 0, 0]
    assert m["HR@20"].tolist() == [1, 1, 1, 1, 1, 0]
    assert m["NDCG@10"].tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0, 0, 0])
    assert m["NDCG@20"][4].item() == pytest.approx(1 / math.log2(21))
    assert m["MRR"].tolist() == pytest.approx([1, 1 / 2, 1 / 10, 1 / 11, 1 / 20, 1 / 21])


def test_accumulator_means_over_batches_equal_one_batch():
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(30, 40, generator=g), torch.randint(0, 40, (30,), generator=g)
    acc = MetricAccumulator((5, 10))
    for s in range(0, 30, 7):
        acc.add_ranks(target_rank(scores[s:s + 7], targets[s:s + 7]))
    whole = ranking_metrics(scores, targets, (5, 10))
    got = acc.result()
    assert got["users"] == 30
    for k in ("HR@5", "NDCG@10", "MRR"):
        assert got[k] == pytest.approx(whole[k])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="targets must be column ids"):
        target_rank(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        target_rank(torch.tensor([[math.nan, 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        target_rank(torch.zeros(3), torch.tensor([0]))
