"""Triton backend of the local part of the catalog-parallel loss (``prmkd_dist.parallel.catalog_loss``):
``catalog_local_stats`` / ``catalog_local_grad`` for one rank's shard of R item rows, never materialising
the [B, R] logits.

Semantics: ``prmkd_dist.distill.reference.catalog_local_stats`` / ``catalog_local_grad``; return types as the
C++ op's (``prmkd_dist.distill.cpp_backend``): float64 statistics, float32 logits and gradients.

The shard is streamed by the fused-linear kernels of ``kd_loss_linear.py``: the statistics are the per-split
LSE states of its LSE kernel merged on the host (``split_lse_stats`` / ``combine_splits``), the gradient is
``linear_grads`` with the dense factors g1 = coef_lse1, g_tau = coef_lse_tau / tau and the sparse entries
(sparse_idx, sparse_grad). The one kernel of this file gathers the logits at the selected rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from prmkd_dist.distill.reference import shard_local_ids
from prmkd_dist.kernels._common import GATHER_BLOCK_D, GATHER_BLOCK_M
from prmkd_dist.kernels.kd_loss_linear import (
    check_embeddings, combine_splits, gathered_logits, linear_grads, split_lse_stats,
)

__all__ = ["catalog_local_stats", "catalog_local_grad"]


@triton.jit
def _sel_logits_kernel(
    u_ptr, e_ptr, bias_ptr, ids_ptr, out_ptr,
    M, D, stride_u, stride_e,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """fp32 logits of one row at BLOCK_M of its M selected local rows (-1: 0), to out_ptr [B, M]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    in_row = cols < M
    ids = tl.load(ids_ptr + row * M + cols, mask=in_row, other=-1)
    s = gathered_logits(u_ptr, e_ptr, bias_ptr, row, ids, D, stride_u, stride_e, HAS_BIAS, BLOCK_D)
    tl.store(out_ptr + row * M + cols, s, mask=in_row)


def _operands(op: str, user_emb: Tensor, item_emb: Tensor,
              item_bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The embeddings checked, detached (the caller's autograd.Function owns the graph) and contiguous."""
    check_embeddings(op, user_emb, item_emb)
    bias = None if item_bias is None else item_bias.detach().contiguous()
    return user_emb.detach().contiguous(), item_emb.detach().contiguous(), bias


def catalog_local_stats(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, temperature: float,
                        chunk_rows: int | None = None, sel_idx: Tensor | None = None, id_offset: int = 0
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-row statistics of the shard's logits s = user_emb @ item_emb.T (+ item_bias): float64 (m [B] =
    max_j s_j, sum_j exp(s_j - m), sum_j exp((s_j - m) / tau)), m = -inf and sums 0 when R = 0; and the
    float32 logits at the GLOBAL ids ``sel_idx`` [B, M] on this shard (items [id_offset, id_offset + R); 0 at
    the others), or None without ``sel_idx``.
    float32 / bfloat16 embeddings (fp32 accumulation); ``chunk_rows`` is unused (the kernels tile by themselves)."""
    user, item, bias = _operands("catalog_local_stats", user_emb, item_emb, item_bias)
    tau = float(temperature)
    m, z1, zt = combine_splits(*split_lse_stats(user, item, bias, tau), tau, torch.float64)
    if sel_idx is None:
        return m, z1, zt, None
    batch, slots = sel_idx.shape
    sel = torch.zeros((batch, slots), dtype=torch.float32, device=user.device)
    if batch > 0 and slots > 0 and item.shape[0] > 0:  # an empty shard owns no row: all entries are -1
        _sel_logits_kernel[(batch, triton.cdiv(slots, GATHER_BLOCK_M))](
            user, item, user if bias is None else bias, shard_local_ids(sel_idx, id_offset, item.shape[0]), sel,
            slots, user.shape[1], user.stride(0), item.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=GATHER_BLOCK_M, BLOCK_D=GATHER_BLOCK_D,
        )
    return m, z1, zt, sel


def catalog_local_grad(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, coef_lse1: Tensor,
                       coef_lse_tau: Tensor, lse1: Tensor, lse_tau: Tensor, sparse_idx: Tensor, sparse_grad: Tensor,
                       temperature: float, chunk_rows: int | None = None, id_offset: int = 0
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """With the GLOBAL ``lse1`` / ``lse_tau`` [B] and upstream ``coef_lse1`` / ``coef_lse_tau`` [B] and
    ``sparse_grad`` [B, M] at the GLOBAL ids ``sparse_idx`` [B, M] (those on this shard, items [id_offset,
    id_offset + R), count; -1: none; duplicates add), the gradient of the
    local logits dS = coef_lse1 softmax_1 + coef_lse_tau / tau softmax_tau + sparse entries, returned as
    (dS @ item_emb [B, d], dS^T @ user_emb [R, d], column sums of dS [R] or None without a bias), float32,
    tile by tile. ``chunk_rows`` is unused."""
    user, item, bias = _operands("catalog_local_grad", user_emb, item_emb, item_bias)
    tau = float(temperature)
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    g1, gt, l1, lt = f32(coef_lse1), f32(coef_lse_tau) / tau, f32(lse1), f32(lse_tau)
    if tau == 1.0:
        # the one-exp path has one softmax, of lse1: gt exp(s - lt) = gt exp(lse1 - lt) exp(s - lse1) is exact
        # for any lse_tau (the catalog loss passes lse_tau == lse1, a factor of exactly 1)
        g1, gt = g1 + gt * torch.exp(l1 - lt), torch.zeros_like(gt)
    idx = shard_local_ids(sparse_idx, id_offset, item.shape[0])
    values = torch.where(idx >= 0, sparse_grad.to(torch.float32), 0.0)  # the value at a -1 entry may be anything
    if idx.shape[1] == 0:  # one empty column, so the kernels get real [B, N] buffers
        idx = torch.full((idx.shape[0], 1), -1, dtype=torch.int64, device=idx.device)
        values = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
    return linear_grads(user, item, bias, g1, gt, l1, lt, tau, idx.contiguous(), values.contiguous(), torch.float32)
