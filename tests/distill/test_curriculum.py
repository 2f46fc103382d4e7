import math

import pytest
import torch

from prmkd_dist.distill.curriculum import Curriculum, disagreement, length_popularity, pacing
from prmkd_dist.distill.trainer import DistillObjective, train_distilled
from prmkd_dist.train.engine import LocalEngine
from prmkd_dist.train.trainer import build_model

from .test_distill_trainer import distill_cfg, random_init_ndcg, shards, small_split  # noqa: F401  (fixtures)


def test_linear_and_root_pacing():
    assert [pacing(e, 0.2, 4) for e in (1, 2, 3, 5, 9)] == pytest.approx([0.2, 0.4, 0.6, 1.0, 1.0])
    root = [pacing(e, 0.2, 4, "root") for e in (1, 2, 3, 5)]
    assert root == pytest.approx([0.2, math.sqrt(0.04 + 0.96 / 4), math.sqrt(0.04 + 0.96 / 2), 1.0])
    assert all(r >= lin for r, lin in zip(root, [0.2, 0.4, 0.6, 1.0]))  # root grows faster early
    with pytest.raises(ValueError, match="start"):
        pacing(1, 0.0, 3)
    with pytest.raises(ValueError, match="'linear' or 'root'"):
        pacing(1, 0.5, 3, "cubic")


def test_keep_masks_the_hardest_rows_and_counts_them():
    cur = Curriculum("disagreement", "linear", start=0.5, epochs=2)
    diff = torch.tensor([0.9, 0.1, 0.5, 0.5, 0.3, 2.0, 0.0])  # ceil(0.5 * 7) = 4 kept
    keep = cur.keep(diff)
    assert keep.tolist() == [False, True, True, False, True, False, True]  # tie at 0.5: first position wins
    cur.keep(torch.zeros(3))  # ceil(1.5) = 2 kept
    stats = cur.stats()
    assert stats == {"curriculum_fraction": 0.5, "curriculum_rows_seen": 10.0, "curriculum_rows_masked": 4.0}
    assert cur.stats()["curriculum_rows_seen"] == 0.0  # reset per epoch
    cur.epoch = 3  # past the pacing horizon: nothing masked
    assert cur.keep(diff).all() and cur.stats()["curriculum_rows_masked"] == 0.0
    cur.epoch = 1
    assert cur.keep(torch.tensor([5.0])).tolist() == [True]  # a batch always keeps one row


def test_disagreement_is_zero_when_student_agrees_on_the_slots():
    ids = torch.tensor([[[3, 1, -1], [2, 3, 4]]])
    scores = torch.tensor([[[2.0, 1.0, 0.0], [0.5, 0.4, 0.1]]])
    w = torch.tensor([[0.25, 0.75]])
    agree = scores + 7.0  # same softmax on the valid slots (a shift changes nothing)
    assert disagreement(agree, ids, scores, w).item() == pytest.approx(0.0, abs=1e-6)
    flipped = -scores
    d = disagreement(flipped, ids, scores, w)
    p = torch.softmax(scores[0, 0, :2], 0)
    q = torch.softmax(flipped[0, 0, :2], 0)
    kl0 = (p * (p.log() - q.log())).sum()
    p1, q1 = torch.softmax(scores[0, 1], 0), torch.softmax(flipped[0, 1], 0)
    kl1 = (p1 * (p1.log() - q1.log())).sum()
    assert d.item() == pytest.approx((0.25 * kl0 + 0.75 * kl1).item(), rel=1e-5)


def test_length_popularity_prefers_long_histories_and_popular_targets():
    pop = torch.tensor([100, 1, 50, 10])
    hist = torch.tensor([[-1, -1, 5], [1, 2, 3], [-1, 2, 3], [1, 2, 3]])
    target = torch.tensor([1, 0, 2, 3])
    d = length_popularity(hist, target, pop)
    assert d.argmin().item() == 1 and d.argmax().item() == 0  # long + popular easiest; short + rare hardest


def test_objective_masks_rows_by_disagreement_and_logs_counts(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, epochs=1,
                      distill={"curriculum": {"kind": "disagreement", "start": 0.4, "epochs": 3}})
    model = build_model(cfg, small_split.data.num_items)
    obj = DistillObjective(cfg, small_split, model)
    engine = LocalEngine(model, lr=1e-3)
    sizes = []
    for batch in obj.batches(1):
        sizes.append(batch["target"].shape[0])
        obj.loss(engine, batch)
        assert int(obj.last["keep"].sum()) == math.ceil(0.4 * sizes[-1])
        assert obj.last["teacher_weights"].shape[0] == math.ceil(0.4 * sizes[-1])  # masked rows left the loss
    stats = obj.epoch_stats()
    assert stats["curriculum_rows_seen"] == sum(sizes) == obj.dataset.num_rows
    assert stats["curriculum_rows_masked"] == sum(n - math.ceil(0.4 * n) for n in sizes)


def test_length_popularity_curriculum_trains_and_reports(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, epochs=2,
                      distill={"curriculum": {"kind": "length_popularity", "pacing": "root", "start": 0.5, "epochs": 1}})
    res = train_distilled(cfg, small_split)
    first, second = res.history
    assert first["curriculum_fraction"] == 0.5 and second["curriculum_fraction"] == 1.0
    assert first["curriculum_rows_masked"] > 0 and second["curriculum_rows_masked"] == 0
    assert first["curriculum_rows_seen"] == second["curriculum_rows_seen"]
    assert res.valid["NDCG@10"] > 3 * random_init_ndcg(cfg, small_split) + 0.004
