"""A trained student as a teacher: any sequential student checkpoint (SASRec, GRU4Rec, Caser) wrapped in the
``Teacher`` interface, so it exports top-K shards and item embeddings like every other teacher.

Two uses: a neural sequence model as a second teacher of another kind beside a closed-form one (SLIST), and
born-again distillation (a distilled student teaching the next student). Data-bound students (DeepFM, DCN-v2,
LightGCN) score users, not histories, so they cannot be wrapped: the constructor refuses them.
"""
from __future__ import annotations

from pathlib import Path

from prmkd_dist.teachers.base import SequentialModelTeacher, TeacherError, register_teacher


@register_teacher
class StudentTeacher(SequentialModelTeacher):
    """``build_student(model, num_items, **hparams)`` as a teacher; the weights are the student's own."""

    kind = "student"

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None, model: str = "sasrec",
                 hparams: dict | None = None):
        from prmkd_dist.models import STUDENTS, StudentConfigError, build_student

        super().__init__(num_items, item_fingerprint, name)
        if getattr(STUDENTS.get(model), "needs_users", False):
            raise TeacherError(f"student {model!r} scores users, not histories: it cannot be a teacher")
        try:
            self.model = build_student(model, num_items, **dict(hparams or {}))
        except StudentConfigError as e:
            raise TeacherError(f"student teacher: {e}") from e
        self.model_name = model

    def config(self) -> dict:
        return {"model": self.model_name, "hparams": dict(self.model.hparams)}

    @classmethod
    def from_checkpoint(cls, directory: str | Path, name: str | None = None) -> "StudentTeacher":
        """Wrap the student saved in ``directory`` (``save_checkpoint``: model.pt, config.yaml, meta.json).
        ``info`` records where it came from and its validation metrics at the saved epoch."""
        from prmkd_dist.train.trainer import CheckpointError, load_checkpoint

        try:
            student, cfg, meta = load_checkpoint(directory)
        except (CheckpointError, FileNotFoundError) as e:
            raise TeacherError(str(e)) from e
        teacher = cls(int(meta["num_items"]), meta["item_fingerprint"], name or f"student-{cfg.model.name}",
                      model=cfg.model.name, hparams=student.hparams)
        teacher.model.load_state_dict(student.state_dict())
        teacher.info = {"checkpoint": str(Path(directory).resolve()), "dataset": meta.get("dataset"),
                        "epoch": meta.get("epoch"), "valid": meta.get("valid")}
        return teacher.eval()
