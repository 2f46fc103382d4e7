"""Triton backend of ``kd_loss`` on given logits: ``kd_loss_rows`` (per-row loss with autograd).

Semantics: /work/shared/specs/kd-loss.md and ``prmkd_dist.distill.reference.kd_loss_rows``.

Forward, one program per row: a single stream over the C columns in BLOCK_C tiles keeps both running
log-sum-exps (tau = 1 and tau) online; then the small [T, K] slot tile gives the teacher softmax, KL and
ranking terms from the student scores gathered at the slot ids. Saved per row: the two LSEs, wsum and the
[T, K] sparse coefficients (see ``_common``), O(B * T * K) in all.

Backward, one program per row: one stream writes the dense gradient
``g * (lambda_ce [y>=0] softmax(s) + lambda_kd tau wsum softmax(s / tau))`` and then overwrites the
gradient at the target and teacher ids with the dense value plus the sum of the coefficients of every slot
holding that id (duplicates add; equal ids write equal values, so no atomics are needed). The scores at those
ids are read before the stream, which makes ``grad_inplace=True`` (gradient written over the logits) safe.

Column splits of the forward (``column_splits``: small batches, wide catalogs): each row's LSE stream is cut
into S column ranges, each streamed by its own program to a partial state ([S, B]), and a second kernel merges
a row's states before its terms. The backward stays one program per row: on an H200 at B = 256, C = 1e6 the
forward went from 0.29 to 0.17 ms with 5 splits, the backward from 0.34 to 0.35 ms with the same splits
(each split repeats the row's duplicate-id combine; RESULTS.md, issue 6).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from prmkd_dist.kernels._common import (
    LN2, LOG2E, NEG_BIG, SLOT_CHUNK, TeacherInputs, merged_lse, online_lse_update, sm_count, split_range,
    stream_configs, teacher_terms,
)

__all__ = ["kd_loss_rows", "column_splits"]

_LOGITS_DTYPES = (torch.float32, torch.bfloat16)

SPLIT_MIN_COLS = 32768
"""Fewest columns a split streams: each split program repeats the row's prologue (slot gathers, the backward's
duplicate combine over the T*K slots), which must stay small next to its share of the stream."""

_forced = os.environ.get("PRMKD_TRITON_COLUMN_SPLITS", "0")
if not _forced.isdigit():
    raise ValueError(f"PRMKD_TRITON_COLUMN_SPLITS={_forced!r}: expected a whole number of splits >= 0 (0 = automatic)")
FORCED_SPLITS = int(_forced)
"""``PRMKD_TRITON_COLUMN_SPLITS=S`` (read at import) pins the column splits of every call, e.g. ``1`` for the
one-program-per-row form in an A/B benchmark; tests set this attribute to cover ragged and empty splits."""


def column_splits(batch: int, n_cols: int, device: torch.device) -> int:
    """Programs per row of the forward's LSE stream. One per row keeps each row's stream in one program, but
    a small batch then leaves the GPU with too few streams in flight (B = 256 on an H200's 132 SMs: ~2 per SM;
    forward 0.29 ms at C = 1e6, 0.17 ms with 5 splits), so below 4 rows per SM rows are split over columns
    up to about 8 programs per SM, each split at least SPLIT_MIN_COLS wide. From 4 rows per SM on, splitting
    measured no better (B = 1024: 0.061 ms at C = 1e5 with one program per row, 0.065 ms with 2 splits)."""
    if FORCED_SPLITS > 0:
        return FORCED_SPLITS
    if device.type != "cuda" or batch == 0:
        return 1
    sms = sm_count(device)
    if batch >= 4 * sms:
        return 1
    return max(1, min(triton.cdiv(8 * sms, batch), n_cols // SPLIT_MIN_COLS))


@triton.jit
def _row_terms(base, row, lse1, lset, target_ptr, ids_ptr, scores_ptr, tw_ptr, rw_ptr,
               loss_ptr, lse1_ptr, lset_ptr, wsum_ptr, coef_ptr, T, K, tau, lambda_ce, lambda_kd, lambda_rank,
               HAS_RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Everything of one row's forward after its two LSEs: the scores at the target and the slot ids, the CE,
    KL and ranking terms; stores the loss and what backward needs (LSEs, wsum, the [T, K] coefficients)."""
    y = tl.load(target_ptr + row)
    has_y = y >= 0
    s_y = tl.load(base + y, mask=has_y, other=0.0).to(tl.float32)
    ce = tl.where(has_y, lse1 - s_y, 0.0)

    t_idx = tl.arange(0, BLOCK_T)[:, None]
    k_idx = tl.arange(0, BLOCK_K)[None, :]
    in_tile = (t_idx < T) & (k_idx < K)
    slot = row * T * K + t_idx * K + k_idx
    ids = tl.load(ids_ptr + slot, mask=in_tile, other=-1)
    valid = ids >= 0
    scores = tl.load(scores_ptr + slot, mask=valid, other=0.0)
    if HAS_RANK:
        rw = tl.load(rw_ptr + slot, mask=valid, other=0.0)
    else:
        rw = scores
    w = tl.load(tw_ptr + row * T + tl.arange(0, BLOCK_T), mask=tl.arange(0, BLOCK_T) < T, other=0.0)
    s_ids = tl.load(base + ids, mask=valid, other=0.0).to(tl.float32)
    kd, rank, coef, wsum = teacher_terms(valid, scores, w, rw, s_ids, lset, tau, lambda_kd, lambda_rank, HAS_RANK)

    tl.store(loss_ptr + row, lambda_ce * ce + lambda_kd * tau * tau * kd + lambda_rank * rank)
    tl.store(lse1_ptr + row, lse1)
    tl.store(lset_ptr + row, lset)
    tl.store(wsum_ptr + row, wsum)
    tl.store(coef_ptr + slot, coef, mask=in_tile)


