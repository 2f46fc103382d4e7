"""benchmarks/quality.py: borrowed baselines, resumed reports (one report filled by several calls), the variants."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: not importable otherwise
from test_distill_trainer import shards, small_split  # noqa: E402,F401  (the real slice and its teacher shards)


def _report(path: Path, dataset="amazon-games", config="distill-sasrec-games", seeds=(0, 1, 2)):
    metrics = {m: 0.01 * (i + 1) for i, m in enumerate(["HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR"])}
    runs = [{"seed": s, "valid": {k: v + s for k, v in metrics.items()}, "test": {k: v + 2 * s for k, v in metrics.items()},
             "best_epoch": 3 + s, "epochs_run": 6, "train_seconds": 10.0 * (s + 1)} for s in seeds]
    path.write_text(json.dumps({"dataset": dataset, "config": config,
                                "results": {"no distillation": {"overrides": ["distill.lambda_kd=0"], "runs": runs}}}))
    return path


def test_earlier_baseline_takes_the_requested_seeds(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    got = q.earlier_baseline(str(_report(tmp_path / "r.json")), "amazon-games", "distill-sasrec-games", [1, 2])
    assert [r["seed"] for r in got["runs"]] == [1, 2]
    assert got["summary"]["best_epoch"] == [4, 5]
    assert got["summary"]["test NDCG@10"]["mean"] == pytest.approx(0.02 + 3.0)  # seeds 1 and 2: +2, +4
    assert got["from"] == str(tmp_path / "r.json")


@pytest.mark.parametrize("dataset, config, seeds, message", [
    ("ml-latest-small", "distill-sasrec-games", [0], "dataset is 'amazon-games'"),
    ("amazon-games", "distill-sasrec-ml", [0], "config is 'distill-sasrec-games'"),
    ("amazon-games", "distill-sasrec-games", [2, 5], r"seed\(s\) \[5\]"),
])
def test_earlier_baseline_refuses_a_mismatch(tmp_path, dataset, config, seeds, message, load_benchmark):
    q = load_benchmark("quality")
    path = _report(tmp_path / "r.json")
    with pytest.raises(ValueError, match=message) as err:
        q.earlier_baseline(str(path), dataset, config, seeds)
    assert str(path) in str(err.value)


def test_earlier_baseline_pools_the_seeds_of_several_reports(tmp_path, load_benchmark):
    """Two lanes split the baseline's seeds (one ran 0-1, the other 2): the runs come from whichever report has them,
    in the requested order; a seed both hold must be the same run; the overrides must agree."""
    q = load_benchmark("quality")
    a, b = _report(tmp_path / "a.json", seeds=(0, 1)), _report(tmp_path / "b.json", seeds=(1, 2))
    got = q.earlier_baseline([str(a), str(b)], "amazon-games", "distill-sasrec-games", [2, 0, 1])
    assert [r["seed"] for r in got["runs"]] == [2, 0, 1]
    assert got["summary"]["best_epoch"] == [5, 3, 4]
    assert got["from"] == f"{a}, {b}"
    with pytest.raises(ValueError, match=r"seed\(s\) \[3\]"):
        q.earlier_baseline([str(a), str(b)], "amazon-games", "distill-sasrec-games", [0, 3])
    other = json.loads(b.read_text())
    other["results"]["no distillation"]["runs"][0]["best_epoch"] = 9  # seed 1 run again, differently
    b.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="seed 1 differs from") as err:
        q.earlier_baseline([str(a), str(b)], "amazon-games", "distill-sasrec-games", [0, 2])
    assert str(b) in str(err.value) and str(a) in str(err.value)
    c = _report(tmp_path / "c.json", seeds=(2,))
    other = json.loads(c.read_text())
    other["results"]["no distillation"]["overrides"] = ["distill.lambda_kd=0", "optim.lr=1e-3"]
    c.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="overrides are"):
        q.earlier_baseline([str(a), str(c)], "amazon-games", "distill-sasrec-games", [0, 2])


def _unfinished(path: Path, **changes) -> Path:
    report = {"dataset": "ml-latest-small", "config": "distill-caser-ml", "shards": "s", "teacher_embeddings": [],
              "overrides": ["optim.lr=2e-3"], "complete": False, "table": None,
              "results": {"no distillation": {"runs": [{"seed": 0}], "from": "earlier.json"},
                          "conf+cons": {"runs": [{"seed": 0, "best_epoch": 3}, {"seed": 1, "best_epoch": 7}]}}}
    report.update(changes)
    path.write_text(json.dumps(report))
    return path


def test_resume_keeps_finished_runs_but_not_a_borrowed_baseline(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    got = q.finished_runs(str(_unfinished(tmp_path / "r.json")), "ml-latest-small", "distill-caser-ml", "s", [],
                          ["optim.lr=2e-3"])
    assert set(got) == {"conf+cons"}  # the baseline came from another report: --baseline-from decides it again
    assert got["conf+cons"][1]["best_epoch"] == 7 and sorted(got["conf+cons"]) == [0, 1]


@pytest.mark.parametrize("field, value", [("shards", "other"), ("overrides", ["optim.lr=1e-3"]),
                                          ("teacher_embeddings", ["e"]), ("config", "distill-sasrec-ml")])
def test_resume_refuses_a_report_made_with_other_settings(tmp_path, field, value, load_benchmark):
    q = load_benchmark("quality")
    path = _unfinished(tmp_path / "r.json", **{field: value})
    with pytest.raises(ValueError, match=f"cannot resume, its {field} is") as err:
        q.finished_runs(str(path), "ml-latest-small", "distill-caser-ml", "s", [], ["optim.lr=2e-3"])
    assert str(path) in str(err.value)


def test_resume_checks_the_content_digests_of_the_shards(tmp_path, capsys, load_benchmark):
    """Same paths, other files (a rebuilt teacher pipeline): refused; a report from before digests: a warning."""
    q = load_benchmark("quality")
    args = ("ml-latest-small", "distill-caser-ml", "s", [], ["optim.lr=2e-3"])
    seen = {"shards": "aa", "teacher_embeddings": []}
    path = _unfinished(tmp_path / "r.json", content_digests=seen)
    assert set(q.finished_runs(str(path), *args, dict(seen))) == {"conf+cons"}
    with pytest.raises(ValueError, match="its runs distilled from shards with content digest 'aa'.*now have 'bb'") as err:
        q.finished_runs(str(path), *args, {"shards": "bb", "teacher_embeddings": []})
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="teacher_embeddings with content digest"):
        q.finished_runs(str(path), *args, {"shards": "aa", "teacher_embeddings": ["cc"]})
    legacy = _unfinished(tmp_path / "legacy.json")
    assert set(q.finished_runs(str(legacy), *args, dict(seen))) == {"conf+cons"}
    assert "records no content digests" in capsys.readouterr().err


def test_run_variant_trains_only_what_was_not_kept(load_benchmark):
    q = load_benchmark("quality")
    trained, snapshots = [], []

    def train_one(seed):
        trained.append(seed)
        return {"seed": seed, "new": True}

    runs = q.run_variant("v", [0, 1, 2], {1: {"seed": 1, "new": False}}, train_one,
                         lambda rs: snapshots.append([r["seed"] for r in rs]))
    assert trained == [0, 2]
    assert [(r["seed"], r["new"]) for r in runs] == [(0, True), (1, False), (2, True)]
    assert snapshots == [[0], [0, 1, 2]]  # the partial report is written after each trained run
    # every seed kept: nothing trained, the runs still come back (they were dropped from the report once)
    assert q.run_variant("v", [0, 1], {0: {"seed": 0}, 1: {"seed": 1}}, train_one, snapshots.append) == [
        {"seed": 0}, {"seed": 1}]
    assert trained == [0, 2]
    # a call for seed 2 alone (--first-seed 2 --seeds 1) keeps the runs of seeds 0 and 1, in seed order
    runs = q.run_variant("v", [2], {1: {"seed": 1}, 0: {"seed": 0}}, train_one, snapshots.append)
    assert [r["seed"] for r in runs] == [0, 1, 2] and trained == [0, 2, 2]


def test_earlier_baseline_without_recorded_overrides(tmp_path, load_benchmark):
    """Reports written before quality.py recorded the baseline's overrides (hand-assembled JSON of earlier sessions)
    get the baseline variant's own overrides."""
    q = load_benchmark("quality")
    path = _report(tmp_path / "r.json")
    report = json.loads(path.read_text())
    del report["results"]["no distillation"]["overrides"]
    path.write_text(json.dumps(report))
    got = q.earlier_baseline(str(path), "amazon-games", "distill-sasrec-games", [0])
    assert got["overrides"] == ["distill.lambda_kd=0", "distill.lambda_rank=0"] and [r["seed"] for r in got["runs"]] == [0]


