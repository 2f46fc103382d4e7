"""DeepFM, DCN-v2 and LightGCN: their terms against explicit computations, and brief real training.

Data: the real ml-latest-small slice and the real exported shards (ItemKNN + Popularity teachers) of
tests/distill/test_distill_trainer.py; item attributes are the real genres/tags of those movies."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distill"))  # --import-mode=importlib
from test_distill_trainer import K, shards, small_split  # noqa: E402,F401  (fixtures)

from prmkd_dist.data.dataset import left_pad  # noqa: E402
from prmkd_dist.distill.interaction import (CandidateObjective, GraphObjective, dedupe_columns,  # noqa: E402
                                            position_examples, student_objective)
from prmkd_dist.distill.trainer import train_distilled  # noqa: E402
from prmkd_dist.models import build_student  # noqa: E402
from prmkd_dist.models.dcn import CrossLayer  # noqa: E402
from prmkd_dist.models.features import DataBindingError, item_attributes  # noqa: E402
from prmkd_dist.models.lightgcn import training_edges  # noqa: E402
from prmkd_dist.train.config import ConfigError, config_from_dict  # noqa: E402
from prmkd_dist.train.engine import LocalEngine  # noqa: E402
from prmkd_dist.train.evaluate import evaluate  # noqa: E402
from prmkd_dist.train.trainer import build_model, load_checkpoint, train  # noqa: E402
from prmkd_dist.train.utils import seed_everything  # noqa: E402

HP = {"deepfm": {"dim": 8, "mlp": [16], "dropout": 0.0},
      "dcnv2": {"dim": 8, "mlp": [16], "cross_rank": 4, "dropout": 0.0},
      "lightgcn": {"dim": 32, "num_layers": 2}}


def cfg_for(name: str, out_dir, shards_dir: str = "", hparams=None, distill=None, **optim):
    raw = {"data": {"dataset": "unused", "max_len": 10, "windows": "all"},
           "model": {"name": name, "hparams": hparams if hparams is not None else HP[name]},
           "optim": {"epochs": 2, "batch_size": 256, "lr": 1e-2, "patience": 0, "num_negatives": 50, **optim},
           "run": {"seed": 0, "out_dir": str(out_dir), "tensorboard": False, "progress": False, "num_threads": 2}}
    if shards_dir:
        raw["distill"] = {"shards": shards_dir, **(distill or {})}
    return config_from_dict(raw)


def bound(name: str, split, tmp_path, **hp):
    torch.manual_seed(0)
    return build_model(cfg_for(name, tmp_path, hparams={**HP[name], **hp}), split.data.num_items, split).eval()


def some_rows(split, n: int = 6):
    users = np.arange(n)
    hist = torch.from_numpy(left_pad([split.train_sequence(u)[-10:] for u in users], 10))
    return hist, torch.from_numpy(users)


# ---- item attributes ------------------------------------------------------------------------------------
def test_ml_item_attributes_are_the_real_genres_and_tags(small_split):
    attrs = item_attributes(small_split.data)
    toy_story = list(small_split.data.item_raw_ids).index("1")
    names = {attrs.names[v] for v in attrs.values[attrs.offsets[toy_story]:attrs.offsets[toy_story + 1]]}
    assert {"genre:Adventure", "genre:Animation", "genre:Children", "genre:Comedy", "genre:Fantasy"} <= names
    assert "tag:pixar" in names
    assert item_attributes(small_split.data, "none").names == []
    with pytest.raises(ValueError, match="source must be one of"):
        item_attributes(small_split.data, "imdb")


# ---- DeepFM: FM term and the whole score against explicit computations ------------------------------------
def explicit_fields(model, split, user: int, hist: torch.Tensor, item: int):
    """Field embeddings and first-order term of one (user, item) pair straight from the tables' weights."""
    ue, ie = model.user_ebc.embedding_bags, model.item_ebc.embedding_bags
    h = hist[hist >= 0]
    off, vals = model.attr_offsets, model.attr_values  # bound from item_attributes (checked below)
    attrs = vals[off[item]:off[item + 1]]
    fields = [ue["fi_user"].weight[user], ue["fi_history"].weight[h].mean(0), ie["fi_item"].weight[item],
              ie["fi_attr"].weight[attrs].mean(0) if len(attrs) else torch.zeros(model.dim)]
    first = (model.bias[0] + model.user_bias[user] + model.hist_bias[h].mean() + model.item_bias[item]
             + (model.attr_bias[attrs].mean() if len(attrs) else 0.0))
    return fields, first


