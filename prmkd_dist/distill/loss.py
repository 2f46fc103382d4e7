"""The public distillation loss: ``kd_loss`` / ``kd_loss_linear``, input validation and the one backend dispatcher.

The definitions (cross-entropy, per-teacher KL at temperature tau, importance-weighted ranking term,
reductions) are the contract in /work/shared/specs/kd-loss.md; :mod:`prmkd_dist.distill.reference`
implements them in plain PyTorch. Every other backend must match the reference, gradients included.

Backend contract
----------------
The public functions validate inputs (unless ``check_inputs=False``), normalise dtypes and then call ONE
backend function which returns the per-row loss ``l_b`` as a float32 tensor [B] with autograd; the
dispatcher applies the reduction (mean/sum/none)::

    kd_loss_rows(logits, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                 temperature, lambda_ce, lambda_kd, lambda_rank) -> Tensor[B] float32
    kd_loss_linear_rows(user_emb, item_emb, item_bias, target, teacher_ids, teacher_scores,
                        teacher_weights, rank_weights, temperature, lambda_ce, lambda_kd, lambda_rank) -> Tensor[B] float32

with logits [B,C] float32/bfloat16 (contiguous), target int64 [B], teacher_ids int64 [B,T,K],
teacher_scores float32 [B,T,K], teacher_weights float32 [B,T], rank_weights float32 [B,T,K] or None
(None means the ranking term is 0), item_bias [C] or None. T = 0 (no teachers: pure cross-entropy) and
K = 0 must be supported by the reference and dispatcher (the trainer uses kd_loss_linear with T=0 for
plain full-softmax CE). Gradients flow to logits / user_emb / item_emb / item_bias only.

Precisions of the contract, as the dispatcher guarantees them to every backend:

- all tensors are contiguous and on one device; ``temperature`` and the lambdas are Python floats;
- ``user_emb`` and ``item_emb`` share one dtype (float32 or bfloat16); ``item_bias`` has that dtype too;
- ``rank_weights`` is passed as None whenever ``lambda_rank == 0`` (the term is 0 then anyway);
- T = 0 / K = 0 arrive as empty tensors of shapes [B,0,K] / [B,T,0]; backends handle them
  (the result is then the cross-entropy alone);
- float64 inputs (used by ``gradcheck``) are only ever sent to the reference: "auto" resolves to it and
  an explicitly requested other backend raises RuntimeError;
- the backend returns float32 [B] (float64 for the reference on float64 inputs).

Backend selection (:func:`resolve_backend`, the only place that decides): "auto" picks Triton for CUDA
tensors, the C++ extension for CPU tensors, and the reference otherwise, and records why each
unavailable backend was passed over (``last_resolution()``, and an INFO log line the first time).
The same function decides for the local part of the catalog-parallel loss (``op="catalog_local"``:
``catalog_local_stats`` / ``catalog_local_grad``, see :mod:`prmkd_dist.parallel.catalog_loss`) by the same
rules: Triton kernels (``prmkd_dist.kernels.kd_catalog_local``) for CUDA tensors, the C++ op for CPU tensors,
the chunked PyTorch reference otherwise.

Input checks
------------
``check_inputs=True`` (the default; the spec's "documented flag") scans the data: ids outside [-1, C),
targets outside [-1, C), NaN/inf in any float input (including scores on empty slots, which must still be
finite), negative teacher / rank weights. Each raises ValueError naming the argument and, for ids and
values, the first offending position. These scans read every input once (and synchronise with a GPU), so
a trusted pipeline may pass ``check_inputs=False``. Shape, dtype, device and hyper-parameter checks cost
nothing and are always done.
"""
from __future__ import annotations

import os

import functools
import importlib
import logging
import types
from typing import Any, NamedTuple

import torch
from torch import Tensor

from prmkd_dist.distill import reference

__all__ = [
    "kd_loss",
    "kd_loss_linear",
    "resolve_backend",
    "available_backends",
    "last_resolution",
    "BACKENDS",
    "REDUCTIONS",
    "OPS",
]

log = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "cpp")
# what a backend module must provide for each op resolve_backend decides on
OPS = {
    "loss": ("kd_loss_rows", "kd_loss_linear_rows"),
    "catalog_local": ("catalog_local_stats", "catalog_local_grad"),
}
REDUCTIONS = ("mean", "sum", "none")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------- validation
def _position(mask: Tensor) -> tuple[int, ...]:
    """Index of the first True element of ``mask`` (row-major)."""
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def _fmt(pos: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in pos) + "]"


