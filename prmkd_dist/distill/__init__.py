"""Distillation: the multi-teacher loss (public API + its one backend dispatcher), the reference backend,
and the weight helpers. See :mod:`prmkd_dist.distill.loss` for the backend contract.

Importing this package is cheap: Triton kernels and the C++ extension are imported lazily, the first
time the dispatcher needs them.
"""
from prmkd_dist.distill.loss import available_backends, kd_loss, kd_loss_linear, last_resolution, resolve_backend
from prmkd_dist.distill.weights import importance_weights, teacher_weights

__all__ = [
    "kd_loss",
    "kd_loss_linear",
    "teacher_weights",
    "importance_weights",
    "available_backends",
    "resolve_backend",
    "last_resolution",
]
