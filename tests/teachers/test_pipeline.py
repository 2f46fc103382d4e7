"""The one-command teacher pipeline (``teachers pipeline --fast``) and the teacher configs, on 12 real
ml-latest-small users restricted to the 1,004 items they touched (so that EASE's Cholesky and the text
encoding take seconds): all three teachers trained, exported, merged into T=3 shards the loader reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.data.loader import TeacherShardDataset
from prmkd_dist.data.shards import ShardSet
from prmkd_dist.teachers.pipeline import (CONFIG_DIR, DATASET_TEACHERS, EXTRA_TEACHERS, TeacherConfigError,
                                          load_teacher_config, run_teacher_pipeline)

ML_TEACHERS = list(DATASET_TEACHERS["ml-latest-small"])


@pytest.fixture(scope="module")
def tiny_dir(ml_tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ml-tiny")
    ml_tiny.save(str(path))
    return path


def test_builtin_configs_load():
    packaged = [name for sets in (DATASET_TEACHERS, EXTRA_TEACHERS) for names in sets.values() for name in names]
    for name in packaged:
        for fast in (False, True):
            cfg = load_teacher_config(name, fast=fast)
            assert name.startswith(cfg.kind) and cfg.dataset in ("ml-latest-small", "amazon-games")
            assert cfg.export["k"] >= 1
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(packaged)
    full, fast = load_teacher_config("id_transformer-ml"), load_teacher_config("id_transformer-ml", fast=True)
    assert full.hparams["dim"] == 256 and fast.hparams["dim"] == 16 and fast.hparams["dropout"] == full.hparams["dropout"]


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: gru\ndataset: ml-latest-small\n")
    with pytest.raises(TeacherConfigError, match="bad.yaml: kind 'gru'"):
        load_teacher_config(bad)
    bad.write_text("name: x\nkind: ease\ndataset: d\ntrain: {epochs: 3}\n")
    with pytest.raises(TeacherConfigError, match="closed form"):
        load_teacher_config(bad)
    bad.write_text("name: x\nkind: unisrec\ndataset: d\nexport: {topk: 3}\n")
    with pytest.raises(TeacherConfigError, match="export.topk is not a known key"):
        load_teacher_config(bad)
    with pytest.raises(TeacherConfigError, match="neither a teacher config"):
        load_teacher_config("no-such-teacher")


def test_bad_ease_hparams_name_the_config(tmp_path, ml_small_split):
    from prmkd_dist.teachers.pipeline import train_teacher

    bad = tmp_path / "ease-bad.yaml"
    for hparams, message in (("{l2: 50.0, recent: 0}", "recent must be a positive int"),
                             ("{l2: -1.0}", "l2 must be > 0"),
                             ("{l2: 50.0, l2_grid: [10.0, 50.0]}", "both l2 and l2_grid")):
        bad.write_text(f"name: ease\nkind: ease\ndataset: ml-latest-small\nhparams: {hparams}\n")
        with pytest.raises(TeacherConfigError, match=f"ease-bad.yaml: .*{message}"):
            train_teacher(load_teacher_config(bad), ml_small_split)


def test_pipeline_fast_three_teachers(tiny_dir, tmp_path, capsys):
    from prmkd_dist.cli import main

    out = tmp_path / "teachers"
    rc = main(["teachers", "pipeline", "--dataset", str(tiny_dir), "--out", str(out), "--fast", "--no-progress",
               "--teachers", *ML_TEACHERS])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("unisrec", "id-transformer", "ease"):
        assert name in printed
    assert "ms/1k users" in printed and "NDCG@10" in printed
    report = json.loads((out / "pipeline.json").read_text())
    assert list(report["teachers"]) == ["unisrec", "id-transformer", "ease"]
    data = InteractionData.load(str(tiny_dir))
    rows = int(sum(max(len(data.sequence(u)) - (3 if len(data.sequence(u)) >= 3 else 1), 0)
                   for u in range(data.num_users)))  # training prefix minus its first item
    assert report["shards"]["rows"] == rows and report["shards"]["rows_missing"] == 0
    for name, t in report["teachers"].items():
        assert t["how"] == "trained" and t["metrics"]["params"] > 0 and t["metrics"]["ms_per_1k_users"] > 0
        assert 0.0 <= t["metrics"]["valid"]["NDCG@10"] <= 1.0 and t["export"]["num_rows"] == rows
    assert report["teachers"]["ease"]["score_semantics"] == "similarity"
    assert report["teachers"]["unisrec"]["score_semantics"] == "logit"
    meta = ShardSet.open(str(out / "shards"), item_fingerprint=data.fingerprint).meta
    assert meta.teacher_names == ("unisrec", "id-transformer", "ease") and {t.k for t in meta.teachers} == {20}
    ds = TeacherShardDataset(str(out / "shards"), batch_size=512, max_len=50, shuffle=False)
    batches = list(ds)
    assert sum(len(b["target"]) for b in batches) == rows and batches[0]["teacher_ids"].shape[1:] == (3, 20)
    assert (out / "exports" / "unisrec" / "embeddings" / "_manifest.json").is_file()
    assert not (out / "exports" / "ease" / "embeddings").exists(), "EASE has no item embeddings"

    # a second run reuses the saved teachers and the finished exports
    again = run_teacher_pipeline(str(tiny_dir), out, fast=True, teachers=ML_TEACHERS[1:], progress=False, log=lambda *_: None)
    for t in again["teachers"].values():
        assert t["how"] == "reused" and t["export"]["parts_skipped"] == list(range(t["export"]["num_parts"]))
    assert again["shards"]["teachers"] == ["id-transformer", "ease"]

    # the train/eval commands on the same configs and a given teacher
    rc = main(["teachers", "eval", "--teacher", str(out / "models" / "ease"), "--dataset", str(tiny_dir), "--no-progress"])
    assert rc == 0 and "ease (valid)" in capsys.readouterr().out
    given = run_teacher_pipeline(str(tiny_dir), tmp_path / "given", fast=True, teachers=["ease-ml"], progress=False,
                                 pretrained={"ease": str(out / "models" / "ease")}, log=lambda *_: None)
    assert given["teachers"]["ease"]["how"].startswith("given")
    with pytest.raises(TeacherConfigError, match="not in this pipeline"):
        run_teacher_pipeline(str(tiny_dir), tmp_path / "x", fast=True, teachers=["ease-ml"], progress=False,
                             pretrained={"sasrec": "somewhere"})


def test_cli_train_one_teacher(tiny_dir, tmp_path, capsys):
    from prmkd_dist.cli import main
    from prmkd_dist.teachers import load_teacher

    rc = main(["teachers", "train", "--config", "id_transformer-ml", "--dataset", str(tiny_dir), "--fast",
               "--out", str(tmp_path / "idt"), "--no-progress"])
    assert rc == 0 and "ms per 1,000 users" in capsys.readouterr().out
    teacher = load_teacher(tmp_path / "idt")
    assert teacher.name == "id-transformer" and teacher.config()["dim"] == 16
    assert teacher.info["pipeline_config"]["kind"] == "id_transformer" and teacher.info["epochs_run"] == 1
    rc = main(["teachers", "train", "--config", str(tmp_path / "missing.yaml"), "--no-progress"])
    assert rc == 2 and "no such teacher config" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["id_transformer-ml", "unisrec-ml"])
def test_initial_weights_depend_on_the_train_seed_alone(config, tiny_dir, monkeypatch):
    """The same config starts from the same weights whatever drew from torch's RNG before (another teacher's
    training in the pipeline, a text-cache miss), and from other weights with another seed."""
    import dataclasses

    import torch

    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers import pipeline, training

    monkeypatch.setattr(training, "fit_teacher", lambda *a, **k: None)  # the built network, untrained
    _, split = load_split(str(tiny_dir))
    cfg = load_teacher_config(config, fast=True)

    def initial_weights(draws: int, seed: int = 0) -> dict:
        torch.rand(draws)  # what ran earlier in the process
        c = dataclasses.replace(cfg, train={**cfg.train, "seed": seed})
        return {k: v.clone() for k, v in pipeline.train_teacher(c, split).state_dict().items()}

    first, second, other = initial_weights(1), initial_weights(1000), initial_weights(1, seed=1)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_pipeline_with_the_transition_teacher(tiny_dir, tmp_path, capsys):
    """The closed-form transition teacher through the pipeline's train, export and merge (its config's fast form),
    next to EASE; and its bad hparams are refused naming the config."""
    from prmkd_dist.cli import main
    from prmkd_dist.teachers import ItemTransition, load_teacher
    from prmkd_dist.teachers.pipeline import train_teacher

    out = tmp_path / "teachers"
    report = run_teacher_pipeline(str(tiny_dir), out, fast=True, teachers=["transition-ml", "transition_slist-ml", "ease-ml"],
                                  progress=False, log=lambda *_: None)
    assert list(report["teachers"]) == ["transition", "slist", "ease"]
    t = report["teachers"]["transition"]
    assert t["how"] == "trained" and t["score_semantics"] == "similarity" and t["export"]["num_rows"] == report["shards"]["rows"]
    teacher = load_teacher(out / "models" / "transition")
    assert type(teacher) is ItemTransition and teacher.config() == {"l2": 200.0, "window": 10, "decay": 2.0, "alpha": 0.0}
    slist = load_teacher(out / "models" / "slist")  # SLIST: the same kind with its SLIS half (alpha > 0)
    assert slist.alpha > 0 and torch.all(slist.B.diagonal() == 0) and not torch.equal(slist.B, teacher.B)
    data = InteractionData.load(str(tiny_dir))
    meta = ShardSet.open(str(out / "shards"), item_fingerprint=data.fingerprint).meta
    assert meta.teacher_names == ("transition", "slist", "ease")

    bad = tmp_path / "transition-bad.yaml"
    for hparams, message in (("{l2: 50.0, window: 0}", "window must be a positive int"),
                             ("{l2: 50.0, lags: 3}", "transition hparams are l2 or l2_grid, window, decay and alpha"),
                             ("{l2: 50.0, l2_grid: [10.0]}", "both l2 and l2_grid"),
                             ("{l2: 50.0, alpha: 1.5}", r"alpha must be a number in \[0, 1\)")):
        bad.write_text(f"name: t\nkind: transition\ndataset: ml-latest-small\nhparams: {hparams}\n")
        with pytest.raises(TeacherConfigError, match=f"transition-bad.yaml: .*{message}"):
            train_teacher(load_teacher_config(bad), LeaveOneOutSplit.of(data))
    bad.write_text("name: t\nkind: transition\ndataset: d\ntrain: {epochs: 3}\n")
    with pytest.raises(TeacherConfigError, match="transition has a closed form"):
        load_teacher_config(bad)


def test_pipeline_teacher_distilled_from_another(tiny_dir, tmp_path):
    """A neural teacher with a `distill` section (the Games ID transformer learns from SLIST): listed first, it is
    still trained after its source, reads the source's export, and its training differs from CE alone."""
    import dataclasses

    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers import load_teacher
    from prmkd_dist.teachers.pipeline import train_teacher

    out = tmp_path / "teachers"
    report = run_teacher_pipeline(str(tiny_dir), out, fast=True, teachers=["id_transformer-games", "transition_slist-ml"],
                                  progress=False, log=lambda *_: None)
    assert list(report["teachers"]) == ["slist", "id-transformer"]  # the source first
    assert report["shards"]["teachers"] == ["slist", "id-transformer"]
    pupil = load_teacher(out / "models" / "id-transformer")
    assert pupil.info["distilled_from"] == str(out / "exports" / "slist")
    assert pupil.info["pipeline_config"]["distill"]["teacher"] == "slist"
    # the same config, seed and initial weights on the CE target alone ends elsewhere: the KD terms did train it
    cfg = load_teacher_config("id_transformer-games", fast=True)
    _, split = load_split(str(tiny_dir))
    plain = train_teacher(dataclasses.replace(cfg, distill={}), split)
    again = train_teacher(cfg, split, exports_root=out / "exports")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in pupil.state_dict().items())  # deterministic
    assert not all(torch.equal(v, plain.state_dict()[k]) for k, v in pupil.state_dict().items())
    # reused on a second run (same config, same data)
    report = run_teacher_pipeline(str(tiny_dir), out, fast=True, teachers=["transition_slist-ml", "id_transformer-games"],
                                  progress=False, log=lambda *_: None)
    assert report["teachers"]["id-transformer"]["how"] == "reused"
    # a changed source (another l2): retrained, its stale export replaced, and the pupil retrained on the new lists
    changed = tmp_path / "slist-l2.yaml"
    changed.write_text(_with_l2(CONFIG_DIR / "transition_slist-ml.yaml", 7.0))
    report = run_teacher_pipeline(str(tiny_dir), out, fast=True, teachers=[str(changed), "id_transformer-games"],
                                  progress=False, log=lambda *_: None)
    assert [t["how"] for t in report["teachers"].values()] == ["trained", "trained"]
    assert load_teacher(out / "models" / "slist").config()["l2"] == 7.0