def test_deepfm_score_is_bias_plus_fm_plus_dnn(small_split, tmp_path):
    model = bound("deepfm", small_split, tmp_path)
    attrs = item_attributes(small_split.data)
    assert model.num_attributes == len(attrs.names) > 0 and model.num_fields == 4
    assert np.array_equal(model.attr_offsets.numpy(), attrs.offsets) and np.array_equal(model.attr_values.numpy(), attrs.values)
    with torch.no_grad():  # non-zero first-order terms, so they are checked too
        for p in (model.user_bias, model.hist_bias, model.item_bias, model.attr_bias, model.bias):
            p.normal_(std=0.1)
    hist, users = some_rows(small_split)
    items = torch.tensor([[int(small_split.train_sequence(u)[0]), 5, 17] for u in range(len(users))])
    got = model.score_items(hist, users, items)
    for b, m in itertools.product(range(len(users)), range(items.shape[1])):
        fields, first = explicit_fields(model, small_split, b, hist[b], int(items[b, m]))
        fm = sum(torch.dot(fields[f], fields[g]) for f, g in itertools.combinations(range(4), 2))
        dnn = model.dnn_out(model.dnn_rest(torch.relu(model.dnn_in(torch.cat(fields))))).squeeze()
        assert got[b, m].item() == pytest.approx((first + fm + dnn).item(), abs=1e-5)
    # the FM identity the model uses, in float64
    v = torch.randn(4, 8, dtype=torch.float64)
    assert model.fm_half(v).item() == pytest.approx(sum(v[f] @ v[g] for f, g in itertools.combinations(range(4), 2)).item())


# ---- DCN-v2: cross layer by hand, and the split first layer ---------------------------------------------------
@pytest.mark.parametrize("rank", [0, 3])
def test_cross_layer_is_x0_times_wx_plus_b_plus_x(rank):
    torch.manual_seed(0)
    layer = CrossLayer(6, rank)
    x0, x = torch.randn(4, 6), torch.randn(4, 6)
    w = layer.u.weight @ layer.v.weight if rank else layer.w.weight
    assert torch.allclose(layer.dense_weight(), w)
    for r in range(4):  # element by element
        for j in range(6):
            want = x0[r, j] * (sum(w[j, k] * x[r, k] for k in range(6)) + layer.bias[j]) + x[r, j]
            assert layer(x0, x)[r, j].item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("cross_rank", [0, 4])
def test_dcn_score_equals_the_unsplit_network(small_split, tmp_path, cross_rank):
    model = bound("dcnv2", small_split, tmp_path, cross_rank=cross_rank, num_cross_layers=3)
    with torch.no_grad():
        model.item_bias.normal_(std=0.1)
    hist, users = some_rows(small_split, 4)
    items = torch.arange(40, 47)
    got = model.score_items(hist, users, items)  # shared candidates: the chunked path
    for b, m in itertools.product(range(4), range(len(items))):
        fields, first = explicit_fields(model, small_split, b, hist[b], int(items[m]))
        x0 = torch.cat(fields)
        x = x0
        for layer in model.cross:
            x = layer(x0, x)
        want = model.out(model.dnn(x)).squeeze() + first
        assert got[b, m].item() == pytest.approx(want.item(), abs=1e-5)
    # score() over the catalog = score_items over every id
    full = model.score(hist, users)
    assert full.shape == (4, small_split.data.num_items)
    assert torch.allclose(full[:, 40:47], got, atol=1e-5)