@pytest.mark.parametrize("student", ["sasrec", "gru4rec", "caser"])
def test_every_variant_is_a_valid_config(student, load_benchmark):
    """Each variant's overrides load into the student's config (a mistyped key or strategy fails here, not an
    hour into a quality run), and the strategies differ where the names say they do."""
    from prmkd_dist.train.config import load_config

    q = load_benchmark("quality")
    plan = q.variants(["a", "b"], have_embeddings=True, rank=0.5, curriculum_epochs=3)
    base = ["distill.shards=x", "distill.teacher_embeddings=[e]"]
    cfgs = {name: load_config(f"distill-{student}-ml", [*base, *ov]) for name, ov in plan.items()}
    assert cfgs["no distillation"].distill.lambda_kd == 0
    assert cfgs["teacher a alone"].distill.teachers == ("a",)
    assert cfgs["all teachers, uniform"].distill.strategy == "uniform"
    assert cfgs["all teachers, conf+cons"].distill.strategy == "confidence_consistency"
    assert cfgs["all teachers, confidence"].distill.strategy == "confidence"
    assert cfgs["+ ranking distillation"].distill.lambda_rank == 0.5
    assert cfgs["+ curriculum"].distill.curriculum.kind == "disagreement"


def test_resume_carries_over_the_variants_this_call_does_not_run(tmp_path, load_benchmark):
    """--resume with --only: the report keeps the other variants' finished runs (one report, several calls)."""
    q = load_benchmark("quality")
    path = _unfinished(tmp_path / "r.json")
    report = json.loads(path.read_text())
    metrics = {m: 0.1 for m in q.METRICS}
    for r in report["results"]["conf+cons"]["runs"]:
        r.update(valid=metrics, test={**metrics, "NDCG@20": 0.1 * (r["seed"] + 1)}, train_seconds=5.0)
    report["results"]["conf+cons"]["overrides"] = ["distill.strategy=confidence_consistency"]
    path.write_text(json.dumps(report))
    done = q.finished_runs(str(path), "ml-latest-small", "distill-caser-ml", "s", [], ["optim.lr=2e-3"])
    got = q.carried_over(str(path), done, ["no distillation", "MKD"])
    assert list(got) == ["conf+cons"]
    assert got["conf+cons"]["overrides"] == ["distill.strategy=confidence_consistency"]
    assert [r["seed"] for r in got["conf+cons"]["runs"]] == [0, 1]
    assert got["conf+cons"]["summary"]["test NDCG@20"]["mean"] == pytest.approx(0.15)
    # a variant this call runs is not carried over: run_variant keeps its finished seeds itself
    assert q.carried_over(str(path), done, ["conf+cons"]) == {}


