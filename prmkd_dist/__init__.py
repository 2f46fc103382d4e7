"""prmkd-dist: distil several large pre-trained recommenders into one small, fast student.

Id conventions used everywhere (files, tensors, losses):
- items are contiguous ids 0..C-1 and these ids ARE the columns of the student's logits;
- users are contiguous ids 0..U-1;
- PAD_ID = -1 is the reserved padding / empty-slot id (left padding of histories, empty teacher
  slots, "no target"); it is never a real item.
"""
from prmkd_dist.constants import PAD_ID

__version__ = "0.1.0"

# Public names re-exported lazily (PEP 562), so that `import prmkd_dist` (e.g. the CLI's start) does not
# import torch; the loss backends themselves are imported even later, by the dispatcher.
_LAZY = {
    "kd_loss": "prmkd_dist.distill.loss",
    "kd_loss_linear": "prmkd_dist.distill.loss",
    "available_backends": "prmkd_dist.distill.loss",
    "teacher_weights": "prmkd_dist.distill.weights",
    "importance_weights": "prmkd_dist.distill.weights",
}

__all__ = ["PAD_ID", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'prmkd_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