@triton.jit
def _lse_state(base, start, end, inv_tau, UNIT_TAU: tl.constexpr, BLOCK_C: tl.constexpr):
    """The running LSE state ([1] each: max in log2 units, sum exp2(x2 - max), sum exp2((x2 - max) / tau)) of
    one row's columns [start, end), streamed in BLOCK_C tiles."""
    cols = tl.arange(0, BLOCK_C)[None, :]
    m2 = tl.full([1], NEG_BIG, tl.float32)
    sum1 = tl.zeros([1], tl.float32)
    sumt = tl.zeros([1], tl.float32)
    for c0 in range(start, end, BLOCK_C):
        x = tl.load(base + c0 + cols, mask=c0 + cols < end, other=float("-inf")).to(tl.float32)
        m2, sum1, sumt = online_lse_update(m2, sum1, sumt, x * LOG2E, inv_tau, UNIT_TAU)
    return m2, sum1, sumt


@triton.autotune(configs=stream_configs(), key=["C", "UNIT_TAU"])
@triton.jit
def _kd_fwd_kernel(
    logits_ptr, stride_row, target_ptr, ids_ptr, scores_ptr, tw_ptr, rw_ptr,
    loss_ptr, lse1_ptr, lset_ptr, wsum_ptr, coef_ptr,
    C, T, K, tau, lambda_ce, lambda_kd, lambda_rank,
    HAS_RANK: tl.constexpr, UNIT_TAU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Forward of one row (no column splits): both LSEs in one stream over C, then the row's terms."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    inv_tau = 1.0 / tau
    m2, sum1, sumt = _lse_state(base, 0, C, inv_tau, UNIT_TAU, BLOCK_C)
    lse1 = tl.sum((m2 + tl.log2(sum1)) * LN2, axis=0)
    lset = tl.sum((m2 * inv_tau + tl.log2(sumt)) * LN2, axis=0)
    _row_terms(base, row, lse1, lset, target_ptr, ids_ptr, scores_ptr, tw_ptr, rw_ptr,
               loss_ptr, lse1_ptr, lset_ptr, wsum_ptr, coef_ptr, T, K, tau, lambda_ce, lambda_kd, lambda_rank,
               HAS_RANK, BLOCK_T, BLOCK_K)


@triton.autotune(configs=stream_configs(), key=["C", "SPLITS", "UNIT_TAU"])
@triton.jit
def _kd_lse_split_kernel(
    logits_ptr, stride_row, m2_ptr, sum1_ptr, sumt_ptr, B, C, SPLITS, tau,
    UNIT_TAU: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial LSE state of one row over one column split (grid (B, SPLITS)), to [SPLITS, B] buffers: the
    running max in log2 units and the two sums, as ``merged_lse`` combines them."""
    row = tl.program_id(0).to(tl.int64)
    start, end = split_range(C, SPLITS, BLOCK_C)
    m2, sum1, sumt = _lse_state(logits_ptr + row * stride_row, start, end, 1.0 / tau, UNIT_TAU, BLOCK_C)
    out = tl.program_id(1).to(tl.int64) * B + row + tl.arange(0, 1)  # an empty split keeps NEG_BIG, 0, 0
    tl.store(m2_ptr + out, m2)
    tl.store(sum1_ptr + out, sum1)
    tl.store(sumt_ptr + out, sumt)


@triton.jit
def _kd_terms_kernel(
    logits_ptr, stride_row, target_ptr, ids_ptr, scores_ptr, tw_ptr, rw_ptr, m2_ptr, sum1_ptr, sumt_ptr,
    loss_ptr, lse1_ptr, lset_ptr, wsum_ptr, coef_ptr,
    B, SPLITS, T, K, tau, lambda_ce, lambda_kd, lambda_rank,
    HAS_RANK: tl.constexpr, UNIT_TAU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Forward of one row after ``_kd_lse_split_kernel``: merges its splits' LSE states, then the row's terms."""
    row = tl.program_id(0).to(tl.int64)
    lse1, lset = merged_lse(m2_ptr, sum1_ptr, sumt_ptr, row, B, SPLITS, tau, UNIT_TAU, BLOCK_S)
    _row_terms(logits_ptr + row * stride_row, row, lse1, lset, target_ptr, ids_ptr, scores_ptr, tw_ptr, rw_ptr,
               loss_ptr, lse1_ptr, lset_ptr, wsum_ptr, coef_ptr, T, K, tau, lambda_ce, lambda_kd, lambda_rank,
               HAS_RANK, BLOCK_T, BLOCK_K)


# In-place backward writes over its input: while tuning, every trial run must start from the original buffer.
@triton.autotune(configs=stream_configs(), key=["C", "UNIT_TAU"], restore_value=["grad_ptr"])
@triton.jit
def _kd_bwd_kernel(
    logits_ptr, stride_row, grad_ptr, stride_grad, gout_ptr, target_ptr, ids_ptr, coef_ptr,
    lse1_ptr, lset_ptr, wsum_ptr,
    C, N, tau, lambda_ce, lambda_kd,
    UNIT_TAU: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * stride_grad
    inv_tau = 1.0 / tau
    g = tl.load(gout_ptr + row)
    y = tl.load(target_ptr + row)
    has_y = y >= 0
    lse1 = tl.load(lse1_ptr + row)
    lset = tl.load(lset_ptr + row)
    dense_1 = g * tl.where(has_y, lambda_ce, 0.0)
    dense_t = g * lambda_kd * tau * tl.load(wsum_ptr + row)

    # sparse part first: it needs the scores at the ids before an in-place stream overwrites them
    n = tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + row * N + n, mask=n < N, other=-1)
    valid = ids >= 0
    own = tl.load(coef_ptr + row * N + n, mask=n < N, other=0.0)
    combined = tl.where(valid & (ids == y), -lambda_ce, 0.0)  # a teacher id equal to the target
    for n0 in range(0, N, CHUNK_N):
        nc = n0 + tl.arange(0, CHUNK_N)
        ids_c = tl.load(ids_ptr + row * N + nc, mask=nc < N, other=-1)
        coef_c = tl.load(coef_ptr + row * N + nc, mask=nc < N, other=0.0)
        same = (ids[:, None] == ids_c[None, :]) & valid[:, None]
        combined += tl.sum(tl.where(same, coef_c[None, :], 0.0), axis=1)
    target_combined = -lambda_ce + tl.sum(tl.where(valid & (ids == y), own, 0.0), axis=0)
    s_ids = tl.load(base + ids, mask=valid, other=0.0).to(tl.float32)
    s_y = tl.load(base + y, mask=has_y, other=0.0).to(tl.float32)
    tl.debug_barrier()  # every thread has read its sparse scores before anyone overwrites them

    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        mask = c0 + cols < C
        x = tl.load(base + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        if UNIT_TAU:  # softmax(s) and softmax(s / tau) are one: one exp2 per logit
            d = (dense_1 + dense_t) * tl.exp2((x - lse1) * LOG2E)
        else:
            d = dense_1 * tl.exp2((x - lse1) * LOG2E) + dense_t * tl.exp2((x * inv_tau - lset) * LOG2E)
        tl.store(gbase + c0 + cols, d.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.debug_barrier()  # the dense stream is complete before the sparse values replace it

    d_ids = dense_1 * tl.exp(s_ids - lse1) + dense_t * tl.exp(s_ids * inv_tau - lset) + g * combined
    tl.store(gbase + ids, d_ids.to(grad_ptr.dtype.element_ty), mask=valid)
    d_y = dense_1 * tl.exp(s_y - lse1) + dense_t * tl.exp(s_y * inv_tau - lset) + g * target_combined
    tl.store(gbase + y, d_y.to(grad_ptr.dtype.element_ty), mask=has_y)


class _KDLossRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                teacher_weights: Tensor, rank_weights: Tensor | None, temperature: float, lambda_ce: float,
                lambda_kd: float, lambda_rank: float, grad_inplace: bool) -> Tensor:
        batch, n_cols = logits.shape
        teachers = TeacherInputs(teacher_ids, teacher_scores, teacher_weights, rank_weights, lambda_rank)
        target = target.detach().to(torch.int64).contiguous()
        f32 = dict(dtype=torch.float32, device=logits.device)
        loss = torch.empty(batch, **f32)
        lse1, lset, wsum = torch.empty((3, batch), **f32).unbind(0)  # one allocation: the host's per-op cost counts
        coef = torch.empty((batch, teachers.n_teachers, teachers.k_slots), **f32)
        splits = column_splits(batch, n_cols, logits.device)
        unit_tau = float(temperature) == 1.0
        hyper = (float(temperature), float(lambda_ce), float(lambda_kd), float(lambda_rank))
        if batch > 0 and splits == 1:
            _kd_fwd_kernel[(batch,)](
                logits, logits.stride(0), target, teachers.ids, teachers.scores, teachers.weights, teachers.rank,
                loss, lse1, lset, wsum, coef, n_cols, teachers.n_teachers, teachers.k_slots, *hyper,
                HAS_RANK=teachers.has_rank, UNIT_TAU=unit_tau, BLOCK_T=teachers.block_t, BLOCK_K=teachers.block_k,
            )
        elif batch > 0:
            m2, sum1, sumt = torch.empty((3, splits, batch), **f32).unbind(0)  # every entry is written
            _kd_lse_split_kernel[(batch, splits)](
                logits, logits.stride(0), m2, sum1, sumt, batch, n_cols, splits, float(temperature),
                UNIT_TAU=unit_tau,
            )
            _kd_terms_kernel[(batch,)](
                logits, logits.stride(0), target, teachers.ids, teachers.scores, teachers.weights, teachers.rank,
                m2, sum1, sumt, loss, lse1, lset, wsum, coef, batch, splits, teachers.n_teachers, teachers.k_slots,
                *hyper, HAS_RANK=teachers.has_rank, UNIT_TAU=unit_tau, BLOCK_S=triton.next_power_of_2(splits),
                BLOCK_T=teachers.block_t, BLOCK_K=teachers.block_k,
            )
        ctx.save_for_backward(logits, target, teachers.ids, coef, lse1, lset, wsum)
        ctx.params = (float(temperature), float(lambda_ce), float(lambda_kd), teachers.block_n, grad_inplace)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, target, ids, coef, lse1, lset, wsum = ctx.saved_tensors
        temperature, lambda_ce, lambda_kd, block_n, grad_inplace = ctx.params
        batch, n_cols = logits.shape
        if grad_inplace:
            # logits' storage becomes the gradient; bumping its version makes any other autograd user of
            # logits fail loudly instead of reading the gradient as if it were scores
            grad = logits.detach()
            torch.autograd.graph.increment_version(logits)
        else:
            grad = torch.empty_like(logits)
        g = grad_loss.detach().to(torch.float32).contiguous()  # a mean's grad arrives as a stride-0 view
        if batch > 0:
            _kd_bwd_kernel[(batch,)](
                logits, logits.stride(0), grad, grad.stride(0), g, target, ids, coef, lse1, lset, wsum,
                n_cols, ids.shape[1] * ids.shape[2], temperature, lambda_ce, lambda_kd,
                UNIT_TAU=temperature == 1.0, BLOCK_N=block_n, CHUNK_N=SLOT_CHUNK,
            )
        return grad, None, None, None, None, None, None, None, None, None, None


def kd_loss_rows(
    logits: Tensor,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None,
    temperature: float,
    lambda_ce: float,
    lambda_kd: float,
    lambda_rank: float,
    *,
    grad_inplace: bool = False,
) -> Tensor:
    """Per-row distillation loss ``l_b`` [B] float32 of ``kd_loss`` (spec: kd-loss.md), Triton kernels.

    Inputs are validated by the dispatcher (``prmkd_dist.kd_loss``): logits [B, C] float32/bfloat16
    contiguous (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); target [B] int64 (-1: no CE);
    teacher_ids [B, T, K] int64 (-1: empty slot), teacher_scores [B, T, K], teacher_weights [B, T],
    rank_weights [B, T, K] or None; T or K may be 0. Backward gives d logits in the logits' dtype.

    grad_inplace=True writes the gradient over the logits buffer in backward, saving a [B, C] allocation;
    the caller must not use ``logits`` (its values) after backward — it then holds the gradient, and other
    autograd consumers that saved it raise a version-counter error.
    """
    if logits.dtype not in _LOGITS_DTYPES:
        raise ValueError(f"triton kd_loss_rows: logits must be float32 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"triton kd_loss_rows: logits must be a [B, C] tensor with contiguous rows, "
                         f"got shape {tuple(logits.shape)} strides {logits.stride()}")
    return _KDLossRows.apply(logits, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                             temperature, lambda_ce, lambda_kd, lambda_rank, grad_inplace)