def check_finite(name: str, x: Tensor | None) -> None:
    """Raise ValueError if ``x`` holds a NaN or inf, naming ``name`` and the first position."""
    if x is None or x.numel() == 0:
        return
    if not x.is_floating_point():
        return
    # fast path, one reduction pass without a mask: NaN propagates into min/max and +-inf lands at an end
    lo, hi = torch.aminmax(x)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        pos = _position(bad)
        raise ValueError(f"{name}{_fmt(pos)} = {x[pos].item()}: every value must be finite (no NaN/inf)")


def check_non_negative(name: str, x: Tensor | None) -> None:
    """Raise ValueError if ``x`` holds a negative value, naming ``name`` and the first position."""
    if x is None or x.numel() == 0:
        return
    if not bool(torch.amin(x) < 0):  # fast path (a NaN is check_finite's to report)
        return
    bad = x < 0
    if bool(bad.any()):
        pos = _position(bad)
        raise ValueError(f"{name}{_fmt(pos)} = {x[pos].item()}: weights must be >= 0")


def check_ids(name: str, ids: Tensor, num_items: int | None) -> None:
    """Raise ValueError if an id is < -1 or >= ``num_items`` (no upper bound when None)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)  # fast path: one reduction pass, no mask
    if int(lo) >= -1 and (num_items is None or int(hi) < num_items):
        return
    bad = ids < -1
    if num_items is not None:
        bad = bad | (ids >= num_items)
    if bool(bad.any()):
        pos = _position(bad)
        expected = f"[-1, {num_items})" if num_items is not None else ">= -1"
        raise ValueError(f"{name}{_fmt(pos)} = {int(ids[pos])}: ids must be in {expected} (-1 = empty)")


def check_teacher_shapes(teacher_ids: Tensor, teacher_scores: Tensor, batch: int | None = None) -> None:
    """Shape/dtype checks shared by the loss and the weight helpers: ids [B,T,K] integer, scores same shape float."""
    if teacher_ids.dim() != 3:
        raise ValueError(f"teacher_ids must be [B, T, K], got shape {tuple(teacher_ids.shape)}")
    if teacher_ids.dtype not in _INDEX_DTYPES:
        raise ValueError(f"teacher_ids must be int64 (or int32), got {teacher_ids.dtype}")
    if batch is not None and teacher_ids.shape[0] != batch:
        raise ValueError(f"teacher_ids has batch size {teacher_ids.shape[0]}, expected {batch}")
    if teacher_scores.shape != teacher_ids.shape:
        raise ValueError(f"teacher_scores must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
                         f"got {tuple(teacher_scores.shape)}")
    if teacher_scores.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"teacher_scores must be a float tensor, got {teacher_scores.dtype}")
    if teacher_scores.device != teacher_ids.device:
        raise ValueError(f"teacher_scores is on {teacher_scores.device}, teacher_ids on {teacher_ids.device}")


def check_hyperparameters(temperature: float, lambda_ce: float, lambda_kd: float, lambda_rank: float, reduction: str) -> None:
    for name, v in (("temperature", temperature), ("lambda_ce", lambda_ce), ("lambda_kd", lambda_kd),
                    ("lambda_rank", lambda_rank)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_loss_inputs(
    num_items: int,
    batch: int,
    device: torch.device,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None,
    check_inputs: bool,
    allow_empty: bool = False,
) -> None:
    """Checks of the arguments kd_loss and kd_loss_linear share (everything but the student's tensors).
    ``allow_empty``: B = 0 is fine (a rank's share of a data-parallel batch may be empty)."""
    if batch < 1 and not allow_empty:
        raise ValueError("the batch is empty (B = 0): the loss of no rows is undefined")
    if num_items < 1:
        raise ValueError("the catalog is empty (C = 0)")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must be [B] = [{batch}], got shape {tuple(target.shape)}")
    if target.dtype not in _INDEX_DTYPES:
        raise ValueError(f"target must be int64 (or int32), got {target.dtype}")
    check_teacher_shapes(teacher_ids, teacher_scores, batch)
    n_teachers = teacher_ids.shape[1]
    if teacher_weights.shape != (batch, n_teachers):
        raise ValueError(f"teacher_weights must be [B, T] = [{batch}, {n_teachers}], got {tuple(teacher_weights.shape)}")
    if teacher_weights.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"teacher_weights must be a float tensor, got {teacher_weights.dtype}")
    if rank_weights is not None:
        if rank_weights.shape != teacher_ids.shape:
            raise ValueError(f"rank_weights must have the shape of teacher_ids {tuple(teacher_ids.shape)}, "
                             f"got {tuple(rank_weights.shape)}")
        if rank_weights.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"rank_weights must be a float tensor, got {rank_weights.dtype}")
    for name, x in (("target", target), ("teacher_ids", teacher_ids), ("teacher_scores", teacher_scores),
                    ("teacher_weights", teacher_weights), ("rank_weights", rank_weights)):
        if x is not None and x.device != device:
            raise ValueError(f"{name} is on {x.device}, the student's tensors on {device}")
    if not check_inputs:
        return
    check_ids("target", target, num_items)
    check_ids("teacher_ids", teacher_ids, num_items)
    check_finite("teacher_scores", teacher_scores)
    check_finite("teacher_weights", teacher_weights)
    check_non_negative("teacher_weights", teacher_weights)
    check_finite("rank_weights", rank_weights)
    check_non_negative("rank_weights", rank_weights)