def test_single_teacher_embedding_control_is_a_valid_config(load_benchmark):
    """"teacher X alone + embedding distillation" is "+ embedding distillation" with one teacher's lists."""
    from prmkd_dist.train.config import load_config

    q = load_benchmark("quality")
    plan = q.variants(["a", "b"], have_embeddings=True, rank=0.5, curriculum_epochs=3)
    base = ["distill.shards=x", "distill.teacher_embeddings=[e]"]
    ctl = load_config("distill-caser-ml", [*base, *plan["teacher b alone + embedding distillation"]]).distill
    mix = load_config("distill-caser-ml", [*base, *plan["+ embedding distillation"]]).distill
    assert ctl.teachers == ("b",) and mix.teachers != ("b",)
    assert (ctl.strategy, ctl.lambda_rank, ctl.embedding.enabled) == (mix.strategy, mix.lambda_rank, True)
    assert "teacher a alone + embedding distillation" not in q.variants(["a"], False, 0.5, 3)


def test_a_resumed_report_keeps_the_commands_that_filled_it(tmp_path, load_benchmark):
    q = load_benchmark("quality")
    old = _unfinished(tmp_path / "old.json", command="quality.py --only a")  # written before "commands" existed
    assert q.earlier_commands(str(old)) == ["quality.py --only a"]
    new = _unfinished(tmp_path / "new.json", command="quality.py --only b",
                      commands=["quality.py --only a", "quality.py --only b"])
    assert q.earlier_commands(str(new)) == ["quality.py --only a", "quality.py --only b"]
    assert q.earlier_commands(str(_unfinished(tmp_path / "none.json"))) == []


