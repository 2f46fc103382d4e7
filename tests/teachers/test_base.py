"""The Teacher interface: topk semantics, persistence, fingerprint checks and plug-in loading."""
from __future__ import annotations

import json

import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.teachers import (TEACHER_REGISTRY, FingerprintMismatchError, Teacher, TeacherError, load_teacher,
                                 register_teacher)
from prmkd_dist.teachers.base import CONFIG_FILE


class FixedScoresTeacher(Teacher):
    """A plug-in teacher as a user would write it: scores = a learned vector (+ item-count bias)."""

    kind = "test-fixed-scores"

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None, scale: float = 1.0):
        super().__init__(num_items, item_fingerprint, name)
        self.scale = scale
        self.weights = torch.nn.Parameter(torch.zeros(num_items))

    def config(self) -> dict:
        return {"scale": self.scale}

    def score(self, history: torch.Tensor) -> torch.Tensor:
        return (self.weights * self.scale).expand(history.shape[0], -1)


register_teacher(FixedScoresTeacher)


def make_teacher(num_items: int = 8, fingerprint: str = "fp-a") -> FixedScoresTeacher:
    t = FixedScoresTeacher(num_items, fingerprint, scale=2.0)
    with torch.no_grad():  # distinct scores, best = highest id
        t.weights.copy_(torch.arange(num_items, dtype=torch.float32))
    return t


def test_topk_sorted_distinct_excludes_history_and_never_padding():
    t = make_teacher()
    history = torch.tensor([[PAD_ID, PAD_ID, 7, 5], [1, 2, 3, 4], [PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    ids, scores = t.topk(history, 4)
    assert ids.dtype == torch.int64 and scores.dtype == torch.float32 and ids.shape == (3, 4)
    assert ids.tolist() == [[6, 4, 3, 2], [7, 6, 5, 0], [7, 6, 5, 4]]
    assert scores.tolist() == [[12.0, 8.0, 6.0, 4.0], [14.0, 12.0, 10.0, 0.0], [14.0, 12.0, 10.0, 8.0]]
    # padding on the left must not mask item C-1 (a -1 index would wrap around to the last column)
    assert 7 in ids[2].tolist()
    ids_all, _ = t.topk(history, 4, exclude_history=False)
    assert ids_all[0].tolist() == [7, 6, 5, 4]


def test_topk_fills_missing_candidates_with_empty_slots():
    t = make_teacher(num_items=4)
    history = torch.tensor([[0, 1, 2], [PAD_ID, 3, 3]])
    ids, scores = t.topk(history, 3)
    assert ids.tolist() == [[3, PAD_ID, PAD_ID], [2, 1, 0]]
    assert scores[0].tolist() == [6.0, 0.0, 0.0]
    assert torch.isfinite(scores).all()


def test_topk_rejects_bad_k_and_bad_ids():
    t = make_teacher()
    with pytest.raises(TeacherError, match="k must be"):
        t.topk(torch.tensor([[1]]), 9)
    with pytest.raises(TeacherError, match="row 1, position 0 holds id 8"):
        t.topk(torch.tensor([[1], [8]]), 2)
    with pytest.raises(TeacherError, match="row 0, position 1 holds id -2"):
        t.topk(torch.tensor([[1, -2]]), 2)


def test_save_load_round_trip_and_fingerprint(tmp_path):
    t = make_teacher()
    t.info["note"] = "hand-made"
    t.save(tmp_path / "t")
    meta = json.loads((tmp_path / "t" / CONFIG_FILE).read_text())
    assert meta["kind"] == "test-fixed-scores" and meta["item_fingerprint"] == "fp-a" and meta["config"] == {"scale": 2.0}
    loaded = load_teacher(tmp_path / "t", fingerprint="fp-a")
    assert isinstance(loaded, FixedScoresTeacher) and loaded.info == {"note": "hand-made"}
    h = torch.tensor([[PAD_ID, 3]])
    assert torch.equal(loaded.score(h), t.score(h))
    assert loaded.num_parameters() == t.num_parameters() == 8
    with pytest.raises(FingerprintMismatchError, match="fp-a.*fp-b"):
        load_teacher(tmp_path / "t", fingerprint="fp-b")
    with pytest.raises(FingerprintMismatchError):
        loaded.check_compatible("fp-b")
    from prmkd_dist.teachers import EASE

    with pytest.raises(TeacherError, match="not a EASE"):
        EASE.load(tmp_path / "t")


def test_unregistered_plugin_loads_through_its_module_path(tmp_path, monkeypatch):
    make_teacher().save(tmp_path / "t")
    monkeypatch.delitem(TEACHER_REGISTRY, "test-fixed-scores")
    # the class path in teacher.json points at this test module; importlib re-imports it
    meta = json.loads((tmp_path / "t" / CONFIG_FILE).read_text())
    assert meta["class"].endswith(":FixedScoresTeacher")
    loaded = load_teacher(tmp_path / "t")
    assert type(loaded).__name__ == "FixedScoresTeacher"


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(TeacherError, match="no teacher.json"):
        load_teacher(tmp_path)
    make_teacher().save(tmp_path / "t")
    path = tmp_path / "t" / CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["config"] = {"unknown_arg": 1}
    path.write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match="config does not fit"):
        load_teacher(tmp_path / "t")
    meta["kind"], meta["class"] = "nope", "no_such_module_xyz:Nope"
    path.write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match="cannot be imported"):
        load_teacher(tmp_path / "t")


def test_register_requires_unique_kind():
    class Other(FixedScoresTeacher):
        pass

    with pytest.raises(TeacherError, match="already registered"):
        register_teacher(Other)


def test_builtin_kinds_are_registered_with_shard_score_semantics():
    from prmkd_dist.data.shards import SCORE_SEMANTICS

    builtins = {"ease", "id-transformer", "unisrec"}
    assert builtins <= set(TEACHER_REGISTRY)
    for kind in builtins:
        assert TEACHER_REGISTRY[kind].score_semantics in SCORE_SEMANTICS


def test_unisrec_catalog_cache_follows_parameter_updates():
    """UniSRec caches adaptor(text) over the catalog at inference; any update of the adaptor or the text
    buffer must invalidate it, and training mode / autograd must never see it."""
    from prmkd_dist.teachers.unisrec import UniSRecNetwork

    torch.manual_seed(0)
    net = UniSRecNetwork(num_items=40, text_dim=12, dim=8, max_len=5, num_layers=1, num_heads=2, num_experts=3)
    with torch.no_grad():
        net.text_emb.copy_(torch.nn.functional.normalize(torch.randn(40, 12), dim=-1))
    net.eval()
    with torch.no_grad():
        first = net.output_weight()
        assert torch.equal(net.output_weight(), first)  # served from the cache
        assert net._text_repr_cache is not None
        next(net.adaptor.parameters()).add_(0.5)  # an optimiser step would do this in place
        updated = net.output_weight()
        net.text_emb.mul_(-1.0)
        flipped = net.output_weight()
    assert not torch.allclose(updated, first)
    assert not torch.allclose(flipped, updated)
    net._text_repr_cache = None
    with torch.no_grad():
        assert torch.allclose(net.output_weight(), flipped)  # the cached value was the fresh one
    net.train()
    w = net.output_weight()  # training: recomputed with autograd, never the cache
    assert w.requires_grad
