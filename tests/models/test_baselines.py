"""Popularity and ItemKNN against hand-computed values, and ItemKNN against a dense brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.models import ItemKNN, Popularity


def data_from_sequences(sequences: list[list[int]], num_items: int) -> InteractionData:
    """InteractionData from explicit per-user item lists (timestamps = positions)."""
    return InteractionData.from_sequences(sequences, num_items, name="hand-made")


# training prefixes: u0 [0,1,2], u1 [0,1], u2 [1,2,3], u3 [3] (too short to hold anything out).
# Item 4 appears only in held-out validation/test targets, so it must count for nothing.
SEQUENCES = [[0, 1, 2, 4, 4], [0, 1, 4, 4], [1, 2, 3, 4, 4], [3]]
SHRINK = 1.0


def hand_split() -> LeaveOneOutSplit:
    split = LeaveOneOutSplit.of(data_from_sequences(SEQUENCES, num_items=5))
    assert [list(split.train_sequence(u)) for u in range(4)] == [[0, 1, 2], [0, 1], [1, 2, 3], [3]]
    return split


def hand_sim() -> np.ndarray:
    """Users per item: 0:{u0,u1} 1:{u0,u1,u2} 2:{u0,u2} 3:{u2,u3} 4:{} -> shrunk cosine by hand."""
    s = np.zeros((5, 5))
    s[0, 1] = 2 / (math.sqrt(2 * 3) + SHRINK)  # co-occur in u0, u1
    s[0, 2] = 1 / (math.sqrt(2 * 2) + SHRINK)  # u0
    s[1, 2] = 2 / (math.sqrt(3 * 2) + SHRINK)  # u0, u2
    s[1, 3] = 1 / (math.sqrt(3 * 2) + SHRINK)  # u2
    s[2, 3] = 1 / (math.sqrt(2 * 2) + SHRINK)  # u2
    return s + s.T


def test_popularity_counts_training_interactions_only():
    pop = Popularity.fit(hand_split())
    h = torch.tensor([[PAD_ID, PAD_ID, 0], [1, 2, 3]])
    expect = torch.tensor([2.0, 3.0, 2.0, 2.0, 0.0])
    scores = pop.score(h)
    assert scores.shape == (2, 5)
    torch.testing.assert_close(scores, expect.expand(2, 5))
    scores[0, 0] = 99.0  # callers may write into the scores: the model must not change
    torch.testing.assert_close(pop.score(h)[0], expect)


@pytest.mark.parametrize("block_entries", [5, 1 << 20])  # one item per block / all items in one block
def test_itemknn_similarities_match_hand_computed_cosine(block_entries):
    knn = ItemKNN.fit(hand_split(), k=4, shrink=SHRINK, block_entries=block_entries)
    assert knn.neighbours.shape == (5, 4)
    dense = np.zeros((5, 5))
    np.add.at(dense, (np.repeat(np.arange(5), 4), knn.neighbours.numpy().ravel()), knn.similarities.numpy().ravel())
    np.testing.assert_allclose(dense, hand_sim(), rtol=1e-6)


def test_itemknn_scores_recency_weighted_sum():
    s = hand_sim()
    knn = ItemKNN.fit(hand_split(), k=4, shrink=SHRINK, decay=0.5)
    h = torch.tensor([[PAD_ID, 0, 2], [PAD_ID, PAD_ID, PAD_ID], [3, 3, 1]])
    expect = np.stack([
        0.5 * s[0] + 1.0 * s[2],  # most recent item weight 1, the one before 0.5
        np.zeros(5),  # empty history
        0.25 * s[3] + 0.5 * s[3] + 1.0 * s[1],  # a repeated item counts at each occurrence
    ])
    np.testing.assert_allclose(knn.score(h).numpy(), expect, rtol=1e-6, atol=1e-7)
    plain = ItemKNN.fit(hand_split(), k=4, shrink=SHRINK)  # decay 1 = plain sum
    np.testing.assert_allclose(plain.score(h[:1]).numpy()[0], s[0] + s[2], rtol=1e-6)


def test_itemknn_keeps_only_top_k_neighbours():
    s = hand_sim()
    knn = ItemKNN.fit(hand_split(), k=1, shrink=SHRINK)
    # item 0's best neighbour is 1 (2/(sqrt6+1) > 1/3); item 2's best is 1 too
    nbr = knn.neighbours[:, 0].tolist()
    assert nbr[0] == 1 and nbr[2] == 1 and nbr[1] in (0, 2)  # item 1: s(1,0) = s(1,2), a tie
    scores = knn.score(torch.tensor([[0, 2]])).numpy()[0]
    np.testing.assert_allclose(scores, [0, s[0, 1] + s[2, 1], 0, 0, 0], rtol=1e-6)


def test_itemknn_matches_dense_brute_force_on_real_data(ml_small_split):
    split = ml_small_split
    k = 20
    knn = ItemKNN.fit(split, k=k, shrink=10.0)
    c = split.data.num_items
    users = np.repeat(np.arange(split.data.num_users), np.diff(split.train_offsets))
    x = np.zeros((split.data.num_users, c), dtype=np.float64)
    x[users, split.train_items] = 1.0
    rng = np.random.default_rng(0)
    items = rng.choice(np.flatnonzero(x.sum(0) > 0), size=25, replace=False)
    n = x.sum(0)
    co = x[:, items].T @ x  # [25, C]
    sim = co / (np.sqrt(n[items, None] * n[None, :]) + 10.0)
    sim[np.arange(len(items)), items] = 0.0
    expect_top = -np.sort(-sim, axis=1)[:, :k]
    np.testing.assert_allclose(knn.similarities[items].numpy(), expect_top, rtol=1e-5, atol=1e-7)
    got = sim[np.arange(len(items))[:, None], knn.neighbours[items].numpy()]  # the ids hold those values
    np.testing.assert_allclose(got, expect_top, rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise_clear_errors():
    pop = Popularity.fit(hand_split())
    knn = ItemKNN.fit(hand_split(), k=2)
    with pytest.raises(ValueError, match=r"ids must be PAD_ID=-1 or 0..4, got range \[0, 5\]"):
        knn.score(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"history must be \[B, L\]"):
        pop.score(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        ItemKNN.fit(hand_split(), k=0)
    with pytest.raises(ValueError, match="decay"):
        ItemKNN.fit(hand_split(), decay=0.0)


def test_state_dict_round_trip():
    knn = ItemKNN.fit(hand_split(), k=3, decay=0.8)
    clone = ItemKNN(torch.zeros(5, 3, dtype=torch.long), torch.zeros(5, 3), decay=0.8)
    clone.load_state_dict(knn.state_dict())
    h = torch.tensor([[PAD_ID, 0, 3]])
    torch.testing.assert_close(clone.score(h), knn.score(h))
