"""Reference backend of the distillation loss: plain PyTorch, the definition every backend is tested against.

The loss is defined in /work/shared/specs/kd-loss.md; the backend contract (argument shapes and dtypes,
the per-row output) is in the docstring of :mod:`prmkd_dist.distill.loss`. These functions receive
inputs that the dispatcher has already validated and normalised; they do not check them again.

Numerics: every log-sum-exp is computed with ``torch.logsumexp`` (max-shifted), bfloat16 logits are
upcast to float32 before any arithmetic, and float64 logits stay float64 (for ``gradcheck``).
``kd_loss_linear_rows`` materialises ``[B, C]`` on purpose: a reference is allowed to be slow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kd_loss_rows", "kd_loss_linear_rows", "kd_rows_from_stats", "compute_dtype", "catalog_local_stats",
           "catalog_local_grad", "selected_logits"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in for inputs of ``dtype``: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _teacher_log_probs(teacher_scores: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """log p_btk = log softmax over the valid slots of scores / tau; 0 on empty slots (and empty teachers)."""
    z = teacher_scores / temperature
    z = z.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(z, dim=2, keepdim=True)
    # a teacher with no valid slot has lse = -inf; any finite value keeps its (masked) terms finite
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.where(valid, z - lse, torch.zeros_like(z))


def _normalised_rank_weights(rank_weights: Tensor, valid: Tensor) -> Tensor:
    """rho_hat_btk = rank_weights / sum over valid slots; 0 on empty slots and where that sum is 0."""
    rw = torch.where(valid, rank_weights, torch.zeros_like(rank_weights))
    total = rw.sum(dim=2, keepdim=True)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, rw / safe, torch.zeros_like(rw))


def kd_rows_from_stats(
    lse1: Tensor,
    lse_tau: Tensor | None,
    s_target: Tensor,
    s_ids: Tensor,
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
    """The row loss ``l_b`` from the few per-row statistics it depends on: the one place the formula lives.

    ``lse1`` [B] = log sum_j exp(s_j); ``lse_tau`` [B] = log sum_j exp(s_j / tau) (may be None when
    ``lambda_kd == 0`` or T*K == 0); ``s_target`` [B] = s at target (any finite value where target = -1);
    ``s_ids`` [B, T, K] = s at teacher_ids (any finite value on empty slots). The full-logits reference and the
    catalog-parallel form both reduce to this, so they cannot disagree on semantics."""
    tau = float(temperature)
    cdt = lse1.dtype
    has_target = target >= 0
    loss = lambda_ce * torch.where(has_target, lse1 - s_target, torch.zeros_like(s_target))

    n_teachers, k_slots = teacher_ids.shape[1], teacher_ids.shape[2]
    if n_teachers == 0 or k_slots == 0:
        return loss

    # teacher-side quantities are constants: no gradient flows to scores or weights
    valid = teacher_ids >= 0
    weights = teacher_weights.detach().to(cdt)
    if lambda_kd != 0.0:
        if lse_tau is None:
            raise ValueError("lse_tau is required when lambda_kd != 0 and there are teacher slots")
        log_p = _teacher_log_probs(teacher_scores.detach().to(cdt), valid, tau)
        p = torch.where(valid, log_p.exp(), torch.zeros_like(log_p))
        log_q = s_ids / tau - lse_tau[:, None, None]
        kl = (p * (log_p - log_q)).sum(dim=2)  # p = 0 on empty slots, so they add nothing
        loss = loss + lambda_kd * tau * tau * (weights * kl).sum(dim=1)

    if lambda_rank != 0.0 and rank_weights is not None:
        rho = _normalised_rank_weights(rank_weights.detach().to(cdt), valid)
        rank = -(rho * F.logsigmoid(s_ids)).sum(dim=2)
        loss = loss + lambda_rank * (weights * rank).sum(dim=1)
    return loss


def kd_rows_from_sel(
    lse1: Tensor,
    lse_tau: Tensor | None,
    sel: Tensor,
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
    """``kd_rows_from_stats`` with the selected logits in one tensor ``sel`` [B, 1 + T*K]: column 0 at the
    target, column 1 + t*K + k at teacher slot (t, k) (how the catalog-parallel loss gathers them)."""
    return kd_rows_from_stats(lse1, lse_tau, sel[:, 0], sel[:, 1:].reshape(teacher_ids.shape), target, teacher_ids,
                              teacher_scores, teacher_weights, rank_weights, temperature, lambda_ce, lambda_kd,
                              lambda_rank)


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
) -> Tensor:
    """Per-row distillation loss ``l_b`` [B] (float32, or float64 for float64 logits), with autograd to ``logits``.

    Shapes: logits [B, C], target [B], teacher_ids / teacher_scores / rank_weights [B, T, K],
    teacher_weights [B, T]; T = 0 or K = 0 leaves the cross-entropy only."""
    s = logits.to(compute_dtype(logits.dtype))
    batch = s.shape[0]
    s_target = s.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
    # reshape(batch, T*K), not (batch, -1): the latter is ambiguous for B = 0
    s_ids = s.gather(1, teacher_ids.clamp(min=0).reshape(batch, teacher_ids.shape[1] * teacher_ids.shape[2])).reshape(teacher_ids.shape)
    needs_tau = lambda_kd != 0.0 and teacher_ids.numel() > 0
    lse_tau = torch.logsumexp(s / float(temperature), dim=1) if needs_tau else None
    return kd_rows_from_stats(torch.logsumexp(s, dim=1), lse_tau, s_target, s_ids, target, teacher_ids,
                              teacher_scores, teacher_weights, rank_weights, temperature, lambda_ce,
                              lambda_kd, lambda_rank)


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
    """Per-row loss of ``kd_loss_rows`` on ``logits = user_emb @ item_emb.T (+ item_bias)``, computed in
    float32 (float64 for float64 embeddings); gradients flow to user_emb, item_emb and item_bias."""
    cdt = compute_dtype(user_emb.dtype)
    logits = user_emb.to(cdt) @ item_emb.to(cdt).T
    if item_bias is not None:
        logits = logits + item_bias.to(cdt)
    return kd_loss_rows(logits, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                        temperature, lambda_ce, lambda_kd, lambda_rank)


# ------------------------------------------------------------------------- catalog-parallel local part
# The per-rank pieces of :mod:`prmkd_dist.parallel.catalog_loss` (the item table split by rows over ranks).
# This chunked PyTorch form is the reference of the fused ones (``torch.ops.prmkd.kd_catalog_local_*`` and
# ``prmkd_dist.kernels.kd_catalog_local``); it walks the shard in chunks of ``chunk_rows`` rows so that
# [B, R] logits are never held at once.

def _shard_logits(u: Tensor, item: Tensor, bias: Tensor | None, lo: int, hi: int, cdt: torch.dtype) -> Tensor:
    """Logits of shard rows [lo, hi) for every user, in the compute dtype: [B, hi - lo]."""
    s = u @ item[lo:hi].to(cdt).T
    if bias is not None:
        s = s + bias[lo:hi].to(cdt)
    return s


SEL_CHUNK_ROWS = 128
"""Rows per block of the selected-logits gather: a block's [128, M, d] item rows stay in cache (one
[6400, 151, 64] gather took 2.2x as long on the 2-core CPU: 337 ms against 151 ms, benchmarks/profile_catalog_loss.py)."""


def selected_logits(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, sel_idx: Tensor) -> Tensor:
    """[B, M] logits u_b . item[sel_idx[b, m]] (+ bias) in the compute dtype, 0 where ``sel_idx`` is -1;
    the item rows are gathered 128 user rows at a time, never all [B, M, d] at once."""
    cdt = compute_dtype(user_emb.dtype)
    u = user_emb.detach().to(cdt)
    batch, m = sel_idx.shape
    out = torch.zeros((batch, m), dtype=cdt, device=u.device)
    if item_emb.shape[0] == 0 or m == 0:
        return out
    valid = sel_idx >= 0
    idx = torch.where(valid, sel_idx, torch.zeros_like(sel_idx))
    for lo in range(0, batch, SEL_CHUNK_ROWS):
        hi = min(lo + SEL_CHUNK_ROWS, batch)
        rows = item_emb.detach().index_select(0, idx[lo:hi].reshape(-1)).view(hi - lo, m, -1).to(cdt)
        out[lo:hi] = torch.bmm(rows, u[lo:hi].unsqueeze(2)).squeeze(2)
    if item_bias is not None:
        out = out + item_bias.detach()[idx].to(cdt)
    return torch.where(valid, out, torch.zeros_like(out))


def shard_local_ids(ids: Tensor, id_offset: int, rows: int) -> Tensor:
    """Global item ids -> rows of the shard holding items [id_offset, id_offset + rows); -1 for every id that
    is not on it (-1 = none, or another shard's item). A new int64 tensor."""
    local = ids.to(torch.int64) - int(id_offset)
    return local.masked_fill_((local < 0) | (local >= rows), -1)


def catalog_local_stats(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, temperature: float,
                        chunk_rows: int, sel_idx: Tensor | None = None, id_offset: int = 0
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-row statistics of the local logits s = user_emb @ item_emb.T (+ item_bias) over the R shard rows:
    (m [B] = max_j s_j, sum_j exp(s_j - m), sum_j exp((s_j - m) / tau)), in the compute dtype. With R = 0:
    m = -inf and both sums 0. Both sums share one max, so a single max all-reduce merges them across ranks.
    Fourth: the logits at the GLOBAL ids ``sel_idx`` [B, M] that are on this shard (it holds items
    [id_offset, id_offset + R)), 0 at every other entry (-1 = none, other shards' items); None without ``sel_idx``."""
    cdt = compute_dtype(user_emb.dtype)
    u = user_emb.detach().to(cdt)
    batch, rows = u.shape[0], item_emb.shape[0]
    tau = float(temperature)
    m = torch.full((batch,), float("-inf"), dtype=cdt, device=u.device)
    z1, zt = torch.zeros_like(m), torch.zeros_like(m)
    with torch.no_grad():
        for lo in range(0, rows, chunk_rows):
            s = _shard_logits(u, item_emb.detach(), None if item_bias is None else item_bias.detach(), lo,
                              min(lo + chunk_rows, rows), cdt)
            new_m = torch.maximum(m, s.max(dim=1).values)
            # -inf - -inf is nan: the running sums are 0 while m is still -inf (before the first chunk)
            finite = torch.isfinite(m)
            d = torch.where(finite, m - new_m, torch.zeros_like(m))
            z1 = torch.where(finite, z1 * d.exp(), z1) + (s - new_m[:, None]).exp().sum(dim=1)
            zt = torch.where(finite, zt * (d / tau).exp(), zt) + ((s - new_m[:, None]) / tau).exp().sum(dim=1)
            m = new_m
    sel = None if sel_idx is None else selected_logits(user_emb, item_emb, item_bias,
                                                       shard_local_ids(sel_idx, id_offset, rows))
    return m, z1, zt, sel


def catalog_local_grad(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, coef_lse1: Tensor,
                       coef_lse_tau: Tensor, lse1: Tensor, lse_tau: Tensor, sparse_idx: Tensor, sparse_grad: Tensor,
                       temperature: float, chunk_rows: int, id_offset: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """The local chain rule of the catalog-parallel loss: with the GLOBAL ``lse1`` / ``lse_tau`` [B] and the
    upstream gradients ``coef_lse1`` = dL/dLSE_1, ``coef_lse_tau`` = dL/dLSE_tau [B] and ``sparse_grad`` [B, M]
    = dL/ds at the GLOBAL ids ``sparse_idx`` [B, M] (only those on this shard, items [id_offset, id_offset + R),
    count; -1 = none), the gradient of the local logits is
      dS_bj = coef_lse1_b softmax_1(s_b)_j + coef_lse_tau_b / tau softmax_tau(s_b)_j + sparse entries;
    returns (dS @ item_emb [B, d] (this shard's part of d user_emb), dS^T @ user_emb [R, d], column sums of
    dS [R] or None without a bias), in the compute dtype."""
    cdt = compute_dtype(user_emb.dtype)
    u = user_emb.detach().to(cdt)
    item = item_emb.detach()
    bias = None if item_bias is None else item_bias.detach()
    rows, tau = item.shape[0], float(temperature)
    g1, gt = coef_lse1.to(cdt), coef_lse_tau.to(cdt)
    l1, lt = lse1.to(cdt), lse_tau.to(cdt)
    grad_u = torch.zeros_like(u)
    grad_w = torch.zeros(item.shape, dtype=cdt, device=u.device)
    grad_b = torch.zeros(rows, dtype=cdt, device=u.device) if bias is not None else None
    for lo in range(0, rows, chunk_rows):
        hi = min(lo + chunk_rows, rows)
        s = _shard_logits(u, item, bias, lo, hi, cdt)
        gs = g1[:, None] * (s - l1[:, None]).exp() + (gt / tau)[:, None] * (s / tau - lt[:, None]).exp()
        grad_w[lo:hi] = gs.T @ u
        grad_u += gs @ item[lo:hi].to(cdt)
        if grad_b is not None:
            grad_b[lo:hi] = gs.sum(dim=0)
    sparse_idx = shard_local_ids(sparse_idx, id_offset, rows)
    owned = sparse_idx >= 0
    if rows > 0 and bool(owned.any()):
        idx = torch.where(owned, sparse_idx, torch.zeros_like(sparse_idx))
        g = torch.where(owned, sparse_grad.to(cdt), torch.zeros((), dtype=cdt, device=u.device))
        grad_w.index_add_(0, idx.reshape(-1), (g[:, :, None] * u[:, None, :]).reshape(-1, u.shape[1]))
        grad_u += torch.einsum("bm,bmd->bd", g, item[idx].to(cdt))
        if grad_b is not None:
            grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1))
    return grad_u, grad_w, grad_b