def _with_l2(config, l2: float) -> str:
    """A teacher config's text with hparams.l2 replaced (in its fast form too)."""
    import yaml

    raw = yaml.safe_load(config.read_text())
    for section in (raw, raw.get("fast") or {}):
        if "l2" in (section.get("hparams") or {}):
            section["hparams"]["l2"] = l2
    return yaml.safe_dump(raw)


def test_distill_section_errors(tiny_dir, tmp_path, capsys):
    from prmkd_dist.cli import main
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers.pipeline import train_teacher

    bad = tmp_path / "idt-bad.yaml"
    head = "name: idt\nkind: id_transformer\ndataset: d\nhparams: {dim: 16, num_layers: 1, num_heads: 2, max_len: 20}\n"
    for distill, message in (("{temperature: 2.0}", "'teacher' names the teacher to distil from"),
                             ("{teacher: idt}", "cannot distil from itself"),
                             ("{teacher: slist, shards: /x}", "distill.shards: set by the pipeline"),
                             ("{teacher: slist, temperature: -1.0}", "distill.temperature=-1.0: expected a value > 0"),
                             ("{teacher: slist, lambda: 1.0}", "unknown key distill.lambda")):
        bad.write_text(head + f"distill: {distill}\n")
        with pytest.raises(TeacherConfigError, match=f"idt-bad.yaml.*{message}"):
            load_teacher_config(bad)
    bad.write_text("name: e\nkind: ease\ndataset: d\ndistill: {teacher: slist}\n")
    with pytest.raises(TeacherConfigError, match="only neural teachers take 'distill'"):
        load_teacher_config(bad)
    # the source must be in the pipeline, and no cycle
    bad.write_text(head + "distill: {teacher: nobody}\n")
    with pytest.raises(TeacherConfigError, match="distill.teacher 'nobody' is not a teacher of this pipeline"):
        run_teacher_pipeline(str(tiny_dir), tmp_path / "t", fast=True, teachers=[str(bad), "ease-ml"], progress=False,
                             log=lambda *_: None)
    other = tmp_path / "other.yaml"
    other.write_text(head.replace("idt", "other") + "distill: {teacher: idt}\n")
    bad.write_text(head + "distill: {teacher: other}\n")
    with pytest.raises(TeacherConfigError, match="forms a cycle"):
        run_teacher_pipeline(str(tiny_dir), tmp_path / "t", fast=True, teachers=[str(bad), str(other)], progress=False,
                             log=lambda *_: None)
    # alone (`teachers train`), its source's export must exist already
    bad.write_text(head + "distill: {teacher: slist}\n")
    _, split = load_split(str(tiny_dir))
    with pytest.raises(TeacherConfigError, match=f"distill.teacher 'slist': no export at {tmp_path / 'none' / 'slist'}"):
        train_teacher(load_teacher_config(bad), split, exports_root=tmp_path / "none")
    rc = main(["teachers", "train", "--config", str(bad), "--dataset", str(tiny_dir), "--no-progress",
               "--out", str(tmp_path / "idt")])
    assert rc == 2 and "no export at" in capsys.readouterr().err