def normalise_teacher_inputs(
    target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor, teacher_weights: Tensor,
    rank_weights: Tensor | None, lambda_rank: float, float_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The contract's dtypes: int64 ids, ``float_dtype`` (float32, or float64 for gradcheck) teacher tensors;
    everything detached (teacher inputs are constants) and contiguous."""
    def flt(x: Tensor) -> Tensor:
        return x.detach().to(float_dtype).contiguous()

    rank = flt(rank_weights) if (rank_weights is not None and lambda_rank != 0.0) else None
    return (target.to(torch.int64).contiguous(), teacher_ids.to(torch.int64).contiguous(),
            flt(teacher_scores), flt(teacher_weights), rank)


def reduce_rows(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.mean()


# --------------------------------------------------------------------------------------------- dispatcher
class Resolution(NamedTuple):
    """The outcome of one backend resolution: the backend chosen, and why (including what was passed over)."""

    name: str
    module: Any
    reason: str


_last: Resolution | None = None
_logged: set[tuple[str, str, str, str]] = set()


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> tuple[Any | None, str]:
    """Import backend ``name`` once per process: (module exposing the functions of its ops (``OPS``), "") or
    (None, why it is unavailable). The device-independent part of availability."""
    if name == "reference":
        return reference, ""
    if name == "cpp":
        try:
            mod = importlib.import_module("prmkd_dist.distill.cpp_backend")
        except ImportError as exc:  # not built / not installed: an expected configuration
            return None, f"cpp: prmkd_dist.distill.cpp_backend failed to import ({type(exc).__name__}: {exc})"
        except Exception as exc:  # noqa: BLE001 - a broken backend is unavailable too, but said loudly
            log.warning("cpp backend is broken, using another: %s: %s", type(exc).__name__, exc)
            return None, f"cpp: prmkd_dist.distill.cpp_backend raised on import ({type(exc).__name__}: {exc})"
        ok, why = mod.available()
        if not ok:
            return None, f"cpp: {why}"
        return mod, ""
    if name == "triton":
        try:
            rows = importlib.import_module("prmkd_dist.kernels.kd_loss")
            linear = importlib.import_module("prmkd_dist.kernels.kd_loss_linear")
            catalog = importlib.import_module("prmkd_dist.kernels.kd_catalog_local")
        except ImportError as exc:
            return None, f"triton: kernels failed to import ({type(exc).__name__}: {exc})"
        except Exception as exc:  # noqa: BLE001
            log.warning("triton backend is broken, using another: %s: %s", type(exc).__name__, exc)
            return None, f"triton: kernels raised on import ({type(exc).__name__}: {exc})"
        # the Triton ops live in one module each; present them as one backend namespace
        mod = types.SimpleNamespace(kd_loss_rows=rows.kd_loss_rows, kd_loss_linear_rows=linear.kd_loss_linear_rows,
                                    catalog_local_stats=catalog.catalog_local_stats,
                                    catalog_local_grad=catalog.catalog_local_grad,
                                    __name__="prmkd_dist.kernels.kd_loss[+_linear, kd_catalog_local]")
        return mod, ""
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")


def _unavailable_on(name: str, device: torch.device, dtype: torch.dtype | None, explicit: bool = False) -> str:
    """Why backend ``name`` cannot serve tensors on ``device`` of ``dtype`` ("" if it can), given it imported.

    Triton serves CPU tensors only through its interpreter (TRITON_INTERPRET=1), and only when asked for
    by name: that is how the kernels are tested without a GPU, never a speed choice for "auto"."""
    if dtype == torch.float64 and name != "reference":
        return f"{name}: float64 inputs are computed by the reference only"
    if name == "triton" and device.type != "cuda":
        if explicit and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return ""
        return f"triton: needs CUDA tensors (or TRITON_INTERPRET=1 and backend='triton'), got {device.type}"
    if name == "cpp" and device.type != "cpu":
        return f"cpp: serves CPU tensors only, got {device.type}"
    return ""


def _lacks_op(name: str, mod: Any, op: str) -> str:
    """Why backend ``name`` (imported as ``mod``) has no implementation of ``op`` ("" if it has one)."""
    missing = [fn for fn in OPS[op] if not hasattr(mod, fn)]
    return f"{name}: does not implement {op} ({', '.join(missing)})" if missing else ""


def resolve_backend(requested: str, device: torch.device | str, dtype: torch.dtype | None = None,
                    op: str = "loss") -> Resolution:
    """Choose the backend for tensors on ``device`` (of ``dtype``, when given): the one place that decides.

    ``requested`` is "auto", "reference", "triton" or "cpp". "auto" tries triton (CUDA tensors), then cpp
    (CPU tensors), then falls back to the reference; the returned ``reason`` says why each skipped backend
    was skipped (e.g. "cpp: extension not built (ImportError ...)"). An explicitly requested backend that
    cannot serve these tensors raises RuntimeError with the reason. ``op`` names what is needed (a key of
    ``OPS``): "loss" (``kd_loss_rows`` and ``kd_loss_linear_rows``) or "catalog_local" (the local part of the
    catalog-parallel loss); a backend without it is unavailable for that op. Returns (name, module, reason)
    where ``module`` has the functions of ``OPS[op]``."""
    global _last
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    device = torch.device(device)
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
        # the device/dtype check first: it needs no import (triton's import alone is slow)
        why = _unavailable_on(requested, device, dtype, explicit=True)
        mod = None
        if not why:
            mod, why = _probe(requested)
        if not why:
            why = _lacks_op(requested, mod, op)
        if why:
            raise RuntimeError(f"backend {requested!r} was requested but is unavailable: {why}")
        res = Resolution(requested, mod, f"{requested}: requested explicitly")
    else:
        skipped = []
        res = None
        for name in ("triton", "cpp"):
            why = _unavailable_on(name, device, dtype)
            if not why:
                mod, why = _probe(name)
                if not why:
                    why = _lacks_op(name, mod, op)
                if not why:
                    res = Resolution(name, mod, f"auto -> {name}" + (f" (skipped {'; '.join(skipped)})" if skipped else ""))
                    break
            skipped.append(why)
        if res is None:
            res = Resolution("reference", reference, "auto -> reference (" + "; ".join(skipped) + ")")
    _last = res
    key = (requested, device.type, res.name, op)
    if key not in _logged:
        _logged.add(key)
        log.info("%s backend for %s tensors: %s", "kd_loss" if op == "loss" else op, device.type, res.reason)
    return res


def last_resolution() -> Resolution | None:
    """The most recent backend resolution of this process (name, module, reason), or None before the first."""
    return _last


def available_backends(device: torch.device | str = "cpu", op: str = "loss") -> dict[str, tuple[bool, str]]:
    """For each backend, whether it can serve ``op`` (a key of ``OPS``) on float32 tensors on ``device`` and,
    if not, why."""
    if op not in OPS:
        raise ValueError(f"op must be one of {tuple(OPS)}, got {op!r}")
    device = torch.device(device)
    out = {}
    for name in BACKENDS:
        why = _unavailable_on(name, device, None)
        if not why:
            mod, why = _probe(name)
            why = why or _lacks_op(name, mod, op)
        out[name] = (not why, why)
    return out


# --------------------------------------------------------------------------------------------- public API
def kd_loss(
    logits: Tensor,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None = None,
    *,
    temperature: float = 1.0,
    lambda_ce: float = 1.0,
    lambda_kd: float = 1.0,
    lambda_rank: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_inputs: bool = True,
) -> Tensor:
    """Multi-teacher distillation loss of student ``logits`` [B, C] (see the spec and the module docstring).

    l_b = lambda_ce * CE_b + lambda_kd * tau^2 * sum_t w_bt KL_bt + lambda_rank * sum_t w_bt R_bt.
    ``logits`` may be float32, bfloat16 (computed in float32) or float64 (reference only). ``target`` -1
    skips the CE of that row; ``teacher_ids`` -1 marks an empty slot. Returns a scalar, or [B] for
    ``reduction="none"``, in float32 (float64 for float64 logits); gradients flow to ``logits`` only.
    ``check_inputs=False`` skips the data scans (ids range, NaN/inf, negative weights) for speed."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [B, C] tensor, got {getattr(logits, 'shape', type(logits))}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16 or float64, got {logits.dtype}")
    check_hyperparameters(temperature, lambda_ce, lambda_kd, lambda_rank, reduction)
    batch, num_items = logits.shape
    check_loss_inputs(num_items, batch, logits.device, target, teacher_ids, teacher_scores, teacher_weights,
                  rank_weights, check_inputs)
    if check_inputs:
        check_finite("logits", logits)
    fdt = reference.compute_dtype(logits.dtype)
    tgt, ids, scores, tw, rw = normalise_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights,
                                                         rank_weights, lambda_rank, fdt)
    res = resolve_backend(backend, logits.device, logits.dtype)
    rows = res.module.kd_loss_rows(logits.contiguous(), tgt, ids, scores, tw, rw, float(temperature),
                                   float(lambda_ce), float(lambda_kd), float(lambda_rank))
    return reduce_rows(rows, reduction)


