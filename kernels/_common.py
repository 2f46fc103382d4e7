"""Shared pieces of the distillation-loss kernels: block-size configs (the one place they live), input
normalisation, and the per-row teacher/ranking terms as a ``triton.jit`` helper used by both forms
(logits given, fused linear).

The loss is defined in /work/shared/specs/kd-loss.md and by ``prmkd_dist.distill.reference``.
Notation used in the kernels, for one row ``b`` with scores ``s``:

- ``lse1 = log sum_j exp(s_j)`` and ``lset = log sum_j exp(s_j / tau)``, streamed over C together;
- per teacher slot ``(t, k)`` the backward needs a *sparse coefficient*
  ``coef_tk = -lambda_kd * tau * w_t * p_tk - lambda_rank * w_t * rho_hat_tk * sigmoid(-s_{id})``
  and per row the *dense* factors ``lambda_ce * [y >= 0]`` and ``wsum = sum_t w_t [V_t non-empty]``, so that
  ``d l_b / d s_j = lambda_ce [y>=0] softmax(s)_j + lambda_kd * tau * wsum * softmax(s / tau)_j
  + sum_{slots with id j} coef - lambda_ce [j = y]``. Duplicate ids simply add.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # Without CUDA, compiled kernels cannot run at all; the interpreter (CPU tensors) is then the only way,
    # and triton.jit reads this variable when the kernels below are decorated.
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when kernels run in Triton's CPU interpreter (set before the kernel modules are imported, or
implied on a machine without CUDA)."""


