"""Students (sequential, feature-interaction, graph), their registry, and the non-neural baselines.

``build_student("sasrec", num_items, dim=64, ...)`` is the one way configs turn into models; every
student records its constructor arguments in ``model.hparams`` and its registry name in
``model.registry_name``, so ``build_student(m.registry_name, m.num_items, **m.hparams)`` rebuilds it
(checkpoints rely on this). Data-bound students (DeepFM, DCN-v2, LightGCN: ``needs_users``) also take
hyper-parameters derived from the data (``num_users``, ...; ``models/features.py``).
"""
from __future__ import annotations

import inspect
import types
import typing

from prmkd_dist.models.base import SequentialStudent
from prmkd_dist.models.baselines import ItemKNN, Popularity
from prmkd_dist.models.caser import Caser
from prmkd_dist.models.dcn import DCNv2
from prmkd_dist.models.deepfm import DeepFM
from prmkd_dist.models.gru4rec import GRU4Rec
from prmkd_dist.models.lightgcn import LightGCN
from prmkd_dist.models.sasrec import SASRec

STUDENTS: dict[str, type] = {cls.registry_name: cls for cls in (SASRec, GRU4Rec, Caser, DeepFM, DCNv2, LightGCN)}

# constructor arguments that are not hyper-parameters (given separately)
_NOT_HPARAMS = ("self", "num_items", "device")


class StudentConfigError(ValueError):
    """An unknown student name, an unknown hyper-parameter, or one of the wrong type."""


def student_hparams(name: str) -> dict[str, inspect.Parameter]:
    """The accepted hyper-parameters of student ``name`` (constructor arguments minus num_items/device)."""
    if name not in STUDENTS:
        raise StudentConfigError(f"unknown student {name!r}; accepted: {sorted(STUDENTS)}")
    sig = inspect.signature(STUDENTS[name].__init__)
    return {k: p for k, p in sig.parameters.items() if k not in _NOT_HPARAMS}


def _type_ok(value, hint) -> bool:
    """isinstance against the simple hints used by the students (int, float, bool, str, X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint this checker does not model: the constructor validates it


def build_student(name: str, num_items: int, device=None, **hparams) -> SequentialStudent:
    """Build the student registered as ``name`` ("sasrec", "gru4rec", "caser") for a catalog of
    ``num_items`` items. Unknown names, unknown hyper-parameters and values of the wrong type raise
    StudentConfigError (a ValueError) naming the key and what is accepted."""
    accepted = student_hparams(name)
    cls = STUDENTS[name]
    hints = typing.get_type_hints(cls.__init__)
    for key, value in hparams.items():
        if key not in accepted:
            raise StudentConfigError(
                f"student {name!r}: unknown hyper-parameter {key!r}; accepted: {sorted(accepted)}")
        if key in hints and not _type_ok(value, hints[key]):
            raise StudentConfigError(
                f"student {name!r}: hyper-parameter {key!r} must be {hints[key]}, got {value!r} "
                f"({type(value).__name__})")
    return cls(num_items, device=device, **hparams)


__all__ = [
    "SequentialStudent", "SASRec", "GRU4Rec", "Caser", "DeepFM", "DCNv2", "LightGCN", "Popularity", "ItemKNN",
    "STUDENTS", "StudentConfigError", "build_student", "student_hparams",
]
