"""A trained student checkpoint as a teacher (`StudentTeacher`, `prmkd-dist teachers from-student`): it scores
exactly as the student, evaluates to the student's own validation metrics, survives save/load, and exports
valid shards; what cannot be a teacher is refused with a clear error."""
from __future__ import annotations

import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import left_pad
from prmkd_dist.data.shards import ShardSet, validate_shards
from prmkd_dist.teachers import StudentTeacher, TeacherError, load_teacher
from prmkd_dist.teachers.export import export_teacher_shards
from prmkd_dist.teachers.pipeline import measure_teacher
from prmkd_dist.train.config import config_from_dict
from prmkd_dist.train.trainer import build_model, save_checkpoint, train

MAX_LEN = 10
HPARAMS = {"sasrec": {"dim": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.1},
           "gru4rec": {"dim": 16, "num_layers": 1, "dropout": 0.1},
           "caser": {"dim": 16, "num_h_filters": 4, "num_v_filters": 2}}


def student_cfg(name: str, out_dir, **optim):
    return config_from_dict({
        "data": {"dataset": "ml-latest-small", "max_len": MAX_LEN, "windows": "last"},
        "model": {"name": name, "hparams": HPARAMS[name]},
        "optim": {"epochs": 1, "batch_size": 64, "lr": 5e-3, "patience": 0, **optim},
        "run": {"seed": 0, "out_dir": str(out_dir), "progress": False, "num_threads": 2},
    })


@pytest.fixture(scope="module")
def trained(ml_small_split, tmp_path_factory):
    """A SASRec student trained for one epoch by the real trainer; its checkpoint directory."""
    return train(student_cfg("sasrec", tmp_path_factory.mktemp("sasrec")), ml_small_split)


def histories(split, n: int = 48, length: int = 200) -> torch.Tensor:
    users = split.eval_users("valid")[:n]
    return torch.from_numpy(left_pad([split.history(u, "valid") for u in users], length))


def test_scores_and_metrics_are_the_students(trained, ml_small_split, tmp_path):
    from prmkd_dist.train.trainer import load_checkpoint

    student, _, meta = load_checkpoint(trained.checkpoint_dir)
    teacher = StudentTeacher.from_checkpoint(trained.checkpoint_dir, name="born-again")
    assert teacher.name == "born-again" and teacher.max_len == MAX_LEN
    assert teacher.info["epoch"] == meta["epoch"] and teacher.info["valid"] == meta["valid"]
    h = histories(ml_small_split)  # longer than the student's window: the teacher keeps the last MAX_LEN items
    with torch.no_grad():
        torch.testing.assert_close(teacher.score(h), student.score(h[:, -MAX_LEN:]), rtol=0, atol=0)
    m = measure_teacher(teacher, ml_small_split, cost_users=64)
    assert m["valid"]["NDCG@10"] == pytest.approx(trained.valid["NDCG@10"], abs=1e-12)
    assert m["test"]["NDCG@20"] == pytest.approx(trained.test["NDCG@20"], abs=1e-12)
    assert m["params"] == sum(t.numel() for t in student.state_dict().values())
    # save / load: the same scores, the same config and provenance
    teacher.save(tmp_path / "t")
    loaded = load_teacher(tmp_path / "t", fingerprint=ml_small_split.data.fingerprint)
    assert isinstance(loaded, StudentTeacher) and loaded.config() == teacher.config() and loaded.info == teacher.info
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(h), teacher.score(h), rtol=0, atol=0)
    torch.testing.assert_close(loaded.item_embeddings(), student.output_weight(), rtol=0, atol=0)


def test_top_k_lists_are_valid_and_export_validates(trained, ml_small_split, tmp_path):
    teacher = StudentTeacher.from_checkpoint(trained.checkpoint_dir)
    h = histories(ml_small_split)
    ids, scores = teacher.topk(h, 20)
    assert torch.all(scores[:, :-1] >= scores[:, 1:]) and not bool((ids == PAD_ID).any())
    for row in range(h.shape[0]):
        seen = set(h[row][h[row] != PAD_ID].tolist())
        assert len(set(ids[row].tolist())) == 20 and not seen & set(ids[row].tolist())
    report = export_teacher_shards(teacher, ml_small_split, tmp_path / "shards", k=20, progress=False)
    validate_shards(str(tmp_path / "shards"), item_fingerprint=ml_small_split.data.fingerprint)
    assert ShardSet.open(str(tmp_path / "shards")).meta.teachers[0].name == "student-sasrec"
    assert report["embeddings"] is not None


@pytest.mark.parametrize("name", ["gru4rec", "caser"])
def test_every_sequential_student_wraps(name, ml_small_split, tmp_path):
    cfg = student_cfg(name, tmp_path / "run")
    torch.manual_seed(1)
    model = build_model(cfg, ml_small_split.data.num_items).eval()
    save_checkpoint(tmp_path / "ckpt", model, cfg, ml_small_split, 1, {"NDCG@10": 0.0})
    teacher = StudentTeacher.from_checkpoint(tmp_path / "ckpt")
    assert teacher.config()["model"] == name
    h = histories(ml_small_split, n=8)
    with torch.no_grad():
        torch.testing.assert_close(teacher.score(h), model.score(h[:, -teacher.max_len:]), rtol=0, atol=0)


def test_cli_from_student_then_refusals(trained, ml_small, tmp_path, capsys):
    from prmkd_dist.cli import main

    ml_small.save(str(tmp_path / "data"))
    rc = main(["teachers", "from-student", "--checkpoint", trained.checkpoint_dir, "--out", str(tmp_path / "t"),
               "--name", "sasrec-teacher", "--dataset", str(tmp_path / "data"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "sasrec-teacher (student: sasrec" in out and "ms per 1,000 users" in out
    assert load_teacher(tmp_path / "t").name == "sasrec-teacher"
    # not a checkpoint: one line naming what is missing, exit code 2
    (tmp_path / "empty").mkdir()
    rc = main(["teachers", "from-student", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    assert rc == 2 and "not a student checkpoint (missing model.pt)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_user_scoring_students_are_refused(ml_small):
    with pytest.raises(TeacherError, match="scores users, not histories"):
        StudentTeacher(ml_small.num_items, ml_small.fingerprint, model="deepfm", hparams={})
    with pytest.raises(TeacherError, match="unknown hyper-parameter 'width'"):
        StudentTeacher(ml_small.num_items, ml_small.fingerprint, model="sasrec", hparams={"width": 3})
