"""Distillation trainer on real ml-latest-small data with real exported shards of cheap real teachers.

To keep the suite short on 2 CPU cores, the data is a real slice of ml-latest-small (the first
``SUB_USERS`` users, each cut to their most recent ``SUB_LEN`` ratings; the item catalog, hence the
item fingerprint, is the full one) and the teachers are ItemKNN and Popularity fitted on it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.data.merge import merge_teacher_shards
from prmkd_dist.data.shards import FingerprintMismatchError, ShardMeta, TeacherInfo, write_teacher_embeddings
from prmkd_dist.distill.trainer import DistillObjective, prepare_student, train_distilled
from prmkd_dist.distill.weights import teacher_weights
from prmkd_dist.models import ItemKNN, Popularity
from prmkd_dist.teachers.export import export_teacher_shards
from prmkd_dist.train.config import ConfigError, config_from_dict
from prmkd_dist.train.engine import LocalEngine, no_teachers
from prmkd_dist.train.evaluate import evaluate
from prmkd_dist.train.trainer import build_model, load_checkpoint
from prmkd_dist.train.utils import seed_everything

SUB_USERS, SUB_LEN, K = 150, 25, 20


def ml_slice(data: InteractionData, users: int = SUB_USERS, last: int = SUB_LEN) -> InteractionData:
    """The first ``users`` users of ``data``, each keeping their ``last`` most recent interactions."""
    lo, hi = data.offsets[:users], data.offsets[1:users + 1]
    starts = np.maximum(lo, hi - last)
    lens = hi - starts
    offsets = np.zeros(users + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    idx = np.concatenate([np.arange(a, b) for a, b in zip(starts, hi)])
    return InteractionData(f"{data.name}-slice", users, data.num_items, offsets, data.items[idx],
                           data.timestamps[idx], data.item_raw_ids, data.user_raw_ids[:users])


def svd_item_embeddings(split: LeaveOneOutSplit, dim: int = 16) -> np.ndarray:
    """A cheap real collaborative teacher embedding: rank-``dim`` SVD of the item-user matrix."""
    users = np.repeat(np.arange(split.data.num_users), np.diff(split.train_offsets))
    m = torch.zeros(split.data.num_items, split.data.num_users)
    m[torch.from_numpy(split.train_items), torch.from_numpy(users)] = 1.0
    torch.manual_seed(0)
    u, s, _ = torch.svd_lowrank(m, q=dim)
    return (u * s.sqrt()).numpy().astype(np.float32)


def write_embeddings(split: LeaveOneOutSplit, out_dir, name: str = "svd", dim: int = 16) -> str:
    meta = ShardMeta(split.data.num_items, split.data.fingerprint, (TeacherInfo(name, 1, "similarity"),),
                     producer="tests", kind="embeddings", embedding_dim=dim)
    write_teacher_embeddings(str(out_dir), meta, np.arange(split.data.num_items), svd_item_embeddings(split, dim))
    return str(out_dir)


@pytest.fixture(scope="session")
def small_split(ml_small) -> LeaveOneOutSplit:
    return LeaveOneOutSplit.of(ml_slice(ml_small))


@pytest.fixture(scope="session")
def shards(small_split, tmp_path_factory) -> str:
    """Real exported + merged shards of two cheap real teachers (ItemKNN, Popularity), top-20."""
    root = tmp_path_factory.mktemp("distill-shards")
    parts = []
    for name, teacher in (("itemknn", ItemKNN.fit(small_split, k=50)), ("pop", Popularity.fit(small_split))):
        export_teacher_shards(teacher, small_split, root / name, name=name, k=K, max_history=50,
                              progress=False, embeddings=False, rows_per_file=2048)
        parts.append(str(root / name))
    merge_teacher_shards(parts, str(root / "merged"))
    return str(root / "merged")


@pytest.fixture(scope="session")
def embeddings(small_split, tmp_path_factory) -> str:
    return write_embeddings(small_split, tmp_path_factory.mktemp("emb") / "svd")


def distill_cfg(out_dir, shards: str, *, model=None, distill=None, **optim):
    return config_from_dict({
        "data": {"dataset": "unused", "max_len": 20},
        "model": model or {"name": "sasrec", "hparams": {"dim": 32, "num_layers": 1, "num_heads": 1, "dropout": 0.1}},
        "optim": {"epochs": 2, "batch_size": 256, "lr": 5e-3, "patience": 0, **optim},
        "run": {"seed": 1, "out_dir": str(out_dir), "tensorboard": False, "progress": False, "num_threads": 2},
        "distill": {"shards": shards, **(distill or {})},
    })


def random_init_ndcg(cfg, split) -> float:
    """Validation NDCG@10 of the untrained student that ``train_distilled(cfg)`` starts from."""
    seed_everything(cfg.run.seed)
    return evaluate(build_model(cfg, split.data.num_items), split, "valid", max_len=cfg.data.max_len,
                    progress=False)["NDCG@10"]


def first_batch(obj: DistillObjective) -> dict:
    return next(iter(obj.batches(1)))


def test_distillation_improves_over_random_init_and_checkpoint_is_plain(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, distill={"lambda_rank": 0.5})
    rand = random_init_ndcg(cfg, small_split)
    res = train_distilled(cfg, small_split)
    assert res.valid["NDCG@10"] > 3 * rand + 0.004
    assert res.epochs_run == 2 and res.history[1]["train_loss"] < res.history[0]["train_loss"]
    model, loaded_cfg, meta = load_checkpoint(res.checkpoint_dir, small_split)
    assert loaded_cfg.distill.shards == shards and meta["epoch"] == res.best_epoch
    again = evaluate(model, small_split, "valid", max_len=20, progress=False)
    assert again["NDCG@10"] == pytest.approx(res.valid["NDCG@10"], abs=1e-9)


def test_teacher_subset_selects_columns(small_split, shards, tmp_path):
    cfg_all = distill_cfg(tmp_path, shards)
    cfg_one = distill_cfg(tmp_path, shards, distill={"teachers": ["pop"]})
    model = build_model(cfg_all, small_split.data.num_items)
    all_t = DistillObjective(cfg_all, small_split, model)
    one_t = DistillObjective(cfg_one, small_split, model)
    assert all_t.selected == ("itemknn", "pop") and one_t.selected == ("pop",)
    raw = first_batch(all_t)
    b_all, b_one = all_t.prepare(raw), one_t.prepare(raw)
    assert b_one["teacher_ids"].shape == (raw["target"].shape[0], 1, K)
    assert torch.equal(b_one["teacher_ids"][:, 0], b_all["teacher_ids"][:, 1])
    assert torch.equal(b_one["teacher_scores"][:, 0], raw["teacher_scores"][:, 1])
    # popularity's top-K never holds a user's own past items but is otherwise the same few items
    assert (b_one["teacher_ids"] >= 0).all()
    with pytest.raises(ConfigError, match=r"distill.teachers: unknown teacher 'bert'.*itemknn"):
        DistillObjective(distill_cfg(tmp_path, shards, distill={"teachers": ["bert"]}), small_split, model)


def test_lambda_kd_zero_is_plain_ce_on_the_same_batch(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, distill={"lambda_kd": 0.0, "lambda_rank": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg, small_split.data.num_items).eval()
    obj = DistillObjective(cfg, small_split, model)
    engine = LocalEngine(model, lr=1e-3)
    raw = first_batch(obj)
    got = obj.loss(engine, raw)
    b = obj.prepare(raw)
    u = model.encode(b["history"])[:, -1]
    ce = engine.linear_loss(u, b["target"], *no_teachers(u.shape[0]))
    ref = torch.nn.functional.cross_entropy(u @ model.output_weight().T, b["target"])
    assert got.item() == pytest.approx(ce.item(), rel=1e-6) and got.item() == pytest.approx(ref.item(), rel=1e-5)
    # the history cut to the batch's longest real history changes nothing
    full = model.encode(raw["history"])[:, -1]
    assert torch.allclose(full, u, atol=1e-5)


@pytest.mark.parametrize("strategy", ["uniform", "confidence", "consistency", "confidence_consistency"])
def test_weights_used_are_teacher_weights(small_split, shards, tmp_path, strategy):
    cfg = distill_cfg(tmp_path, shards, distill={"strategy": strategy, "alpha": 0.3, "gamma": 0.5, "lambda_rank": 1.0})
    model = build_model(cfg, small_split.data.num_items)
    obj = DistillObjective(cfg, small_split, model)
    raw = first_batch(obj)
    obj.loss(LocalEngine(model, lr=1e-3), raw)
    b = obj.prepare(raw)
    want = teacher_weights(b["teacher_ids"], b["teacher_scores"], b["target"], strategy=strategy, alpha=0.3, gamma=0.5)
    assert torch.equal(obj.last["teacher_weights"], want)
    rho = obj.last["rank_weights"]
    assert rho.shape == b["teacher_ids"].shape and (rho > 0).all()  # every slot valid, every term >= position


def test_teacher_scale_multiplies_one_teachers_weights(small_split, shards, tmp_path):
    """distill.teacher_scale scales the named teacher's column of the strategy's weights (the other stays), and
    a name that is not a distilled teacher is refused with the known names."""
    cfg = distill_cfg(tmp_path, shards, distill={"teacher_scale": {"pop": 0.25}})
    model = build_model(cfg, small_split.data.num_items)
    obj = DistillObjective(cfg, small_split, model)
    raw = first_batch(obj)
    obj.loss(LocalEngine(model, lr=1e-3), raw)
    b = obj.prepare(raw)
    plain = teacher_weights(b["teacher_ids"], b["teacher_scores"], b["target"], strategy="confidence_consistency")
    col = list(obj.selected).index("pop")
    want = plain.clone()
    want[:, col] *= 0.25
    assert (plain[:, col] > 0).any() and torch.equal(obj.last["teacher_weights"], want)

    bad = distill_cfg(tmp_path, shards, distill={"teacher_scale": {"popularity": 0.5}})
    obj = DistillObjective(bad, small_split, build_model(bad, small_split.data.num_items))
    with pytest.raises(ConfigError, match=r"teacher_scale.*'popularity'.*\['itemknn', 'pop'\]"):
        obj.loss(LocalEngine(model, lr=1e-3), first_batch(obj))
    for value in (-1.0, float("nan"), "half"):
        with pytest.raises(ConfigError, match=r"distill.teacher_scale=.*teacher 'pop': expected a finite number >= 0"):
            distill_cfg(tmp_path, shards, distill={"teacher_scale": {"pop": value}})


def test_chunked_rank_weights_equal_unchunked(small_split, shards, tmp_path, monkeypatch):
    import prmkd_dist.distill.trainer as dt
    from prmkd_dist.distill.weights import importance_weights

    cfg = distill_cfg(tmp_path, shards, distill={"lambda_rank": 1.0})
    model = build_model(cfg, small_split.data.num_items).eval()
    obj = DistillObjective(cfg, small_split, model)
    engine = LocalEngine(model, lr=1e-3)
    b = obj.prepare(first_batch(obj))
    with torch.no_grad():
        u = model.user_embedding(b["history"])
        full = importance_weights(b["teacher_ids"], b["teacher_scores"], u @ model.output_weight().T, student_topk=K)
    monkeypatch.setattr(dt, "LOGIT_CHUNK_ELEMENTS", small_split.data.num_items * 7)  # 7 rows per chunk
    assert torch.equal(dt.chunked_importance_weights(engine, u, b["teacher_ids"], b["teacher_scores"], student_topk=K), full)


def test_shards_of_another_catalog_are_refused(ml_small, shards, tmp_path):
    other = LeaveOneOutSplit.of(ml_slice(ml_small, users=50, last=10))
    other.data.fingerprint = "0123456789abcdef"
    cfg = distill_cfg(tmp_path, shards)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        DistillObjective(cfg, other, build_model(cfg, other.data.num_items))


def test_config_errors_name_the_key(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"distill.strategy='best'"):
        distill_cfg(tmp_path, shards, distill={"strategy": "best"})
    with pytest.raises(ConfigError, match=r"distill.curriculum.pacing"):
        distill_cfg(tmp_path, shards, distill={"curriculum": {"kind": "disagreement", "pacing": "cubic"}})
    with pytest.raises(ConfigError, match=r"distill.teacher_embeddings"):
        distill_cfg(tmp_path, shards, distill={"embedding": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"unknown key distill.lambda_kl"):
        distill_cfg(tmp_path, shards, distill={"lambda_kl": 1.0})
    with pytest.raises(ConfigError, match=r"distill.mkd.sld_beta"):
        distill_cfg(tmp_path, shards, distill={"mkd": {"sld_beta": 2}})
    # configs without a distill section keep working: distillation is off
    cfg = config_from_dict({"data": {"dataset": "x"}, "model": {"name": "sasrec"}})
    assert not cfg.distill.enabled


def test_prepare_student_without_extras_is_the_plain_student(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards)
    model, emb, report = prepare_student(cfg, small_split)
    assert type(model).__name__ == "SASRec" and emb is None and report == {}


def test_cli_train_dispatches_to_distillation(small_split, shards, tmp_path, capsys):
    import json

    from prmkd_dist.cli import main

    data_dir = tmp_path / "data"
    small_split.data.save(str(data_dir))
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(
        f"data: {{dataset: '{data_dir}', max_len: 10}}\n"
        "model: {name: gru4rec, hparams: {dim: 16, dropout: 0.0}}\n"
        "optim: {epochs: 1, batch_size: 512, lr: 0.005}\n"
        "run: {tensorboard: false}\n"
        f"distill: {{shards: '{shards}', teachers: [itemknn], lambda_rank: 0.5}}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out-dir", str(out), "--no-progress"]) == 0
    assert "| gru4rec (test) |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_run"] == 1 and results["test"]["users"] == len(small_split.eval_users("test"))
    # a missing shard directory is one clear line, exit code 2
    assert main(["train", "--config", str(cfg), "--set", f"distill.shards={tmp_path / 'nope'}", "--no-progress"]) == 2
    assert "no such shard directory" in capsys.readouterr().err


def test_max_batches_per_epoch_reads_fewer_rows_and_says_so(small_split, shards, tmp_path):
    cfg = distill_cfg(tmp_path, shards, epochs=1, batch_size=512, distill={"max_batches_per_epoch": 2})
    obj = DistillObjective(cfg, small_split, build_model(cfg, small_split.data.num_items))
    assert obj.num_batches() == 2 and len(obj.loader) > 2
    assert sum(b["target"].shape[0] for b in obj.batches(1)) == 1024
    assert obj.epoch_stats()["rows_read"] == 1024.0


def test_quickstart_distillation_stage_adds_teacher_and_student_rows(small_split, shards, tmp_path, monkeypatch):
    """The quickstart's teachers -> shards -> students stage, with the teacher pipeline replaced by the
    shards exported above (the pipeline itself is tested with the teachers)."""
    import prmkd_dist.teachers.pipeline as pipeline
    from prmkd_dist.train import cli

    metrics = {"valid": {"NDCG@10": 0.1}, "test": {"NDCG@10": 0.09}}
    calls = []

    def fake_pipeline(dataset, out_dir, fast=False, **kw):
        calls.append((dataset, fast))
        return {"teachers": {"itemknn": {"metrics": metrics}, "pop": {"metrics": metrics}},
                "shards": {"out_dir": shards}}

    monkeypatch.setattr(pipeline, "run_teacher_pipeline", fake_pipeline)
    result = cli.QuickstartResult()
    runs = cli._distillation_stage(result, "ml-latest-small", small_split, True, str(tmp_path), progress=False)
    assert calls == [("ml-latest-small", True)]
    assert set(runs) == {"no distillation", "distilled"}
    names = list(result.rows)
    assert names[:4] == ["teacher itemknn (valid)", "teacher itemknn (test)", "teacher pop (valid)", "teacher pop (test)"]
    assert any(n.startswith("SASRec on shards, CE only") for n in names)
    assert any(n.startswith("SASRec distilled (all teachers)") for n in names)
    for tr in runs.values():  # --fast: one capped epoch, the rows not read are reported
        assert tr.epochs_run == 1 and tr.history[0]["rows_read"] <= 100 * 256


@pytest.mark.parametrize("packing, extra", [
    ("example", {"strategy": "confidence_consistency", "lambda_rank": 0.5}),
    ("window", {"strategy": "confidence", "curriculum": {"kind": "disagreement", "start": 0.4, "epochs": 2},
                "embedding": {"enabled": True}, "mkd": {"cpd": 0.5}}),
])
def test_an_interrupted_distillation_resumes_to_the_same_numbers(small_split, shards, embeddings, tmp_path,
                                                                 resumed_twin, packing, extra):
    """run.resume through both distillation objectives (streamed examples; window packing with a curriculum, the
    embedding extension and the CPD projector, whose weights and optimizer state are part of the student)."""
    def cfg(out):
        c = distill_cfg(out, shards, distill={"packing": packing, "teacher_embeddings": [embeddings], **extra}, epochs=3)
        c.run.resume, c.run.num_threads = True, 1
        return c

    whole, resumed = resumed_twin(lambda c: train_distilled(c, small_split), cfg, tmp_path)
    if packing == "window":
        assert [h["curriculum_fraction"] for h in resumed.history] == [h["curriculum_fraction"] for h in whole.history]
    a, b = (load_checkpoint(d, small_split)[0].state_dict() for d in (whole.checkpoint_dir, resumed.checkpoint_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
