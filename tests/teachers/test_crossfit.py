"""Cross-fitted (out-of-fold) teacher lists on 12 real ml-latest-small users (1,004 items, so SLIST fits in well
under a second): folds over users, the split without a fold, lists equal to a teacher fitted without the example's
user (and not to the in-sample teacher's), export + resume, the fold cache, the pipeline's ``export.cross_fit``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.data.shards import ShardSet, list_parts, read_teacher_embeddings, validate_shards
from prmkd_dist.teachers import ItemTransition
from prmkd_dist.teachers.crossfit import CrossFitError, cross_fit_lists, user_folds, without_users
from prmkd_dist.teachers.export import ExportError, example_index, export_teacher_shards, score_topk
from prmkd_dist.teachers.pipeline import (TeacherConfigError, load_teacher_config, measure_teacher,
                                          run_teacher_pipeline)

SLIST = dict(l2=20.0, window=5, decay=2.0, alpha=0.2)


@pytest.fixture(scope="module")
def split(ml_tiny) -> LeaveOneOutSplit:
    return LeaveOneOutSplit.of(ml_tiny)


def read_all(root) -> pa.Table:
    return pa.concat_tables([t for _, _, t in ShardSet.open(str(root)).iter_row_groups()])


def fit_slist(sub: LeaveOneOutSplit, fold: int | None = None) -> ItemTransition:
    return ItemTransition.fit(sub, name="slist", **SLIST)


def test_user_folds_partition_the_users_reproducibly():
    f = user_folds(103, 4, seed=0)
    assert f.shape == (103,) and set(f.tolist()) == {0, 1, 2, 3}
    assert sorted(np.bincount(f).tolist()) == [25, 26, 26, 26]
    np.testing.assert_array_equal(f, user_folds(103, 4, seed=0))
    assert not np.array_equal(f, user_folds(103, 4, seed=1))
    assert not np.array_equal(f, np.arange(103) % 4)  # shuffled, not by id order
    for bad in (1, 0, 2.0, True):
        with pytest.raises(CrossFitError, match="folds must be an int >= 2"):
            user_folds(10, bad)
    with pytest.raises(CrossFitError, match="5 folds for 3 users"):
        user_folds(3, 5)


def test_without_users_removes_their_sequences_and_targets(split):
    drop = np.zeros(split.data.num_users, dtype=bool)
    drop[[1, 4, 7]] = True
    sub = without_users(split, drop)
    assert sub.data is split.data and len(sub.train_offsets) == len(split.train_offsets)
    for u in range(split.data.num_users):
        if drop[u]:
            assert len(sub.train_sequence(u)) == 0
            assert sub.valid_target[u] == PAD_ID and sub.test_target[u] == PAD_ID
        else:
            np.testing.assert_array_equal(sub.train_sequence(u), split.train_sequence(u))
            assert sub.valid_target[u] == split.valid_target[u] and sub.test_target[u] == split.test_target[u]
    assert len(sub.train_items) == len(split.train_items) - sum(len(split.train_sequence(u)) for u in (1, 4, 7))
    assert set(sub.eval_users("valid").tolist()).isdisjoint({1, 4, 7})
    with pytest.raises(CrossFitError, match="drop mask has shape"):
        without_users(split, drop[:-1])


def test_lists_come_from_the_teacher_fitted_without_the_user(split):
    folds = 3
    lists = cross_fit_lists(fit_slist, split, name="slist", folds=folds, k=10, max_history=50, batch_size=64,
                            log=lambda *_: None)
    keys, users, starts, _ = example_index(split)
    np.testing.assert_array_equal(lists.keys, keys)
    assert lists.ids.shape == (len(keys), 10) and lists.score_semantics == "similarity"
    fold_of = user_folds(split.data.num_users, folds)
    full = fit_slist(split)
    differs = 0
    for f in range(folds):
        rows = np.flatnonzero(fold_of[users] == f)
        assert len(rows) > 0
        held_out = fit_slist(without_users(split, fold_of == f))
        ids, scores = score_topk(held_out, keys[rows], starts[rows], split, 10, held_out.max_len, held_out.B.device)
        np.testing.assert_array_equal(lists.ids[rows], ids)
        np.testing.assert_allclose(lists.scores[rows], scores, rtol=1e-6, atol=1e-6)
        in_ids, _ = score_topk(full, keys[rows], starts[rows], split, 10, full.max_len, full.B.device)
        differs += int((in_ids != ids).any(axis=1).sum())
    assert differs > len(keys) // 2  # the in-sample teacher ranks otherwise: the held-out fits are not the full one
    # looked up by key, any order, any k up to the lists' k
    pick = keys[[5, 0, 17]]
    ids, scores = lists.example_topk(pick, starts[[5, 0, 17]], split, 4)
    np.testing.assert_array_equal(ids, lists.ids[[5, 0, 17], :4])
    with pytest.raises(CrossFitError, match="hold the top-10, top-11 asked"):
        lists.example_topk(pick, starts[[5, 0, 17]], split, 11)
    with pytest.raises(CrossFitError, match="example_key 999999 has no cross-fitted list"):
        lists.example_topk(np.array([999999]), np.array([0]), split, 4)


def test_export_of_cross_fitted_lists_and_resume(split, tmp_path):
    lists = cross_fit_lists(fit_slist, split, name="slist", folds=2, k=10, log=lambda *_: None)
    out = tmp_path / "oof"
    report = export_teacher_shards(lists, split, out, name="slist", k=10, progress=False, rows_per_file=500)
    assert report["num_rows"] == len(lists.keys) and report["score_semantics"] == "similarity"
    validate_shards(str(out), num_items=split.data.num_items, item_fingerprint=split.data.fingerprint)
    off, val = list_parts(read_all(out).column("teacher.slist.ids"))
    np.testing.assert_array_equal(val[off[0]:off[-1]].reshape(-1, 10), lists.ids)
    # the same lists resume; other lists (another fold count) are refused as another teacher
    again = export_teacher_shards(lists, split, out, name="slist", k=10, progress=False, rows_per_file=500)
    assert again["parts_skipped"] == list(range(report["num_parts"]))
    other = cross_fit_lists(fit_slist, split, name="slist", folds=3, k=10, log=lambda *_: None)
    with pytest.raises(ExportError, match="teacher_digest"):
        export_teacher_shards(other, split, out, name="slist", k=10, progress=False, rows_per_file=500)


def test_fold_cache_reuses_finished_folds(split, tmp_path):
    calls = []

    def counting_fit(sub, fold):
        calls.append(int(np.diff(sub.train_offsets).astype(bool).sum()))
        return fit_slist(sub)

    kw = dict(name="slist", folds=3, k=8, work_dir=tmp_path / "folds", fit_key="a", log=lambda *_: None)
    first = cross_fit_lists(counting_fit, split, **kw)
    assert len(calls) == 3
    second = cross_fit_lists(counting_fit, split, **kw)
    assert len(calls) == 3 and second.digest == first.digest  # every fold read back, none refitted
    (tmp_path / "folds" / "fold-01.json").unlink()  # an interrupted run: only that fold is fitted again
    third = cross_fit_lists(counting_fit, split, **kw)
    assert len(calls) == 4 and third.digest == first.digest
    cross_fit_lists(counting_fit, split, **{**kw, "fit_key": "b"})  # another teacher config: every fold refitted
    assert len(calls) == 7


def test_fold_workers_fit_their_folds_and_the_last_call_assembles(split, tmp_path):
    """``only``: a worker fits just its folds into the shared work_dir and returns None while others are missing;
    once every fold is finished the lists are those of one call fitting all folds."""
    fitted = []

    def recording_fit(sub, fold):
        fitted.append(fold)
        return fit_slist(sub)

    kw = dict(name="slist", folds=3, k=8, work_dir=tmp_path / "folds", fit_key="a", log=lambda *_: None)
    assert cross_fit_lists(recording_fit, split, only=[1], **kw) is None
    assert fitted == [1] and sorted(p.name for p in (tmp_path / "folds").glob("fold-*")) == ["fold-01.json", "fold-01.npz"]
    assert cross_fit_lists(recording_fit, split, only=[2, 0], **kw) is not None  # folds 0 and 2 fitted, 1 read back
    assert fitted == [1, 0, 2] and not list((tmp_path / "folds").glob("*.tmp*"))
    whole = cross_fit_lists(fit_slist, split, name="slist", folds=3, k=8, log=lambda *_: None)
    assert cross_fit_lists(recording_fit, split, **kw).digest == whole.digest and fitted == [1, 0, 2]
    with pytest.raises(CrossFitError, match=r"folds to fit \[3\] must be in 0..2"):
        cross_fit_lists(recording_fit, split, only=[3], **kw)
    with pytest.raises(CrossFitError, match="needs a work_dir"):
        cross_fit_lists(recording_fit, split, name="slist", folds=3, k=8, only=[0], log=lambda *_: None)


def test_claimed_folds_are_left_to_their_live_holder_and_freed_when_it_dies(split, tmp_path):
    """``claim``: a fold whose claim another process holds is left to it (the call returns None); once that process is
    killed (SIGKILL: no clean-up of its own) the kernel frees the claim and the next call fits the fold."""
    import signal
    import subprocess
    import sys

    work = tmp_path / "folds"
    work.mkdir()
    holder = subprocess.Popen(  # another worker, in the middle of fold 2 (0-based 1)
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(work / 'fold-01.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        fitted, logs = [], []
        kw = dict(name="slist", folds=3, k=8, work_dir=work, fit_key="a", claim=True, log=logs.append)
        assert cross_fit_lists(fit_slist, split, fitted=fitted, **kw) is None
        assert fitted == [0, 2] and "[cross-fit] slist: fold 2/3 is being fitted by another worker" in logs
        assert not (work / "fold-01.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    fitted = []
    lists = cross_fit_lists(fit_slist, split, fitted=fitted, **kw)
    assert fitted == [1]  # the dead worker's fold; folds 1 and 3 read back
    whole = cross_fit_lists(fit_slist, split, name="slist", folds=3, k=8, log=lambda *_: None)
    assert lists.digest == whole.digest
    with pytest.raises(CrossFitError, match="claiming folds needs a work_dir"):
        cross_fit_lists(fit_slist, split, name="slist", folds=3, k=8, claim=True, log=lambda *_: None)


def test_auto_fold_workers_fit_each_fold_once(ml_tiny, tmp_path):
    """`teachers pipeline --cross-fit-folds auto`: two identical real worker processes started together split the
    folds between them (each fold fitted by exactly one), and the pipeline run after them fits none."""
    import subprocess
    import sys

    (tmp_path / "slist-oof.yaml").write_text(SOURCE_YAML.replace("name: slist", "name: slist-oof")
                                             + "export: {k: 10, max_history: 50, cross_fit: 4}\n")
    ml_tiny.save(str(tmp_path / "data"))
    cmd = [sys.executable, "-m", "prmkd_dist.cli", "teachers", "pipeline", "--dataset", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--teachers", str(tmp_path / "slist-oof.yaml"), "--no-progress",
           "--threads", "1"]
    workers = [subprocess.Popen(cmd + ["--cross-fit-folds", "auto"], text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    for f in range(1, 5):
        assert sum(log.count(f"slist-oof: fold {f}/4: fit without") for log in logs) == 1, (f, logs)
    assert any("every fold is finished" in log for log in logs)  # the last worker to end reads the others back
    assembled = subprocess.run(cmd, text=True, capture_output=True, timeout=300)
    assert assembled.returncode == 0, assembled.stdout + assembled.stderr
    assert ": fit without" not in assembled.stdout and assembled.stdout.count("reused from") == 4
    bad = subprocess.run(cmd + ["--cross-fit-folds", "two"], text=True, capture_output=True, timeout=300)
    assert bad.returncode != 0 and "--cross-fit-folds two: expected fold numbers (1-based) or 'auto'" in bad.stderr


def test_pipeline_cross_fit_config(ml_tiny, split, tmp_path):
    cfg = tmp_path / "slist-oof.yaml"
    cfg.write_text("name: slist-oof\nkind: transition\ndataset: ml-latest-small\n"
                   "hparams: {l2: 20.0, window: 5, decay: 2.0, alpha: 0.2}\nexport: {k: 10, cross_fit: 2}\n")
    out = tmp_path / "teachers"
    ml_tiny.save(str(tmp_path / "data"))
    report = run_teacher_pipeline(str(tmp_path / "data"), out, teachers=[str(cfg)], progress=False, log=lambda *_: None)
    t = report["teachers"]["slist-oof"]
    assert t["export"]["cross_fit"] == 2 and "cross-fit slist-oof" in report["stage_seconds"]
    assert len(list((out / "exports" / ".slist-oof-folds").glob("fold-*.npz"))) == 2
    expected = cross_fit_lists(lambda s, f: ItemTransition.fit(s, name="slist-oof", **SLIST), split,
                               name="slist-oof", folds=2, k=10, log=lambda *_: None)
    off, val = list_parts(read_all(out / "shards").column("teacher.slist-oof.ids"))
    np.testing.assert_array_equal(val[off[0]:off[-1]].reshape(-1, 10), expected.ids)
    # the metrics are the full teacher's (fitted on every user), not a fold's
    full = ItemTransition.fit(split, name="x", **SLIST)
    assert t["metrics"]["valid"]["NDCG@10"] == pytest.approx(measure_teacher(full, split)["valid"]["NDCG@10"])


def test_pipeline_cross_fits_a_neural_teacher_with_the_full_ones_embeddings(ml_tiny, split, tmp_path):
    """A trained teacher cross-fits too (each fold trained with the held-out users out of its early-stopping
    evaluation); the export carries the full teacher's item embeddings beside the out-of-fold lists."""
    from prmkd_dist.teachers import load_teacher

    cfg = tmp_path / "idt-oof.yaml"
    cfg.write_text("name: idt-oof\nkind: id_transformer\ndataset: ml-latest-small\n"
                   "hparams: {dim: 16, num_layers: 1, num_heads: 2, max_len: 20}\n"
                   "train: {epochs: 1, eval_every: 1, patience: 0, seed: 0}\nexport: {k: 10, cross_fit: 2}\n")
    ml_tiny.save(str(tmp_path / "data"))
    out = tmp_path / "teachers"
    report = run_teacher_pipeline(str(tmp_path / "data"), out, teachers=[str(cfg)], progress=False, log=lambda *_: None)
    assert report["teachers"]["idt-oof"]["export"]["cross_fit"] == 2
    full = load_teacher(out / "models" / "idt-oof")
    _, item_ids, emb = read_teacher_embeddings(str(out / "exports" / "idt-oof" / "embeddings"),
                                               num_items=split.data.num_items)
    np.testing.assert_array_equal(item_ids, np.arange(split.data.num_items))
    np.testing.assert_allclose(emb, full.item_embeddings().detach().numpy(), rtol=1e-6, atol=1e-6)
    keys, _, starts, _ = example_index(split)
    with torch.no_grad():
        full_ids, _ = score_topk(full.eval(), keys, starts, split, 10, full.max_len, torch.device("cpu"))
    off, val = list_parts(read_all(out / "shards").column("teacher.idt-oof.ids"))
    oof_ids = val[off[0]:off[-1]].reshape(-1, 10)
    assert (oof_ids != full_ids).any(axis=1).mean() > 0.5  # the lists are the fold teachers', not the full one's


