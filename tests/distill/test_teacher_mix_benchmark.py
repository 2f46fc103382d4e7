"""benchmarks/teacher_mix.py: the target ranks under a weighted mixture of teacher lists, against a dense
brute force over the whole catalog, and on real teachers of real data."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.teachers import EASE, ItemTransition
from prmkd_dist.train.metrics import target_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: not importable otherwise
from test_distill_trainer import shards, small_split  # noqa: E402,F401  (a real slice and its teacher shards)


def _dense_ranks(ids, probs, targets, num_items):
    """The mixture over every column (0 for unlisted items), ranked by metrics.target_rank."""
    n = ids.shape[0]
    dense = torch.zeros(n, num_items + 1, dtype=torch.float64)  # column num_items takes the empty slots
    cols = torch.where(ids < 0, num_items, ids.long()).flatten(1)
    dense.scatter_add_(1, cols, probs.flatten(1).double())
    return target_rank(dense[:, :num_items], targets)


def test_hand_case(load_benchmark):
    tm = load_benchmark("teacher_mix")
    # teacher a lists 5, 1, 2; teacher b lists 1, 7 and an empty slot; weights 1/2 each
    ids = torch.tensor([[[5, 1, 2], [1, 7, -1]]] * 4, dtype=torch.int32)
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]]] * 4, dtype=torch.float64) * 0.5
    # values: 1 -> 0.45 (both lists, counted once), 5 -> 0.25, 7 -> 0.2, 2 -> 0.1
    got = tm.mixture_ranks(ids, probs, torch.tensor([1, 5, 2, 9]), num_items=10)
    assert got.tolist() == [0, 1, 3, 9]  # 9: in no list, ties with every unlisted item
    _, entropy, mass = tm.MixtureIndex(ids, torch.tensor([1, 5, 2, 9])).measure(probs, num_items=10)
    h = -sum(v * math.log(v) for v in (0.45, 0.25, 0.2, 0.1))
    assert torch.allclose(entropy, torch.full((4,), h, dtype=torch.float64))
    assert torch.allclose(mass, torch.tensor([0.45, 0.25, 0.1, 0.0], dtype=torch.float64))
    # a tie counts against the target: 7 raised to 5's value
    probs[:, 1, 1] = 0.25  # weighted: 0.5 * 0.5, as 5
    assert tm.mixture_ranks(ids, probs, torch.tensor([5, 7, 1, 2]), num_items=10).tolist() == [2, 2, 0, 3]


@pytest.mark.parametrize("chunk", [3, 64])
def test_mixture_ranks_match_the_dense_mixture(chunk, load_benchmark):
    tm = load_benchmark("teacher_mix")
    g = torch.Generator().manual_seed(0)
    n, t, k, c = 40, 3, 6, 15  # a small catalog: lists overlap often
    ids = torch.stack([torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(t)]) for _ in range(n)])
    ids[ids.shape[0] // 2:, 1, 4:] = -1  # some lists end early
    scores = torch.randn(n, t, k, generator=g)
    scores[:5] = torch.round(scores[:5])  # ties within lists
    probs = tm.teacher_probs(ids, scores, temperature=2.0) * torch.tensor([0.5, 0.3, 0.2]).view(1, -1, 1)
    targets = torch.randint(0, c, (n,), generator=g)
    got = tm.mixture_ranks(ids.to(torch.int32), probs, targets, c, chunk=chunk)
    assert torch.equal(got, _dense_ranks(ids, probs, targets, c))
    assert (got == c - 1).any() and (got < k).any()  # both kinds of target occur

    # the entropy and target mass of the normalised mixture, against the dense mixture over the catalog
    ranks, entropy, mass = tm.MixtureIndex(ids.to(torch.int32), targets, chunk=chunk).measure(probs, c, chunk=chunk)
    assert torch.equal(ranks, got)
    dense = torch.zeros(n, c + 1, dtype=torch.float64)
    dense.scatter_add_(1, torch.where(ids < 0, c, ids.long()).flatten(1), probs.flatten(1).double())
    q = dense[:, :c] / dense[:, :c].sum(dim=1, keepdim=True)
    want_h = -(q * torch.log(torch.where(q > 0, q, 1.0))).sum(dim=1)
    torch.testing.assert_close(entropy, want_h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass, q.gather(1, targets.view(-1, 1))[:, 0], rtol=1e-12, atol=1e-12)
    assert (mass == 0).any() and (mass > 0).any()


def test_teacher_probs_are_the_kd_targets(load_benchmark):
    from prmkd_dist.distill.trainer import standardise_scores

    tm = load_benchmark("teacher_mix")
    ids = torch.tensor([[[3, 1, -1]], [[-1, -1, -1]]])
    scores = torch.tensor([[[2.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])
    p = tm.teacher_probs(ids, scores, temperature=2.0)
    z = standardise_scores(ids, scores)[0, 0, :2] / 2.0
    assert torch.allclose(p[0, 0, :2], torch.softmax(z.double(), 0)) and p[0, 0, 2] == 0
    assert torch.all(p[1] == 0)  # an empty list contributes nothing


def test_real_teachers_alone_rank_as_their_own_scores(ml_tiny, load_benchmark):
    """On real teachers (EASE and SLIST on real users): the lists are each teacher's topk, and the w = 1 row of a
    teacher ranks every target in its list exactly where its full catalog scores (history excluded) put it."""
    from prmkd_dist.constants import PAD_ID
    from prmkd_dist.data.dataset import left_pad
    from prmkd_dist.train.evaluate import stage_histories

    tm = load_benchmark("teacher_mix")
    split = LeaveOneOutSplit.of(ml_tiny)
    teachers = {"ease": EASE.fit(split, l2=50.0), "slist": ItemTransition.fit(split, l2=10.0, window=3, decay=2.0,
                                                                                alpha=0.2)}
    k = 300  # of 1,004 items: 12 users, so a long list for some targets to land in it
    lists = {stage: tm.teacher_lists(teachers, split, stage, k, max_history=50, batch_size=5)
             for stage in ("valid", "test")}
    ids, scores, targets = lists["test"]
    assert ids.shape == (len(split.eval_users("test")), 2, k)
    users = split.eval_users("test")
    offsets, items = stage_histories(split, "test", users)
    hist = torch.from_numpy(left_pad([items[offsets[i]:offsets[i + 1]] for i in range(len(users))], 50))
    for j, teacher in enumerate(teachers.values()):
        want_ids, _ = teacher.topk(hist, k)
        assert torch.equal(ids[:, j].long(), want_ids)  # batched by length, put back in user order
        full = teacher.score(hist).double()
        full = torch.cat([full, full.new_zeros(len(full), 1)], dim=1)  # column C takes the padding
        full.scatter_(1, torch.where(hist == PAD_ID, split.data.num_items, hist), float("-inf"))  # history out
        full = full[:, :split.data.num_items]
        w = torch.zeros(2, dtype=torch.float64)
        w[j] = 1.0
        got = tm.mixture_ranks(ids, tm.teacher_probs(ids, scores, 1.0) * w.view(1, -1, 1), targets, split.data.num_items)
        ref = target_rank(full, targets)
        in_list = ref < k
        assert in_list.sum() >= 3
        assert torch.equal(got[in_list], ref[in_list])
        assert bool((got[~in_list] >= k).all())
    rows = tm.mix_table(lists, [1.0], tm.weight_grid(0.5), split.data.num_items)
    assert [r["weights"] for r in rows] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    summary = tm.select(rows, ["ease", "slist"])["1.0"]
    best = max(rows, key=lambda r: r["valid"]["NDCG@10"])
    assert summary["selected_weights"] == best["weights"]
    assert summary["test NDCG@20"] == best["test"]["NDCG@20"]
    assert summary["ease alone: test NDCG@20"] == rows[0]["test"]["NDCG@20"]
    assert summary["uniform: test NDCG@20"] == rows[1]["test"]["NDCG@20"]


def test_weight_grid_and_arguments(load_benchmark):
    tm = load_benchmark("teacher_mix")
    assert tm.weight_grid(0.25) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="must divide 1"):
        tm.weight_grid(0.3)
    with pytest.raises(SystemExit):
        tm.main(["--dataset", "ml-latest-small", "--teacher", "no-equals-sign"])


def test_shard_lists_rank_the_training_targets(shards, small_split, load_benchmark):
    """On real exported shards (ItemKNN + Popularity of a real slice): every listed training position, and a teacher
    alone ranks its training target at the target's slot in that teacher's list (distinct, sorted lists)."""
    import numpy as np

    tm = load_benchmark("teacher_mix")
    ids, scores, targets, names = tm.shard_lists(shards, small_split)
    assert names == ["itemknn", "pop"] and ids.shape[1:] == (2, 20)
    firsts = int((np.diff(small_split.train_offsets) > 0).sum())  # one unlisted first position per user
    assert len(targets) == len(small_split.train_items) - firsts
    assert bool(((ids >= 0).any(dim=2)).all())
    rows = tm.mix_table({"train": (ids, scores, targets)}, [1.0], tm.weight_grid(1.0), small_split.data.num_items)
    for row, j in zip(rows, (0, 1)):  # weights [1, 0] then [0, 1]
        lst = ids[:, j].long()
        hit = (lst == targets[:, None]).any(dim=1)
        slot = (lst == targets[:, None]).float().argmax(dim=1)
        z = tm.teacher_probs(ids, scores, 1.0)[:, j]
        # ties in a list count against the target, as in the ranks: slots with the target's probability or more
        t_p = z.gather(1, slot[:, None])
        rank = ((z >= t_p) & (lst >= 0)).sum(dim=1) - 1
        want_ndcg10 = torch.where(hit & (rank < 10), 1 / torch.log2(rank.double() + 2), torch.zeros(())).mean()
        assert row["train"]["NDCG@10"] == pytest.approx(float(want_ndcg10))
        assert row["train"]["HR@20"] == pytest.approx(float(hit.double().mean()))  # K = 20: a listed target is a hit
    assert rows[0]["train"]["NDCG@10"] != rows[1]["train"]["NDCG@10"]
    assert tm.select(rows, ["itemknn", "pop"]) == {}  # no held-out rows to select on