def test_two_resumed_calls_fill_one_report(small_split, shards, tmp_path, monkeypatch, load_benchmark):
    """End to end with the real trainer (one epoch on a 150-user slice and its real teacher shards): a second
    ``--resume --only`` call adds its variant and keeps the first call's, and the report records both commands and
    each run's thread count."""
    q = load_benchmark("quality")
    monkeypatch.setattr(q, "load_split", lambda name: (None, small_split))
    trained, real_train = [], q.train_distilled
    monkeypatch.setattr(q, "train_distilled", lambda cfg, split: trained.append(cfg.distill.teachers) or real_train(cfg, split))
    out = tmp_path / "report.json"
    common = ["--dataset", "ml-latest-small", "--student", "gru4rec", "--seeds", "1", "--shards", shards,
              "--set", "optim.epochs=1", "--set", "optim.batch_size=64", "--set", "run.num_threads=1",
              "--out", str(out), "--run-dir", str(tmp_path / "runs"), "--resume"]
    assert q.main([*common, "--only", "teacher pop alone"]) == 0
    first = json.loads(out.read_text())
    assert len(trained) == 2  # no distillation + pop alone
    from prmkd_dist.data.shards import ShardSet

    assert first["content_digests"] == {"shards": ShardSet.open(shards).content_digest(), "teacher_embeddings": []}
    # as a report from before digests were recorded: the resumed report cannot vouch for one content any more
    out.write_text(json.dumps({k: v for k, v in first.items() if k != "content_digests"}))
    assert q.main([*common, "--only", "all teachers, uniform"]) == 0
    assert len(trained) == 3  # only the new variant trained: the first call's runs are kept
    got = json.loads(out.read_text())
    assert list(got["results"]) == ["no distillation", "teacher pop alone", "all teachers, uniform"]
    assert got["results"]["teacher pop alone"]["runs"] == first["results"]["teacher pop alone"]["runs"]
    assert got["results"]["no distillation"]["runs"] == first["results"]["no distillation"]["runs"]
    assert len(got["commands"]) == 2 and "uniform" in got["commands"][1] and got["complete"]
    assert all(r["threads"] == 1 for res in got["results"].values() for r in res["runs"])
    assert got["content_digests"] is None
    assert got["seeds"] == [0]
    # a third call adds a seed to one variant (--first-seed): the report now holds seeds 0 and 1, not just the last
    assert q.main([*common, "--first-seed", "1", "--only", "teacher pop alone"]) == 0
    assert len(trained) == 5  # seed 1 of the baseline and of pop alone
    got = json.loads(out.read_text())
    assert got["seeds"] == [0, 1]
    assert [r["seed"] for r in got["results"]["teacher pop alone"]["runs"]] == [0, 1]
    assert [r["seed"] for r in got["results"]["all teachers, uniform"]["runs"]] == [0]


def test_a_run_cut_short_resumes_after_its_last_epoch(small_split, shards, tmp_path, monkeypatch, capsys,
                                                      load_benchmark, interrupt_training):
    """``--resume``: a training killed mid-run continues from its last finished epoch (run.resume); the state a
    run of other settings left in the same --run-dir is discarded with a message, not resumed."""
    import prmkd_dist.train.trainer as trainer

    from ..conftest import TrainingInterrupted

    q = load_benchmark("quality")
    monkeypatch.setattr(q, "load_split", lambda name: (None, small_split))
    common = ["--dataset", "ml-latest-small", "--student", "gru4rec", "--seeds", "1", "--shards", shards,
              "--set", "optim.epochs=2", "--set", "optim.batch_size=64", "--set", "run.num_threads=1",
              "--run-dir", str(tmp_path / "runs"), "--resume", "--only", "teacher pop alone"]
    interrupt_training("valid", 2)  # the baseline's second epoch
    with pytest.raises(TrainingInterrupted):
        q.main([*common, "--out", str(tmp_path / "a.json")])
    states = list((tmp_path / "runs" / "a").glob("*/seed0/resume.pt"))
    assert len(states) == 1
    interrupt_training(None)
    real, stages = trainer.evaluate, []
    monkeypatch.setattr(trainer, "evaluate", lambda m, s, stage, **kw: (stages.append(stage), real(m, s, stage, **kw))[1])
    assert q.main([*common, "--out", str(tmp_path / "a.json")]) == 0
    assert stages.count("valid") == 1 + 2  # the baseline's second epoch, then pop alone whole
    assert not states[0].exists()

    # a state left by other settings (the report it belonged to removed, the same --out and --run-dir reused)
    interrupt_training("valid", 2)
    with pytest.raises(TrainingInterrupted):
        q.main([*common, "--out", str(tmp_path / "b.json")])
    interrupt_training(None)
    (tmp_path / "b.json").unlink(missing_ok=True)
    capsys.readouterr()
    assert q.main([*common, "--set", "optim.lr=0.0005", "--out", str(tmp_path / "b.json")]) == 0
    assert "saved by a run with other settings (optim.lr: 0.001 -> 0.0005); that run starts over" in capsys.readouterr().err