def test_cross_fit_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    for value in ("1", "true", "2.5"):
        bad.write_text(f"name: x\nkind: transition\ndataset: d\nexport: {{cross_fit: {value}}}\n")
        with pytest.raises(TeacherConfigError, match="bad.yaml: export.cross_fit must be an int >= 2"):
            load_teacher_config(bad)
    assert load_teacher_config("transition_slist_oof-games").export["cross_fit"] == 3


SOURCE_YAML = "name: slist\nkind: transition\ndataset: ml-latest-small\nhparams: {l2: 20.0, window: 5, decay: 2.0, alpha: 0.2}\n"
PUPIL_YAML = ("name: idt-oof\nkind: id_transformer\ndataset: ml-latest-small\n"
              "hparams: {dim: 16, num_layers: 1, num_heads: 2, max_len: 20}\n"
              "train: {epochs: 1, eval_every: 1, patience: 0, seed: 0, batch_size: 64}\n"
              "distill: {teacher: slist, temperature: 2.0, score_norm: std, packing: window}\n")


def test_pipeline_cross_fits_a_distilled_teacher_with_its_source_nested(ml_tiny, split, tmp_path, monkeypatch):
    """A teacher distilled from another cross-fits with the source refitted in each fold: fold f's pupil is exactly
    the one trained on the split without fold f's users from an SLIST fitted on that split too (never from the full
    SLIST, whose lists hold the held-out users' memorised targets)."""
    import prmkd_dist.teachers.export as export
    from prmkd_dist.teachers.pipeline import train_teacher

    (tmp_path / "slist.yaml").write_text(SOURCE_YAML + "export: {k: 10, max_history: 50}\n")
    (tmp_path / "idt-oof.yaml").write_text(PUPIL_YAML + "export: {k: 10, max_history: 50, cross_fit: 2}\n")
    ml_tiny.save(str(tmp_path / "data"))
    out = tmp_path / "teachers"
    real_export, source_rows = export.export_teacher_shards, {}

    def recording_export(teacher, sub, out_dir, *a, **kw):  # the fold sources' exports, read before the clean-up
        result = real_export(teacher, sub, out_dir, *a, **kw)
        if "-source" in str(out_dir):
            source_rows[Path(out_dir).parent.name] = ShardSet.open(str(out_dir)).num_rows
        return result

    monkeypatch.setattr(export, "export_teacher_shards", recording_export)
    report = run_teacher_pipeline(str(tmp_path / "data"), out, progress=False, log=lambda *_: None,
                                  teachers=[str(tmp_path / "idt-oof.yaml"), str(tmp_path / "slist.yaml")])
    assert list(report["teachers"]) == ["slist", "idt-oof"]  # the source first
    assert report["teachers"]["idt-oof"]["export"]["cross_fit"] == 2
    assert report["shards"]["teachers"] == ["slist", "idt-oof"]

    # fold 0 by hand: its own SLIST, its own export, the pupil trained from it
    fold_of = user_folds(split.data.num_users, 2, seed=0)
    sub = without_users(split, fold_of == 0)
    source_root = tmp_path / "by-hand"
    export_teacher_shards(ItemTransition.fit(sub, name="slist", **SLIST), sub, source_root / "slist", name="slist",
                          k=10, max_history=50, progress=False, embeddings=False)
    pupil = train_teacher(load_teacher_config(tmp_path / "idt-oof.yaml"), sub, exports_root=source_root,
                          work_dir=tmp_path / "run")
    keys, users, starts, _ = example_index(split)
    mine = fold_of[users] == 0
    with torch.no_grad():
        want, _ = score_topk(pupil.eval(), keys[mine], starts[mine], split, 10, pupil.max_len, torch.device("cpu"))
    off, val = list_parts(read_all(out / "shards").column("teacher.idt-oof.ids"))
    got = val[off[0]:off[-1]].reshape(-1, 10)[mine]
    np.testing.assert_array_equal(got, want)
    # each fold's scratch export is its own SLIST's, over the other users' examples only; removed once the fold's
    # lists are recorded
    assert sorted(source_rows) == [".idt-oof-fold-00-source", ".idt-oof-fold-01-source"]
    for f in (0, 1):
        assert source_rows[f".idt-oof-fold-{f:02d}-source"] == int((fold_of[users] != f).sum()) < len(keys)
    assert not list(out.glob("*/.idt-oof-fold-*"))