# ---- LightGCN: propagation against a dense normalised adjacency in float64 -----------------------------------
def test_lightgcn_propagation_matches_dense_float64(small_split, tmp_path):
    model = bound("lightgcn", small_split, tmp_path, num_layers=3)
    u_n, c = small_split.data.num_users, small_split.data.num_items
    eu, ei = training_edges(small_split)
    assert len(eu) == len(set(zip(eu.tolist(), ei.tolist())))  # distinct pairs
    assert model.hparams["num_edges"] == len(eu)
    a = torch.zeros(u_n + c, u_n + c, dtype=torch.float64)
    a[torch.from_numpy(eu), torch.from_numpy(ei) + u_n] = 1.0
    a[torch.from_numpy(ei) + u_n, torch.from_numpy(eu)] = 1.0
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    a_hat = inv[:, None] * a * inv[None, :]
    e0 = torch.cat([model.user_ec.embeddings["lgcn_user"].weight, model.item_ec.embeddings["lgcn_item"].weight]).double()
    layers = [e0]
    for _ in range(3):
        layers.append(a_hat @ layers[-1])
    want = torch.stack(layers).mean(0)
    with torch.no_grad():
        users, items = model.propagated()
    assert torch.allclose(users.double(), want[:u_n], atol=1e-6) and torch.allclose(items.double(), want[u_n:], atol=1e-6)
    hist, ids = some_rows(small_split, 5)
    with torch.no_grad():
        s = model.score(hist, ids)
    assert torch.allclose(s.double(), model.logit_scale.double() * want[ids] @ want[u_n:].T, atol=1e-4)
    with pytest.raises(ValueError, match="transductive"):
        model.score(hist)


