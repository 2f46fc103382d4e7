"""Teachers: the ``Teacher`` interface (plug in your own model by subclassing it, see ``base``) and the
built-in heterogeneous teachers:

- ``EASE``: closed-form item-item linear autoencoder (Steck 2019);
- ``ItemTransition``: closed-form item -> next-item ridge regression over a decayed recent window (SLIT of SLIST);
- ``IDTransformerTeacher``: a large ID-based SASRec (several times the student's width and depth);
- ``UniSRecTeacher``: text-based (frozen MiniLM item-text embeddings + MoE adaptor + transformer);
- ``StudentTeacher``: a trained sequential student checkpoint (born-again distillation, a neural second teacher).

``load_teacher(dir, fingerprint=data.fingerprint)`` rebuilds any saved teacher.
"""
from prmkd_dist.teachers.base import (
    TEACHER_REGISTRY,
    FingerprintMismatchError,
    SequentialModelTeacher,
    Teacher,
    TeacherError,
    load_teacher,
    register_teacher,
)
from prmkd_dist.teachers.ease import EASE
from prmkd_dist.teachers.id_transformer import IDTransformerTeacher
from prmkd_dist.teachers.student import StudentTeacher
from prmkd_dist.teachers.transition import ItemTransition
from prmkd_dist.teachers.unisrec import UniSRecTeacher

__all__ = [
    "TEACHER_REGISTRY",
    "EASE",
    "FingerprintMismatchError",
    "IDTransformerTeacher",
    "ItemTransition",
    "SequentialModelTeacher",
    "StudentTeacher",
    "Teacher",
    "TeacherError",
    "UniSRecTeacher",
    "load_teacher",
    "register_teacher",
]