def test_cross_fit_of_a_distilled_teacher_needs_an_in_sample_source(ml_tiny, tmp_path):
    (tmp_path / "slist.yaml").write_text(SOURCE_YAML + "export: {k: 10, max_history: 50, cross_fit: 2}\n")
    (tmp_path / "idt-oof.yaml").write_text(PUPIL_YAML + "export: {k: 10, max_history: 50, cross_fit: 2}\n")
    ml_tiny.save(str(tmp_path / "data"))
    with pytest.raises(TeacherConfigError, match="idt-oof.yaml: export.cross_fit with distill: the source 'slist' must"):
        run_teacher_pipeline(str(tmp_path / "data"), tmp_path / "out", progress=False, log=lambda *_: None,
                             teachers=[str(tmp_path / "slist.yaml"), str(tmp_path / "idt-oof.yaml")])


def test_two_fold_worker_processes_share_the_pipeline_dir(ml_tiny, tmp_path):
    """`teachers pipeline --cross-fit-folds`: two real worker processes fit folds 1 and 2 of a distilled teacher (its
    source nested) into one --out at the same time; the pipeline run after them fits no fold again and its lists are
    those of a single pipeline run that fitted both folds itself."""
    import os
    import subprocess
    import sys

    (tmp_path / "slist.yaml").write_text(SOURCE_YAML + "export: {k: 10, max_history: 50}\n")
    (tmp_path / "idt-oof.yaml").write_text(PUPIL_YAML + "export: {k: 10, max_history: 50, cross_fit: 2}\n")
    ml_tiny.save(str(tmp_path / "data"))
    env = dict(os.environ)

    def pipeline(out, *extra):
        return [sys.executable, "-m", "prmkd_dist.cli", "teachers", "pipeline", "--dataset", str(tmp_path / "data"),
                "--out", str(out), "--teachers", str(tmp_path / "slist.yaml"), str(tmp_path / "idt-oof.yaml"),
                "--no-progress", "--threads", "1", *extra]  # one thread in every process: the same float sums

    shared = tmp_path / "shared"
    workers = [subprocess.Popen(pipeline(shared, "--cross-fit-folds", str(f)), env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for f in (1, 2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    for w, log in zip(workers, logs):
        assert w.returncode == 0, log
    assert "idt-oof: fold(s) 1 of 2 fitted here" in logs[0] and "idt-oof: fold(s) 2 of 2 fitted here" in logs[1]
    assert "fold 2/2: fit" not in logs[0] and "fold 1/2: fit" not in logs[1]  # each fitted its own fold only
    assert not (shared / "shards").exists() and not (shared / "models" / "idt-oof").exists()  # workers stop there
    # each worker removed its fold's scratch (source lists, checkpoints, kept teacher) once the fold was recorded
    assert not list(shared.glob("*/.idt-oof-fold-*")) and len(list(shared.glob("exports/.idt-oof-folds/fold-*"))) == 4

    single = subprocess.run(pipeline(tmp_path / "single"), env=env, text=True, capture_output=True, timeout=300)
    assert single.returncode == 0, single.stdout + single.stderr
    assembled = subprocess.run(pipeline(shared), env=env, text=True, capture_output=True, timeout=300)
    assert assembled.returncode == 0, assembled.stdout + assembled.stderr
    assert "idt-oof: fold 1/2 reused" in assembled.stdout and "idt-oof: fold 2/2 reused" in assembled.stdout
    assert ": fit without" not in assembled.stdout
    cols = ["example_key", "teacher.idt-oof.ids", "teacher.idt-oof.scores"]
    got, want = (read_all(root / "shards").select(cols) for root in (shared, tmp_path / "single"))
    assert got.num_rows == want.num_rows > 0
    assert got.equals(want)


def test_a_fold_training_cut_short_resumes_after_its_last_epoch(ml_tiny, tmp_path, interrupt_training, monkeypatch):
    """A fold teacher's training keeps its state after every epoch (the trainer's run.resume, in a scratch dir named
    by the config): the pipeline run after a kill in fold 1's second epoch continues that training, and its lists
    equal those of a pipeline that was never interrupted."""
    from ..conftest import TrainingInterrupted

    (tmp_path / "slist.yaml").write_text(SOURCE_YAML + "export: {k: 10, max_history: 50}\n")
    (tmp_path / "idt-oof.yaml").write_text(PUPIL_YAML.replace("epochs: 1", "epochs: 3")
                                           + "export: {k: 10, max_history: 50, cross_fit: 2}\n")
    ml_tiny.save(str(tmp_path / "data"))
    teachers = [str(tmp_path / "slist.yaml"), str(tmp_path / "idt-oof.yaml")]
    run = dict(progress=False, log=lambda *_: None, teachers=teachers)

    whole = tmp_path / "whole"
    run_teacher_pipeline(str(tmp_path / "data"), whole, **run)
    cut = tmp_path / "cut"
    interrupt_training("valid", 2)  # fold 1's second epoch
    with pytest.raises(TrainingInterrupted):
        run_teacher_pipeline(str(tmp_path / "data"), cut, **run)
    states = list((cut / "models").glob(".idt-oof-fold-00-*-run/resume.pt"))
    assert len(states) == 1 and torch.load(states[0], weights_only=False)["loop"]["epoch"] == 1
    interrupt_training(None)
    import prmkd_dist.train.trainer as trainer

    real, epochs = trainer.evaluate, []
    monkeypatch.setattr(trainer, "evaluate", lambda m, s, stage, **kw: (epochs.append(stage), real(m, s, stage, **kw))[1])
    run_teacher_pipeline(str(tmp_path / "data"), cut, **run)
    assert not states[0].exists()  # that training finished
    assert epochs.count("valid") == 2 + 3 + 3  # fold 1 from epoch 2 on, fold 2 and the full teacher whole
    cols = ["example_key", "teacher.idt-oof.ids", "teacher.idt-oof.scores"]
    assert read_all(cut / "shards").select(cols).equals(read_all(whole / "shards").select(cols))


def test_a_fold_listing_cut_short_lists_again_without_training(ml_tiny, tmp_path, monkeypatch):
    """A fold teacher is kept in its scratch dir once trained: a kill while it lists the fold's examples costs the
    listing, not the training (nor its source's refit); the lists then equal those of an uninterrupted run."""
    import prmkd_dist.teachers.export as export
    import prmkd_dist.train.trainer as trainer

    (tmp_path / "slist.yaml").write_text(SOURCE_YAML + "export: {k: 10, max_history: 50}\n")
    (tmp_path / "idt-oof.yaml").write_text(PUPIL_YAML.replace("epochs: 1", "epochs: 2")
                                           + "export: {k: 10, max_history: 50, cross_fit: 2}\n")
    ml_tiny.save(str(tmp_path / "data"))
    logs = []
    run = dict(progress=False, log=logs.append, teachers=[str(tmp_path / "slist.yaml"), str(tmp_path / "idt-oof.yaml")])
    whole = tmp_path / "whole"
    run_teacher_pipeline(str(tmp_path / "data"), whole, **run)

    real_topk = export.score_topk

    def killed(teacher, *a, **kw):  # the fold teacher's listing, not the sources' exports
        if getattr(teacher, "kind", None) == "id-transformer":
            raise KeyboardInterrupt("killed while listing")
        return real_topk(teacher, *a, **kw)

    monkeypatch.setattr(export, "score_topk", killed)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_teacher_pipeline(str(tmp_path / "data"), cut, **run)
    saved = list((cut / "models").glob(".idt-oof-fold-00-*-run/teacher/teacher.json"))
    assert len(saved) == 1 and not list((cut / "exports" / ".idt-oof-folds").glob("fold-*.json"))
    # the saved teacher is checked against the config as well as found by the dir's key: another config's is not taken
    from prmkd_dist.teachers.pipeline import _saved_fold_teacher
    run_dir, fp = saved[0].parent.parent, ml_tiny.fingerprint
    assert _saved_fold_teacher(load_teacher_config(tmp_path / "idt-oof.yaml"), run_dir, fp) is not None
    (tmp_path / "other.yaml").write_text((tmp_path / "idt-oof.yaml").read_text().replace("epochs: 2", "epochs: 3"))
    assert _saved_fold_teacher(load_teacher_config(tmp_path / "other.yaml"), run_dir, fp) is None
    monkeypatch.setattr(export, "score_topk", real_topk)
    real_eval, epochs = trainer.evaluate, []
    monkeypatch.setattr(trainer, "evaluate", lambda m, s, stage, **kw: (epochs.append(stage), real_eval(m, s, stage, **kw))[1])
    logs.clear()
    run_teacher_pipeline(str(tmp_path / "data"), cut, **run)
    assert epochs.count("valid") == 2 + 2  # fold 2 and the full teacher; fold 1 is not trained again
    assert not list(cut.glob("*/.idt-oof-fold-*"))  # every fold recorded: the fold scratch is gone
    assert any("fold 1's trained teacher reused" in line for line in logs)
    assert not any("the fold's source slist" in line and "fold 1" in line for line in logs)
    assert sum("the fold's source slist" in line for line in logs) == 1  # fold 2's source only
    cols = ["example_key", "teacher.idt-oof.ids", "teacher.idt-oof.scores"]
    assert read_all(cut / "shards").select(cols).equals(read_all(whole / "shards").select(cols))