def _fix_interpreter_scalar_index() -> None:
    """Let the interpreter use runtime scalars as loop bounds under numpy >= 2.

    Triton 3.6's interpreter holds a scalar as a 1-element array and defines ``tensor.__index__`` as
    ``int(array)``, which numpy 2 rejects for 1-d arrays, so ``for i in range(0, n, BLOCK)`` fails.
    This re-defines ``__index__`` (inside the interpreter's own patch scope, undone after each launch)
    with ``.item()``; compiled GPU kernels are untouched."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_prmkd_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._prmkd_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalar_index()

# constants read inside kernels must be tl.constexpr globals
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# finite "minus infinity" for running maxima: exp2(NEG_BIG - m) is exactly 0 and NEG_BIG - NEG_BIG is 0, not NaN
NEG_BIG = tl.constexpr(-1.0e30)

SPARSE_GRANULE = 16
"""Column granule of the item-sorted sparse entries of the fused-linear backward; every linear BLOCK_C
is a multiple of it."""

GATHER_BLOCK_D = 16 if INTERPRET else 32
"""Embedding columns gathered per step when recomputing logits at teacher/target ids."""

GATHER_BLOCK_M = 16 if INTERPRET else 64
"""Selected ids per program of the catalog-parallel selected-logits gather (the interpreter's 16 puts the
tests' M over several programs)."""

SLOT_CHUNK = 16
"""Slots compared per step when the backward sums the coefficients of duplicate ids."""

ENTRY_CHUNK = 16 if INTERPRET else 32
"""Sparse entries folded per tl.dot in the fused-linear item-gradient kernel."""


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the split heuristics run on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


AUTOTUNE = os.environ.get("PRMKD_TRITON_AUTOTUNE", "1") != "0"
"""``PRMKD_TRITON_AUTOTUNE=0`` pins one config per kernel family (read at import): correctness runs on a GPU
(``pytest tests/kernels``) then compile each test shape once instead of timing every config on it."""


def stream_configs() -> list[triton.Config]:
    """Configs of the row-streaming kernels (one program per row, BLOCK_C columns per step).

    The interpreter gets one small block so that tests cover several tiles and a ragged last tile."""
    if INTERPRET:
        return [triton.Config({"BLOCK_C": 64}, num_warps=4)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_C": 1024}, num_warps=4)]
    return [triton.Config({"BLOCK_C": bc}, num_warps=w) for bc in (1024, 2048, 4096) for w in (4, 8)]


def linear_configs() -> list[triton.Config]:
    """Configs of the fused-linear tile kernels (BLOCK_B rows x BLOCK_C items per tl.dot tile).

    Large tiles suit bf16; fp32 (3xTF32 dots) at d = 128..256 needs the small ones to fit the 227 KiB of
    shared memory of an H100 (compiled for sm_90: fp32, d = 128, 64 x 64 x 3 stages already takes ~192 KiB).
    Configs that do not fit fail to launch and the autotuner skips them."""
    if INTERPRET:
        return [triton.Config({"BLOCK_B": 16, "BLOCK_C": 32}, num_warps=4)]
    if not AUTOTUNE:  # the smallest tile: fits shared memory for every dtype and d <= MAX_LINEAR_DIM
        return [triton.Config({"BLOCK_B": 32, "BLOCK_C": 32}, num_warps=4, num_stages=2)]
    return [
        triton.Config({"BLOCK_B": bb, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        for bb, bc, w, st in (
            (32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3),
            (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 8, 4), (128, 256, 8, 3),
        )
    ]


MAX_LINEAR_DIM = 256
"""Widest embedding the fused-linear kernels hold in registers (tiles are [BLOCK, d] in full)."""


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands use 3xTF32 (near-fp32 accuracy on tensor cores, like the
    reference's fp32 matmul); bf16 operands ignore it and run natively."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


class TeacherInputs:
    """Teacher tensors made contiguous and never empty: T = 0 or K = 0 becomes one empty slot with
    weight 0, so the kernels have a single code path (an empty teacher contributes exactly nothing)."""

    def __init__(self, teacher_ids: torch.Tensor, teacher_scores: torch.Tensor, teacher_weights: torch.Tensor,
                 rank_weights: torch.Tensor | None, lambda_rank: float) -> None:
        batch, n_teachers, k_slots = teacher_ids.shape
        device = teacher_ids.device
        if n_teachers == 0 or k_slots == 0:
            n_teachers, k_slots = 1, 1
            teacher_ids = torch.full((batch, 1, 1), -1, dtype=torch.int64, device=device)
            teacher_scores = torch.zeros((batch, 1, 1), dtype=torch.float32, device=device)
            teacher_weights = torch.zeros((batch, 1), dtype=torch.float32, device=device)
            rank_weights = None
        self.n_teachers, self.k_slots = n_teachers, k_slots
        self.ids = teacher_ids.detach().to(torch.int64).contiguous()
        self.scores = teacher_scores.detach().to(torch.float32).contiguous()
        self.weights = teacher_weights.detach().to(torch.float32).contiguous()
        self.has_rank = rank_weights is not None and lambda_rank != 0.0
        # the kernel never reads rank weights when has_rank is False; any float32 pointer will do
        self.rank = rank_weights.detach().to(torch.float32).contiguous() if self.has_rank else self.scores
        self.block_t = triton.next_power_of_2(n_teachers)
        self.block_k = triton.next_power_of_2(k_slots)
        self.block_n = max(SLOT_CHUNK, triton.next_power_of_2(n_teachers * k_slots))


@triton.jit
def online_lse_update(m2, sum1, sumt, x2, inv_tau, UNIT_TAU: tl.constexpr):
    """One step of the two running log-sum-exps of the rows of a [R, BLOCK] tile, in the log2 domain
    (x2 = s * log2 e; masked entries are -inf). m2, sum1, sumt are [R]: the running max, sum exp2(x2 - max)
    and sum exp2((x2 - max) / tau). Returns their new values.

    UNIT_TAU (tau == 1): the two sums are one, so one exp2 per entry instead of two. The streaming passes
    are bound by the special-function unit's exp2 rate about as much as by memory (an H200 SM retires 16
    exp2 per clock: two per bf16 logit is ~2 ms for 4e9 logits, as long as reading them once)."""
    m_new = tl.maximum(m2, tl.max(x2, axis=1))
    shifted = x2 - m_new[:, None]
    sum1 = sum1 * tl.exp2(m2 - m_new) + tl.sum(tl.exp2(shifted), axis=1)
    if UNIT_TAU:
        sumt = sum1
    else:
        sumt = sumt * tl.exp2((m2 - m_new) * inv_tau) + tl.sum(tl.exp2(shifted * inv_tau), axis=1)
    return m_new, sum1, sumt


# Triton 3.6's interpreter computes tl.dot of bfloat16 operands wrongly (values off by ~1e10 in a 16x16
# check), so interpreted runs upcast them first; bf16 x bf16 products are exact in fp32, which is what the
# GPU's bf16 MMA with fp32 accumulation computes too.
UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, DOT_PREC: tl.constexpr):
    """a @ b with fp32 accumulation (``tl.dot``; see UPCAST_DOT for the interpreter)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def split_range(C, SPLITS, BLOCK_C: tl.constexpr):
    """[start, end) of this program's catalog split (axis 1): whole BLOCK_C tiles, the last split ragged;
    a split past C is empty."""
    chunk = tl.cdiv(tl.cdiv(C, SPLITS), BLOCK_C) * BLOCK_C
    start = tl.program_id(1) * chunk
    return start, tl.minimum(start + chunk, C)


@triton.jit
def merged_lse(m2_ptr, sum1_ptr, sumt_ptr, row, B, SPLITS, tau, UNIT_TAU: tl.constexpr, BLOCK_S: tl.constexpr):
    """(LSE_1, LSE_tau) of one row from its catalog splits' states, [SPLITS, B] each (``_lin_lse_kernel``,
    ``_kd_lse_split_kernel``): what ``combine_splits`` does on the host, here in the kernel that needs it (no
    host ops between the two kernels). An empty split holds NEG_BIG and zero sums and weighs exp2(NEG_BIG - top) = 0."""
    sp = tl.arange(0, BLOCK_S)
    s_mask = sp < SPLITS
    at = sp.to(tl.int64) * B + row
    m2 = tl.load(m2_ptr + at, mask=s_mask, other=NEG_BIG)
    top = tl.max(m2, axis=0)
    z1 = tl.sum(tl.load(sum1_ptr + at, mask=s_mask, other=0.0) * tl.exp2(m2 - top), axis=0)
    lse1 = top * LN2 + tl.log(z1)
    if UNIT_TAU:  # the LSE kernel stored sumt = sum1: LSE_tau is LSE_1, bit for bit
        lset = lse1
    else:
        zt = tl.sum(tl.load(sumt_ptr + at, mask=s_mask, other=0.0) * tl.exp2((m2 - top) / tau), axis=0)
        lset = top * LN2 / tau + tl.log(zt)
    return lse1, lset


@triton.jit
def teacher_terms(valid, scores, w, rw, s_ids, lset, tau, lambda_kd, lambda_rank, HAS_RANK: tl.constexpr):
    """Teacher terms of one row from its [BLOCK_T, BLOCK_K] slot tile.

    valid: slot holds an id; scores: teacher scores; w: [BLOCK_T] teacher weights (0 past T);
    rw: rank weights (read only when HAS_RANK); s_ids: student scores at the slot ids (fp32).
    Returns (sum_t w_t KL_t, sum_t w_t R_t, coef tile, wsum) as defined in this module's docstring."""
    inv_tau = 1.0 / tau
    a = tl.where(valid, scores * inv_tau, float("-inf"))
    a_max = tl.max(a, axis=1)
    non_empty = a_max > float("-inf")
    a_max = tl.where(non_empty, a_max, 0.0)
    e = tl.where(valid, tl.exp(a - a_max[:, None]), 0.0)
    z = tl.sum(e, axis=1)
    z = tl.where(z > 0, z, 1.0)
    p = e / z[:, None]
    log_p = tl.where(valid, a - a_max[:, None] - tl.log(z)[:, None], 0.0)  # no -inf * 0 on empty slots
    log_q = s_ids * inv_tau - lset
    kl = tl.sum(tl.where(valid, p * (log_p - log_q), 0.0), axis=1)
    kd = tl.sum(w * kl, axis=0)
    wsum = tl.sum(tl.where(non_empty, w, 0.0), axis=0)
    coef = -(lambda_kd * tau) * w[:, None] * p
    rank = kd * 0.0
    if HAS_RANK:
        rw = tl.where(valid, rw, 0.0)
        r_tot = tl.sum(rw, axis=1)
        rho = tl.where(r_tot[:, None] > 0, rw / tl.where(r_tot > 0, r_tot, 1.0)[:, None], 0.0)
        # stable log sigmoid(s) and sigmoid(-s), no overflow for large |s|
        e_abs = tl.exp(-tl.abs(s_ids))
        log_sig = tl.minimum(s_ids, 0.0) - tl.log(1.0 + e_abs)
        sig_neg = tl.where(s_ids >= 0, e_abs, 1.0) / (1.0 + e_abs)
        rank = tl.sum(w * tl.sum(tl.where(valid, -rho * log_sig, 0.0), axis=1), axis=0)
        coef += -lambda_rank * w[:, None] * rho * sig_neg
    coef = tl.where(valid, coef, 0.0)
    return kd, rank, coef, wsum