# ---- objectives ----------------------------------------------------------------------------------------------
def test_dedupe_columns_points_to_first_occurrence():
    cand = torch.tensor([[7, 3, 7, 9, 3, 7], [1, 2, 3, 4, 5, 6]])
    assert dedupe_columns(cand).tolist() == [[0, 1, 0, 3, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_position_examples_cover_every_training_target_once(small_split):
    ex = position_examples(small_split, 10, "all")
    keys = small_split.train_offsets[ex[:, 0]] + ex[:, 1]
    expected = np.concatenate([np.arange(a + 1, b) for a, b in zip(small_split.train_offsets[:-1],
                                                                  small_split.train_offsets[1:]) if b - a >= 2])
    assert np.array_equal(np.sort(keys), expected)


def test_candidate_objective_uses_teacher_lists_and_weights(small_split, shards, tmp_path):
    cfg = cfg_for("deepfm", tmp_path, shards, distill={"strategy": "confidence"})
    model = build_model(cfg, small_split.data.num_items, small_split)
    obj = student_objective(cfg, small_split, model)
    assert isinstance(obj, CandidateObjective) and obj.selected == ("itemknn", "pop")
    batch = next(obj.batches(1))
    loss = obj.loss(LocalEngine(model, lr=1e-3), batch)
    assert torch.isfinite(loss)
    cand, cols = obj.last["candidates"], obj.last["teacher_columns"]
    ids = obj.table.ids[batch["keys"]].long()
    valid = ids >= 0
    assert valid.any() and torch.equal(cand.gather(1, cols.clamp(min=0).flatten(1)).view_as(ids)[valid], ids[valid])
    assert torch.equal(cand[:, 0], batch["target"])
    assert cand.shape[1] == 1 + 2 * K + 50
    # duplicated candidates get probability 0 (one column per distinct item)
    first = dedupe_columns(cand)
    dup = first != torch.arange(cand.shape[1])
    assert dup.any() and (obj.last["logits"][dup] < -1e8).all()
    # per-teacher weights of the configured strategy (confidence: the teacher's softmax at the target)
    w = obj.last["teacher_weights"]
    assert w.shape == (cand.shape[0], 2) and torch.allclose(w.sum(1), torch.ones(cand.shape[0]))


@pytest.mark.parametrize("name", ["deepfm", "lightgcn"])
def test_teacher_scale_reaches_the_interaction_and_graph_objectives(name, small_split, shards, tmp_path):
    weights = []
    for scale in ({}, {"itemknn": 0.5}):
        cfg = cfg_for(name, tmp_path, shards, distill={"strategy": "confidence", "teacher_scale": scale})
        model = build_model(cfg, small_split.data.num_items, small_split)
        obj = student_objective(cfg, small_split, model)
        obj.loss(LocalEngine(model, lr=1e-3), next(obj.batches(1)))
        weights.append(obj.last["teacher_weights"])
    plain, scaled = weights
    assert (plain[:, 0] > 0).any()
    assert torch.allclose(scaled[:, 0], 0.5 * plain[:, 0]) and torch.equal(scaled[:, 1], plain[:, 1])


def test_unsupported_options_and_unbound_models_fail_clearly(small_split, shards, tmp_path):
    with pytest.raises(ConfigError, match="distill.lambda_rank: not supported for the 'deepfm'"):
        student_objective(cfg_for("deepfm", tmp_path, shards, distill={"lambda_rank": 1.0}), small_split,
                          bound("deepfm", small_split, tmp_path))
    with pytest.raises(ValueError, match="needs the split"):
        build_model(cfg_for("lightgcn", tmp_path), small_split.data.num_items)
    with pytest.raises(ValueError, match=r"\['num_users'\] are derived from the data"):
        build_model(cfg_for("deepfm", tmp_path, hparams={"num_users": 3}), small_split.data.num_items, small_split)
    model = build_student("lightgcn", small_split.data.num_items, num_users=5, num_edges=10)
    with pytest.raises(DataBindingError, match="num_users=5"):
        model.bind_data(small_split)
    with pytest.raises(ConfigError, match="optim.num_negatives"):
        cfg_for("deepfm", tmp_path, num_negatives=-1)


# ---- brief real training: each student beats its random init; distilled and CE-only -------------------------
def random_init(cfg, split) -> dict:
    seed_everything(cfg.run.seed)
    return evaluate(build_model(cfg, split.data.num_items, split), split, "valid", max_len=cfg.data.max_len,
                    progress=False)


@pytest.mark.parametrize("name", ["lightgcn", "deepfm", "dcnv2"])
def test_student_trains_distilled_beats_random_init_and_reloads(name, small_split, shards, tmp_path):
    cfg = cfg_for(name, tmp_path, shards)
    rand = random_init(cfg, small_split)
    res = train_distilled(cfg, small_split)
    # 150 validation users: top-10 hits are too few to compare reliably; MRR ranks every target
    assert res.valid["MRR"] > 3 * rand["MRR"] and res.valid["MRR"] > 0.005, (res.valid, rand)
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    model, _, meta = load_checkpoint(res.checkpoint_dir, small_split)
    assert meta["data_hparams"]["num_users"] == small_split.data.num_users
    again = evaluate(model, small_split, "valid", max_len=10, progress=False)
    assert again["NDCG@10"] == pytest.approx(res.valid["NDCG@10"], abs=1e-6)


def test_ce_only_baselines_train_on_the_same_examples(small_split, shards, tmp_path):
    """lambda_kd = 0 on the same shards, and no shards at all, both train (LightGCN: the same loss)."""
    cfg0 = cfg_for("lightgcn", tmp_path / "kd0", shards, distill={"lambda_kd": 0.0}, epochs=1)
    cfg_plain = cfg_for("lightgcn", tmp_path / "plain", epochs=1)
    torch.manual_seed(0)
    m0 = build_model(cfg0, small_split.data.num_items, small_split)
    torch.manual_seed(0)
    m1 = build_model(cfg_plain, small_split.data.num_items, small_split)
    o0, o1 = student_objective(cfg0, small_split, m0), student_objective(cfg_plain, small_split, m1)
    assert isinstance(o0, GraphObjective) and np.array_equal(o0.examples, o1.examples)
    b = next(o0.batches(1))
    l0, l1 = o0.loss(LocalEngine(m0, lr=1e-3), b), o1.loss(LocalEngine(m1, lr=1e-3), b)
    assert l0.item() == pytest.approx(l1.item(), rel=1e-5)
    res = train(cfg_for("deepfm", tmp_path / "fm", epochs=1), small_split)
    assert res.valid["MRR"] > 3 * random_init(cfg_for("deepfm", tmp_path), small_split)["MRR"]


def test_an_interrupted_deepfm_distillation_resumes_to_the_same_numbers(small_split, shards, tmp_path, resumed_twin):
    """run.resume through the candidate objective: the epoch order and the sampled negatives' generator resume."""
    def cfg(out):
        c = cfg_for("deepfm", out, shards, hparams={**HP["deepfm"], "dropout": 0.2}, distill={"strategy": "confidence"},
                    epochs=3)
        c.run.resume, c.run.num_threads = True, 1
        return c

    resumed_twin(lambda c: train_distilled(c, small_split), cfg, tmp_path)
