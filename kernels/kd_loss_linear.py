"""Triton backend of ``kd_loss_linear``: the loss of ``logits = user_emb @ item_emb.T (+ item_bias)``
without ever materialising the [B, C] logits (or their gradient).

Semantics: /work/shared/specs/kd-loss.md and ``prmkd_dist.distill.reference.kd_loss_linear_rows``; the
notation (lse1, lset, wsum, sparse coefficients) is in ``prmkd_dist.kernels._common``.

Forward:
1. ``_lin_lse_kernel``, one program per BLOCK_B rows and catalog split: streams over its share of C in
   BLOCK_C item tiles, each logits tile a ``tl.dot`` in registers (fp32 accumulation), keeping both running
   LSEs per row; each split stores its partial (max, sum-exp, sum-exp at tau).
2. ``_lin_terms_kernel``, one program per row: merges the row's split states into LSE_1 and LSE_tau (kept for
   backward), recomputes the logits at the target and the T*K teacher ids as gathered dot products
   (``gathered_logits``) and evaluates CE, KL and ranking terms (shared ``teacher_terms``). (The catalog-parallel
   local part merges the same states on the host instead, ``combine_splits``: they are all-reduced first.)
Between and after the kernels the host issues almost nothing: a step at small B x C is bound by the host's
per-op cost (an H200's host: ~23 us per aten op), so the small per-row algebra lives in the kernels.

Backward (dS = dense softmax part + sparse part at the ids, as in ``kd_loss.py``), by ``linear_grads`` from
per-row dense factors (of softmax_1 and softmax_tau) and sparse (row, item, value) entries, the form the
catalog-parallel local part (``kd_catalog_local.py``) needs too; ``_lin_entries_kernel`` builds both from the
upstream gradient and the saved coefficients, one program per row:
3. ``_lin_grad_user_kernel``, per row block and catalog split: recomputes logits tiles,
   dU += dS_dense @ E_tile into an fp32 partial per split (split 0 also adds the sparse part
   ``sum_entries value * E[item]`` row by row); the partials are summed.
4. ``_lin_grad_item_kernel``, per item block: recomputes logits tiles over all rows, dE += dS_dense^T @ U,
   dbias += column sums, then folds in the sparse entries whose item falls in the block. The entries are
   sorted by item once (torch.sort on B*(T*K+1) ids) so each program reads only its own range.
The item gradient uses its own pass over column blocks instead of atomics: every dE element is written
exactly once (deterministic, no contention on hot items, no fp32 [C, d] staging buffer for bf16 tables).
The price is recomputing the logits tiles once more (three logits matmuls in all, against one plus the
[B, C] round trips of the unfused path). Memory: O(B*d + C*d + B*T*K), plus splits*B*(d+3) fp32 partials.

Why the catalog splits: with one program per row block, B = 1024 and BLOCK_B = 64 launch 16 programs on a
132-SM H200, each streaming all of C (measured 2% of the bf16 matmul rate at C = 1e6). Splitting C fills the
chip the way split-K fills it for a short, deep matmul; ``catalog_splits`` sizes it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from prmkd_dist.kernels._common import (
    ENTRY_CHUNK, GATHER_BLOCK_D, INTERPRET, LN2, LOG2E, MAX_LINEAR_DIM, NEG_BIG, SPARSE_GRANULE, TeacherInputs, dot,
    dot_precision, linear_configs, merged_lse, online_lse_update, sm_count, split_range, teacher_terms,
)

__all__ = ["kd_loss_linear_rows", "split_lse_stats", "combine_splits", "linear_grads", "gathered_logits",
           "check_embeddings"]

_EMB_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _logits_tile(u, e_ptr, bias_ptr, cols, c_mask, d_idx, d_mask, stride_e,
                 HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits tile u @ E[cols].T (+ bias[cols]) in fp32, and the item tile it used."""
    e = tl.load(e_ptr + cols[:, None].to(tl.int64) * stride_e + d_idx[None, :],
                mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    s = dot(u, tl.trans(e), DOT_PREC)
    if HAS_BIAS:
        s += tl.load(bias_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return s, e


@triton.jit
def _dense_grad(s, g_dense1, g_denset, lse1, lset, inv_tau, UNIT_TAU: tl.constexpr):
    """Dense part of d l / d s for a [rows, cols] tile (rows' factors already multiplied by the upstream g);
    UNIT_TAU: the two softmaxes are one (lset == lse1), one exp2 per logit."""
    if UNIT_TAU:
        return (g_dense1 + g_denset)[:, None] * tl.exp2((s - lse1[:, None]) * LOG2E)
    return (g_dense1[:, None] * tl.exp2((s - lse1[:, None]) * LOG2E)
            + g_denset[:, None] * tl.exp2((s * inv_tau - lset[:, None]) * LOG2E))


@triton.autotune(configs=linear_configs(), key=["C", "D", "SPLITS", "UNIT_TAU"])
@triton.jit
def _lin_lse_kernel(
    u_ptr, e_ptr, bias_ptr, m2_ptr, sum1_ptr, sumt_ptr,
    B, C, D, SPLITS, stride_u, stride_e, tau,
    HAS_BIAS: tl.constexpr, UNIT_TAU: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial LSE state of one row block over one catalog split (``online_lse_update``'s max in log2 units,
    sum exp2(x2 - max), sum exp2((x2 - max) / tau)), to m2_ptr / sum1_ptr / sumt_ptr [SPLITS, B]."""
    start, end = split_range(C, SPLITS, BLOCK_C)
    out = tl.program_id(1).to(tl.int64) * B
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    d_idx = tl.arange(0, D_PAD)
    d_mask = d_idx < D
    inv_tau = 1.0 / tau
    u = tl.load(u_ptr + rows[:, None].to(tl.int64) * stride_u + d_idx[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    m2 = tl.full([BLOCK_B], NEG_BIG, tl.float32)
    sum1 = tl.zeros([BLOCK_B], tl.float32)
    sumt = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(start, end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_mask = cols < end
        s, _ = _logits_tile(u, e_ptr, bias_ptr, cols, c_mask, d_idx, d_mask, stride_e, HAS_BIAS, DOT_PREC)
        x2 = tl.where(c_mask[None, :], s * LOG2E, float("-inf"))
        m2, sum1, sumt = online_lse_update(m2, sum1, sumt, x2, inv_tau, UNIT_TAU)
    # an empty split stores NEG_BIG and zero sums, which combine_splits weighs by exp2(NEG_BIG - max) = 0
    tl.store(m2_ptr + out + rows, m2, mask=r_mask)
    tl.store(sum1_ptr + out + rows, sum1, mask=r_mask)
    tl.store(sumt_ptr + out + rows, sumt, mask=r_mask)


@triton.jit
def gathered_logits(u_ptr, e_ptr, bias_ptr, row, ids, D, stride_u, stride_e,
                    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits of user row ``row`` at a 2-d tile of item ids, u . E[id] (+ bias[id]), 0 where the id is
    -1: gathered dot products, BLOCK_D embedding columns at a time."""
    valid = ids >= 0
    s = tl.zeros(ids.shape, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        u = tl.load(u_ptr + row * stride_u + dd, mask=d_mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + ids[:, :, None] * stride_e + dd[None, None, :],
                    mask=valid[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
        s += tl.sum(e * u[None, None, :], axis=2)
    if HAS_BIAS:
        s += tl.load(bias_ptr + ids, mask=valid, other=0.0).to(tl.float32)
    return s


@triton.jit
def _lin_terms_kernel(
    u_ptr, e_ptr, bias_ptr, target_ptr, ids_ptr, scores_ptr, tw_ptr, rw_ptr,
    m2_ptr, sum1_ptr, sumt_ptr, lse1_ptr, lset_ptr, loss_ptr, wsum_ptr, coef_ptr,
    B, SPLITS, D, T, K, stride_u, stride_e, tau, lambda_ce, lambda_kd, lambda_rank,
    HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, UNIT_TAU: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One row: merges its LSE states over the catalog splits (stored for backward as lse1 / lset), then the
    logits at the target and the teacher ids, and the CE, KL and ranking terms."""
    row = tl.program_id(0).to(tl.int64)
    lse1, lset = merged_lse(m2_ptr, sum1_ptr, sumt_ptr, row, B, SPLITS, tau, UNIT_TAU, BLOCK_S)
    tl.store(lse1_ptr + row, lse1)
    tl.store(lset_ptr + row, lset)
    t_idx = tl.arange(0, BLOCK_T)[:, None]
    k_idx = tl.arange(0, BLOCK_K)[None, :]
    in_tile = (t_idx < T) & (k_idx < K)
    slot = row * T * K + t_idx * K + k_idx
    ids = tl.load(ids_ptr + slot, mask=in_tile, other=-1)
    valid = ids >= 0
    y = tl.load(target_ptr + row)
    has_y = y >= 0

    # logits at the slot ids and at the target (a [1, 1] tile of ids)
    s_ids = gathered_logits(u_ptr, e_ptr, bias_ptr, row, ids, D, stride_u, stride_e, HAS_BIAS, BLOCK_D)
    s_y = gathered_logits(u_ptr, e_ptr, bias_ptr, row, tl.full([1, 1], 0, tl.int64) + y, D, stride_u, stride_e,
                          HAS_BIAS, BLOCK_D)
    s_y = tl.sum(tl.sum(s_y, axis=1), axis=0)

    ce = tl.where(has_y, lse1 - s_y, 0.0)
    scores = tl.load(scores_ptr + slot, mask=valid, other=0.0)
    if HAS_RANK:
        rw = tl.load(rw_ptr + slot, mask=valid, other=0.0)
    else:
        rw = scores
    w = tl.load(tw_ptr + row * T + tl.arange(0, BLOCK_T), mask=tl.arange(0, BLOCK_T) < T, other=0.0)
    kd, rank, coef, wsum = teacher_terms(valid, scores, w, rw, s_ids, lset, tau, lambda_kd, lambda_rank, HAS_RANK)
    tl.store(loss_ptr + row, lambda_ce * ce + lambda_kd * tau * tau * kd + lambda_rank * rank)
    tl.store(wsum_ptr + row, wsum)
    tl.store(coef_ptr + slot, coef, mask=in_tile)


@triton.jit
def _lin_entries_kernel(
    g_ptr, stride_g, target_ptr, ids_ptr, coef_ptr, wsum_ptr, g1_ptr, gt_ptr, eid_ptr, eval_ptr,
    N, tau, lambda_ce, lambda_kd, BLOCK_N: tl.constexpr,
):
    """One row of backward's inputs to ``linear_grads``: the dense factors g1 = lambda_ce g [y >= 0] and
    gt = lambda_kd tau wsum g, and the N + 1 sparse entries (every teacher slot with value g * coef, then the
    target with -g1); ``g`` may be a stride-0 view (a mean's gradient)."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row * stride_g).to(tl.float32)
    y = tl.load(target_ptr + row)
    g1 = tl.where(y >= 0, lambda_ce * g, 0.0)
    tl.store(g1_ptr + row, g1)
    tl.store(gt_ptr + row, lambda_kd * tau * tl.load(wsum_ptr + row) * g)
    out = row * (N + 1)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N
        tl.store(eid_ptr + out + n, tl.load(ids_ptr + row * N + n, mask=n_mask, other=-1), mask=n_mask)
        tl.store(eval_ptr + out + n, g * tl.load(coef_ptr + row * N + n, mask=n_mask, other=0.0), mask=n_mask)
    tl.store(eid_ptr + out + N, y)
    tl.store(eval_ptr + out + N, -g1)


@triton.autotune(configs=linear_configs(), key=["C", "D", "SPLITS", "UNIT_TAU"])
@triton.jit
def _lin_grad_user_kernel(
    u_ptr, e_ptr, bias_ptr, g1_ptr, gt_ptr, lse1_ptr, lset_ptr, ids_ptr, val_ptr, du_ptr,
    B, C, D, N, SPLITS, stride_u, stride_e, tau,
    HAS_BIAS: tl.constexpr, UNIT_TAU: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 partial dU of one row block over one catalog split, to du_ptr [SPLITS, B, D] (contiguous), from
    the rows' dense factors g1 / gt [B] and their sparse entries (item ids_ptr, value val_ptr) [B, N]."""
    start, end = split_range(C, SPLITS, BLOCK_C)
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < B
    rows64 = rows.to(tl.int64)
    d_idx = tl.arange(0, D_PAD)
    d_mask = d_idx < D
    inv_tau = 1.0 / tau
    u = tl.load(u_ptr + rows64[:, None] * stride_u + d_idx[None, :],
                mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    lse1 = tl.load(lse1_ptr + rows, mask=r_mask, other=0.0)
    lset = tl.load(lset_ptr + rows, mask=r_mask, other=0.0)
    g_dense1 = tl.load(g1_ptr + rows, mask=r_mask, other=0.0)
    g_denset = tl.load(gt_ptr + rows, mask=r_mask, other=0.0)

    acc = tl.zeros([BLOCK_B, D_PAD], tl.float32)
    for c0 in range(start, end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        c_mask = cols < end
        s, e = _logits_tile(u, e_ptr, bias_ptr, cols, c_mask, d_idx, d_mask, stride_e, HAS_BIAS, DOT_PREC)
        ds = tl.where(c_mask[None, :], _dense_grad(s, g_dense1, g_denset, lse1, lset, inv_tau, UNIT_TAU), 0.0)
        acc += dot(ds.to(e.dtype), e, DOT_PREC)

    # sparse part (split 0 only): each entry of these rows, value * E[item]; -1 = no entry
    n_sparse = tl.where(split == 0, N, 0)
    for n in range(0, n_sparse):
        ids_n = tl.load(ids_ptr + rows64 * N + n, mask=r_mask, other=-1)
        val_n = tl.load(val_ptr + rows64 * N + n, mask=r_mask, other=0.0)
        e_n = tl.load(e_ptr + ids_n[:, None] * stride_e + d_idx[None, :],
                      mask=(ids_n >= 0)[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += val_n[:, None] * e_n
    tl.store(du_ptr + (split.to(tl.int64) * B + rows64[:, None]) * D + d_idx[None, :], acc,
             mask=r_mask[:, None] & d_mask[None, :])


@triton.autotune(configs=linear_configs(), key=["C", "D", "UNIT_TAU"])
@triton.jit
def _lin_grad_item_kernel(
    u_ptr, e_ptr, bias_ptr, g1_ptr, gt_ptr, lse1_ptr, lset_ptr,
    entry_item_ptr, entry_row_ptr, entry_val_ptr, bounds_ptr, de_ptr, dbias_ptr,
    B, C, D, n_bounds, stride_u, stride_e, tau,
    HAS_BIAS: tl.constexpr, UNIT_TAU: tl.constexpr, D_PAD: tl.constexpr, DOT_PREC: tl.constexpr, GRANULE: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C
    cols64 = cols.to(tl.int64)
    d_idx = tl.arange(0, D_PAD)
    d_mask = d_idx < D
    inv_tau = 1.0 / tau
    e = tl.load(e_ptr + cols64[:, None] * stride_e + d_idx[None, :],
                mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C, D_PAD], tl.float32)
    acc_bias = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        r_mask = rows < B
        u = tl.load(u_ptr + rows.to(tl.int64)[:, None] * stride_u + d_idx[None, :],
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        g_dense1 = tl.load(g1_ptr + rows, mask=r_mask, other=0.0)
        g_denset = tl.load(gt_ptr + rows, mask=r_mask, other=0.0)
        lse1 = tl.load(lse1_ptr + rows, mask=r_mask, other=0.0)
        lset = tl.load(lset_ptr + rows, mask=r_mask, other=0.0)
        s = dot(u, tl.trans(e), DOT_PREC)
        if HAS_BIAS:
            s += bias[None, :]
        ds = tl.where(r_mask[:, None] & c_mask[None, :],
                      _dense_grad(s, g_dense1, g_denset, lse1, lset, inv_tau, UNIT_TAU), 0.0)
        acc += dot(tl.trans(ds.to(u.dtype)), u, DOT_PREC)
        acc_bias += tl.sum(ds, axis=0)

    # sparse entries (item, row, g * coef) of this item block, sorted by item: a one-hot [BLOCK_C, CHUNK]
    # matrix times the [CHUNK, d] user rows folds them in with tl.dot; duplicates add.
    first = tl.load(bounds_ptr + pid * (BLOCK_C // GRANULE))
    last = tl.load(bounds_ptr + tl.minimum((pid + 1) * (BLOCK_C // GRANULE), n_bounds - 1))
    for j0 in range(first, last, CHUNK):
        jj = j0 + tl.arange(0, CHUNK)
        j_mask = jj < last
        item = tl.load(entry_item_ptr + jj, mask=j_mask, other=-1)
        row = tl.load(entry_row_ptr + jj, mask=j_mask, other=0)
        val = tl.load(entry_val_ptr + jj, mask=j_mask, other=0.0)
        onehot = tl.where(cols64[:, None] == item[None, :], val[None, :], 0.0)
        u_j = tl.load(u_ptr + row[:, None] * stride_u + d_idx[None, :],
                      mask=j_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += dot(onehot, u_j, "tf32x3")
        acc_bias += tl.sum(onehot, axis=1)
    tl.store(de_ptr + cols64[:, None] * stride_e + d_idx[None, :], acc.to(de_ptr.dtype.element_ty),
             mask=c_mask[:, None] & d_mask[None, :])
    if HAS_BIAS:
        tl.store(dbias_ptr + cols, acc_bias.to(dbias_ptr.dtype.element_ty), mask=c_mask)


def catalog_splits(batch: int, n_items: int, device: torch.device) -> int:
    """How many catalog splits the row-block kernels use: enough programs for about four per SM (row
    blocks counted at 64 rows), each split at least 4096 items so its partials stay cheap. The interpreter
    uses 3 (never a divisor of the tests' C), so CI exercises ragged and empty splits."""
    if INTERPRET:
        return 3
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    want = triton.cdiv(4 * sms, triton.cdiv(batch, 64))
    return max(1, min(want, n_items // 4096))


def _d_pad(dim: int) -> int:
    """Padded embedding width held in registers (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(dim))


def _tile_args(user: Tensor, tau: float, bias: Tensor | None) -> dict:
    """The constexprs every logits-tile kernel takes."""
    return dict(HAS_BIAS=bias is not None, UNIT_TAU=tau == 1.0, D_PAD=_d_pad(user.shape[1]),
                DOT_PREC=dot_precision(user.dtype))


def check_embeddings(op: str, user_emb: Tensor, item_emb: Tensor) -> None:
    """ValueError unless user_emb [B, d] and item_emb [C, d] share a float32 / bfloat16 dtype and a d the
    tiles can hold."""
    if user_emb.dtype not in _EMB_DTYPES or item_emb.dtype != user_emb.dtype:
        raise ValueError(f"triton {op}: user_emb and item_emb must share a dtype in "
                         f"(float32, bfloat16), got {user_emb.dtype} and {item_emb.dtype}")
    if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"triton {op}: expected user_emb [B, d] and item_emb [C, d], got "
                         f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}")
    if user_emb.shape[1] > MAX_LINEAR_DIM:
        raise ValueError(f"triton {op}: d = {user_emb.shape[1]} > {MAX_LINEAR_DIM}, the widest "
                         f"embedding its tiles hold; use kd_loss on materialised logits or backend='cpp'")


def split_lse_stats(user: Tensor, item: Tensor, bias: Tensor | None, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per catalog split, the LSE state of every row of ``user @ item.T (+ bias)``: (max in log2 units,
    sum exp2(x2 - max), sum exp2((x2 - max) / tau)), each [splits, B] float32 (contiguous inputs).
    Nothing to stream (B = 0 or C = 0): zeros, i.e. empty sums."""
    batch, n_items = user.shape[0], item.shape[0]
    splits = catalog_splits(batch, n_items, user.device)
    if batch == 0 or n_items == 0:
        return tuple(torch.zeros((3, splits, batch), dtype=torch.float32, device=user.device))
    parts = torch.empty((3, splits, batch), dtype=torch.float32, device=user.device)  # the kernel writes all
    _lin_lse_kernel[lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), splits)](
        user, item, user if bias is None else bias, parts[0], parts[1], parts[2],
        batch, n_items, user.shape[1], splits, user.stride(0), item.stride(0), tau,
        **_tile_args(user, tau, bias),
    )
    return parts[0], parts[1], parts[2]


def combine_splits(m2: Tensor, sum1: Tensor, sumt: Tensor, tau: float,
                   dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The splits' LSE states (``split_lse_stats``) merged per row, in ``dtype``: (m = max s (natural log),
    z1 = sum exp(s - m), zt = sum exp((s - m) / tau)), so LSE_1 = m + log z1 and LSE_tau = m / tau + log zt.
    A row with nothing in any split has m = -inf and both sums 0."""
    m2, sum1, sumt = m2.to(dtype), sum1.to(dtype), sumt.to(dtype)
    top = m2.max(dim=0).values
    z1 = (sum1 * torch.exp2(m2 - top)).sum(dim=0)
    # tau == 1: the kernels store sumt = sum1, and the same ops keep zt bit-identical to z1 (LSE_tau == LSE_1)
    zt = (sumt * torch.exp2((m2 - top) / tau)).sum(dim=0)
    m = torch.where(z1 > 0, top * math.log(2.0), float("-inf"))
    return m, z1, zt


def _sorted_entries(ids: Tensor, values: Tensor, n_items: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sparse entries [B, N] sorted by item for the item-gradient kernel: (items, rows, values, bounds),
    bounds[i] = first entry with item >= i * SPARSE_GRANULE; the -1 entries sort first and fall outside."""
    n = ids.shape[1]
    items, order = torch.sort(ids.reshape(-1))
    bounds = torch.searchsorted(items, torch.arange(triton.cdiv(n_items, SPARSE_GRANULE) + 1, device=ids.device)
                                * SPARSE_GRANULE)
    return items, (order // n).contiguous(), values.reshape(-1)[order].contiguous(), bounds


def linear_grads(user: Tensor, item: Tensor, bias: Tensor | None, g1: Tensor, gt: Tensor, lse1: Tensor,
                 lset: Tensor, tau: float, ids: Tensor, values: Tensor,
                 grad_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dS @ item [B, d] float32, dS^T @ user [C, d], column sums of dS [C] or None without a bias) for the
    logits s = user @ item.T (+ bias), never holding [B, C], where
      dS_bj = g1_b exp(s_bj - lse1_b) + gt_b exp(s_bj / tau - lset_b) + sum of ``values`` at (b, ids == j);
    g1, gt, lse1, lset [B] and values [B, N] float32, ids [B, N] int64 (-1 = no entry, duplicates add).
    The item-side gradients come in ``grad_dtype``. tau == 1 takes the one-exp path: lset must equal lse1."""
    batch, dim = user.shape
    n_items = item.shape[0]
    if batch == 0 or n_items == 0:  # an empty dS
        zeros = dict(dtype=grad_dtype, device=user.device)
        return (torch.zeros((batch, dim), dtype=torch.float32, device=user.device), torch.zeros(item.shape, **zeros),
                torch.zeros(n_items, **zeros) if bias is not None else None)
    # the kernels write every element: no zero fill of the (catalog-sized) item gradient
    d_item = torch.empty(item.shape, dtype=grad_dtype, device=user.device)
    d_bias = torch.empty(n_items, dtype=grad_dtype, device=user.device) if bias is not None else None
    common = _tile_args(user, tau, bias)
    bias_arg = user if bias is None else bias  # never read without a bias
    splits = catalog_splits(batch, n_items, user.device)
    d_user_parts = torch.empty((splits, batch, dim), dtype=torch.float32, device=user.device)
    _lin_grad_user_kernel[lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), splits)](
        user, item, bias_arg, g1, gt, lse1, lset, ids, values, d_user_parts,
        batch, n_items, dim, ids.shape[1], splits, user.stride(0), item.stride(0), tau, **common,
    )
    d_user = d_user_parts.sum(dim=0)

    items, entry_rows, entry_values, bounds = _sorted_entries(ids, values, n_items)
    _lin_grad_item_kernel[lambda meta: (triton.cdiv(n_items, meta["BLOCK_C"]),)](
        user, item, bias_arg, g1, gt, lse1, lset,
        items, entry_rows, entry_values, bounds, d_item, d_item if d_bias is None else d_bias,
        batch, n_items, dim, bounds.numel(), user.stride(0), item.stride(0), tau,
        GRANULE=SPARSE_GRANULE, CHUNK=ENTRY_CHUNK, **common,
    )
    return d_user, d_item, d_bias


class _KDLossLinearRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, target: Tensor,
                teacher_ids: Tensor, teacher_scores: Tensor, teacher_weights: Tensor,
                rank_weights: Tensor | None, temperature: float, lambda_ce: float, lambda_kd: float,
                lambda_rank: float) -> Tensor:
        batch, dim = user_emb.shape
        tau = float(temperature)
        teachers = TeacherInputs(teacher_ids, teacher_scores, teacher_weights, rank_weights, lambda_rank)
        target = target.detach().to(torch.int64).contiguous()
        bias = item_bias.contiguous() if item_bias is not None else None
        loss = torch.empty(batch, dtype=torch.float32, device=user_emb.device)
        wsum, lse1, lset = torch.empty((3, batch), dtype=torch.float32, device=user_emb.device).unbind(0)
        coef = torch.empty((batch, teachers.n_teachers, teachers.k_slots), dtype=torch.float32,
                           device=user_emb.device)
        m2, sum1, sumt = split_lse_stats(user_emb, item_emb, bias, tau)
        if batch > 0:
            _lin_terms_kernel[(batch,)](
                user_emb, item_emb, user_emb if bias is None else bias, target, teachers.ids, teachers.scores,
                teachers.weights, teachers.rank, m2, sum1, sumt, lse1, lset, loss, wsum, coef,
                batch, m2.shape[0], dim, teachers.n_teachers, teachers.k_slots, user_emb.stride(0),
                item_emb.stride(0), tau, float(lambda_ce), float(lambda_kd), float(lambda_rank),
                HAS_BIAS=bias is not None, HAS_RANK=teachers.has_rank, UNIT_TAU=tau == 1.0,
                BLOCK_S=max(2, triton.next_power_of_2(m2.shape[0])),
                BLOCK_T=teachers.block_t, BLOCK_K=teachers.block_k, BLOCK_D=GATHER_BLOCK_D,
            )
        ctx.save_for_backward(user_emb, item_emb, bias, target, teachers.ids, coef, lse1, lset, wsum)
        ctx.params = (tau, float(lambda_ce), float(lambda_kd))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        user_emb, item_emb, bias, target, ids, coef, lse1, lset, wsum = ctx.saved_tensors
        tau, lambda_ce, lambda_kd = ctx.params
        batch = user_emb.shape[0]
        n_slots = ids.shape[1] * ids.shape[2]
        g = grad_loss.detach()
        if g.dtype != torch.float32:
            g = g.to(torch.float32)
        f32 = dict(dtype=torch.float32, device=user_emb.device)
        g_dense = torch.empty((2, batch), **f32)
        entry_ids = torch.empty((batch, n_slots + 1), dtype=torch.int64, device=user_emb.device)
        entry_values = torch.empty((batch, n_slots + 1), **f32)
        if batch > 0:
            _lin_entries_kernel[(batch,)](
                g, g.stride(0), target, ids, coef, wsum, g_dense[0], g_dense[1], entry_ids, entry_values,
                n_slots, tau, lambda_ce, lambda_kd, BLOCK_N=min(128, triton.next_power_of_2(max(n_slots, 1))),
            )
        d_user, d_item, d_bias = linear_grads(user_emb, item_emb, bias, g_dense[0], g_dense[1], lse1,
                                              lset, tau, entry_ids, entry_values, item_emb.dtype)
        return (d_user.to(user_emb.dtype), d_item, d_bias) + (None,) * 9


def kd_loss_linear_rows(
    user_emb: Tensor,
    item_emb: Tensor,
    item_bias: Tensor | None,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None,
    temperature: float,
    lambda_ce: float,
    lambda_kd: float,
    lambda_rank: float,
) -> Tensor:
    """Per-row loss [B] float32 of ``kd_loss`` on ``user_emb @ item_emb.T (+ item_bias)``, never
    materialising [B, C]; autograd gives d user_emb, d item_emb, d item_bias (each in its own dtype).

    user_emb [B, d] and item_emb [C, d] float32 or bfloat16 (the same dtype),
    item_bias [C] or None; the other arguments as in ``prmkd_dist.kernels.kd_loss.kd_loss_rows``."""
    check_embeddings("kd_loss_linear_rows", user_emb, item_emb)
    # no-ops for the usual contiguous inputs; the gradients are allocated with the same layout
    user_emb, item_emb = user_emb.contiguous(), item_emb.contiguous()
    return _KDLossLinearRows.apply(user_emb, item_emb, item_bias, target, teacher_ids, teacher_scores,
                                   teacher_weights, rank_weights, temperature, lambda_ce, lambda_kd, lambda_rank)
