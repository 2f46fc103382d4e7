"""benchmarks/teacher_lists.py: how each teacher-weight strategy splits the weight between the teachers."""
from __future__ import annotations

import pytest
import torch


def _rows():
    # 3 rows, 2 teachers, K = 3; row 0: only teacher a lists the target (at its top); row 1: both list it, b higher;
    # row 2: no teacher has a list (a user's first position): left out
    ids = torch.tensor([[[5, 1, 2], [7, 8, 9]],
                        [[1, 5, 2], [5, 1, 2]],
                        [[-1, -1, -1], [-1, -1, -1]]], dtype=torch.int32)
    scores = torch.tensor([[[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]],
                           [[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]],
                           [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    return ids, scores, torch.tensor([5, 5, 4])


def test_weight_shares_follow_the_trainer_weights(load_benchmark):
    from prmkd_dist.distill.weights import teacher_weights

    tl = load_benchmark("teacher_lists")
    ids, scores, tgt = _rows()
    got = tl.weight_shares(ids, scores, tgt, ("a", "b"), alpha=0.5, gamma=0.2, chunk=2)  # chunks split the rows
    assert got["uniform"] == {"mean_weight": [0.5, 0.5], "top_share": [0.5, 0.5]}  # ties split evenly
    want = teacher_weights(ids[:2].long(), scores[:2], tgt[:2], strategy="confidence", gamma=0.2).mean(dim=0)
    assert got["confidence"]["mean_weight"] == pytest.approx(want.tolist())
    # row 0 goes to a (only a lists the target), row 1 to b (b ranks it first, a second)
    assert got["confidence"]["top_share"] == pytest.approx([0.5, 0.5])
    assert got["confidence"]["mean_weight"][0] > 0.5  # a's row-0 win is larger than b's row-1 win
    # teacher_scale multiplies after the strategy, as in the trainer
    scaled = tl.weight_shares(ids, scores, tgt, ("a", "b"), alpha=0.5, gamma=0.2, scale={"b": 0.0})
    assert scaled["uniform"]["mean_weight"] == [0.5, 0.0] and scaled["confidence"]["top_share"] == [1.0, 0.0]