def kd_loss_linear(
    user_emb: Tensor,
    item_emb: Tensor,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None = None,
    *,
    item_bias: Tensor | None = None,
    temperature: float = 1.0,
    lambda_ce: float = 1.0,
    lambda_kd: float = 1.0,
    lambda_rank: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    check_inputs: bool = True,
) -> Tensor:
    """``kd_loss`` on ``logits = user_emb @ item_emb.T (+ item_bias)`` without materialising [B, C] (in the
    fused backends; the reference does materialise it).

    ``user_emb`` [B, d] and ``item_emb`` [C, d] share one dtype (float32, bfloat16 or float64);
    ``item_bias`` [C] has that dtype too. Gradients flow to user_emb, item_emb and item_bias. With T = 0
    this is the plain full-softmax cross-entropy. ``check_inputs=False`` skips the data scans."""
    for name, x in (("user_emb", user_emb), ("item_emb", item_emb)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-d tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype not in _LOGIT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float64, got {x.dtype}")
    if user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"user_emb [B, d] and item_emb [C, d] must share d, got {tuple(user_emb.shape)} "
                         f"and {tuple(item_emb.shape)}")
    if user_emb.dtype != item_emb.dtype:
        raise ValueError(f"user_emb ({user_emb.dtype}) and item_emb ({item_emb.dtype}) must share one dtype")
    if item_emb.device != user_emb.device:
        raise ValueError(f"item_emb is on {item_emb.device}, user_emb on {user_emb.device}")
    num_items = item_emb.shape[0]
    if item_bias is not None:
        if item_bias.shape != (num_items,):
            raise ValueError(f"item_bias must be [C] = [{num_items}], got {tuple(item_bias.shape)}")
        if item_bias.dtype != item_emb.dtype:
            raise ValueError(f"item_bias ({item_bias.dtype}) must have the dtype of item_emb ({item_emb.dtype})")
        if item_bias.device != item_emb.device:
            raise ValueError(f"item_bias is on {item_bias.device}, item_emb on {item_emb.device}")
    check_hyperparameters(temperature, lambda_ce, lambda_kd, lambda_rank, reduction)
    batch = user_emb.shape[0]
    check_loss_inputs(num_items, batch, user_emb.device, target, teacher_ids, teacher_scores, teacher_weights,
                  rank_weights, check_inputs)
    if check_inputs:
        check_finite("user_emb", user_emb)
        check_finite("item_emb", item_emb)
        check_finite("item_bias", item_bias)
    fdt = reference.compute_dtype(user_emb.dtype)
    tgt, ids, scores, tw, rw = normalise_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights,
                                                         rank_weights, lambda_rank, fdt)
    res = resolve_backend(backend, user_emb.device, user_emb.dtype)
    bias = item_bias.contiguous() if item_bias is not None else None
    rows = res.module.kd_loss_linear_rows(user_emb.contiguous(), item_emb.contiguous(), bias, tgt, ids, scores,
                                          tw, rw, float(temperature), float(lambda_ce), float(lambda_kd),
                                          float(lambda_rank))
    return reduce_rows(rows, reduction)
