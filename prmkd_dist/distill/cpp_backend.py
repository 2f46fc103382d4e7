"""C++ CPU backend of the distillation loss: autograd around the torch ops ``torch.ops.prmkd.*`` (csrc/).

The ops are registered by importing the extension ``prmkd_dist._C`` (built by ``pip install -e .`` /
``make install``). Forward and backward are separate ops (``kd_loss_fwd`` returns the per-row loss and the
two per-row log-sum-exps the backward needs); the ``torch.autograd.Function`` classes here chain them, so
the C++ side stays free of autograd and each op is an ordinary, testable function of tensors. Fake (meta)
kernels are registered so ``torch.compile`` can trace through the ops.

Semantics: /work/shared/specs/kd-loss.md and :mod:`prmkd_dist.distill.reference`; inputs arrive validated
and normalised by :mod:`prmkd_dist.distill.loss` (the backend contract is in its docstring).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["available", "kd_loss_rows", "kd_loss_linear_rows", "kd_rows_from_sel", "catalog_local_stats",
           "catalog_local_grad"]

try:
    import prmkd_dist._C  # noqa: F401  (registers torch.ops.prmkd.*)

    _IMPORT_ERROR = ""
except ImportError as exc:  # the extension was not built on this machine
    _IMPORT_ERROR = f"extension prmkd_dist._C not built ({type(exc).__name__}: {exc}); run `make install`"


def available() -> tuple[bool, str]:
    """(True, "") when the C++ ops are loaded, else (False, why)."""
    return (not _IMPORT_ERROR, _IMPORT_ERROR)


def _teacher_args(teacher_ids: Tensor, teacher_scores: Tensor, teacher_weights: Tensor,
                  rank_weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    # the ops take float32 teacher inputs; the dispatcher already sends them so, this keeps direct callers safe
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    rank = None if rank_weights is None else f32(rank_weights)
    return teacher_ids.contiguous(), f32(teacher_scores), f32(teacher_weights), rank


class _KDLossRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                temperature, lambda_ce, lambda_kd, lambda_rank):
        loss, lse1, lse_tau = torch.ops.prmkd.kd_loss_fwd(
            logits, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
            temperature, lambda_ce, lambda_kd, lambda_rank)
        ctx.save_for_backward(logits, lse1, lse_tau, target, teacher_ids, teacher_scores, teacher_weights,
                              rank_weights)
        ctx.hparams = (temperature, lambda_ce, lambda_kd, lambda_rank)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        logits, lse1, lse_tau, target, ids, scores, weights, rank = ctx.saved_tensors
        grad = torch.ops.prmkd.kd_loss_bwd(grad_rows.to(torch.float32).contiguous(), logits, lse1, lse_tau,
                                           target, ids, scores, weights, rank, *ctx.hparams)
        return (grad,) + (None,) * 9


class _KDLossLinearRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, user_emb, item_emb, item_bias, target, teacher_ids, teacher_scores, teacher_weights,
                rank_weights, temperature, lambda_ce, lambda_kd, lambda_rank):
        loss, lse1, lse_tau = torch.ops.prmkd.kd_loss_linear_fwd(
            user_emb, item_emb, item_bias, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
            temperature, lambda_ce, lambda_kd, lambda_rank)
        ctx.save_for_backward(user_emb, item_emb, item_bias, lse1, lse_tau, target, teacher_ids, teacher_scores,
                              teacher_weights, rank_weights)
        ctx.hparams = (temperature, lambda_ce, lambda_kd, lambda_rank)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        if not any(ctx.needs_input_grad[:3]):
            return (None,) * 12
        user_emb, item_emb, item_bias, lse1, lse_tau, target, ids, scores, weights, rank = ctx.saved_tensors
        d_user, d_item, d_bias = torch.ops.prmkd.kd_loss_linear_bwd(
            grad_rows.to(torch.float32).contiguous(), user_emb, item_emb, item_bias, lse1, lse_tau,
            target, ids, scores, weights, rank, *ctx.hparams)
        return (d_user if ctx.needs_input_grad[0] else None,
                d_item if ctx.needs_input_grad[1] else None,
                d_bias if item_bias is not None and ctx.needs_input_grad[2] else None) + (None,) * 9


def kd_loss_rows(logits: Tensor, target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                 teacher_weights: Tensor, rank_weights: Tensor | None, temperature: float, lambda_ce: float,
                 lambda_kd: float, lambda_rank: float) -> Tensor:
    """Per-row loss l_b [B] float32 of logits [B, C] (float32 / bfloat16, CPU), differentiable wrt logits."""
    ids, scores, weights, rank = _teacher_args(teacher_ids, teacher_scores, teacher_weights, rank_weights)
    return _KDLossRows.apply(logits.contiguous(), target.contiguous(), ids, scores, weights, rank,
                             float(temperature), float(lambda_ce), float(lambda_kd), float(lambda_rank))


def kd_loss_linear_rows(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, target: Tensor,
                        teacher_ids: Tensor, teacher_scores: Tensor, teacher_weights: Tensor,
                        rank_weights: Tensor | None, temperature: float, lambda_ce: float, lambda_kd: float,
                        lambda_rank: float) -> Tensor:
    """Per-row loss l_b [B] float32 of logits = user_emb @ item_emb.T (+ item_bias), never materialising
    [B, C]; differentiable wrt user_emb, item_emb and item_bias."""
    ids, scores, weights, rank = _teacher_args(teacher_ids, teacher_scores, teacher_weights, rank_weights)
    bias = None if item_bias is None else item_bias.contiguous()
    return _KDLossLinearRows.apply(user_emb.contiguous(), item_emb.contiguous(), bias, target.contiguous(), ids,
                                   scores, weights, rank, float(temperature), float(lambda_ce),
                                   float(lambda_kd), float(lambda_rank))


class _KDRowsFromSel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lse1, lse_tau, sel, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                temperature, lambda_ce, lambda_kd, lambda_rank):
        loss = torch.ops.prmkd.kd_rows_fwd(lse1, lse_tau, sel, target, teacher_ids, teacher_scores, teacher_weights,
                                           rank_weights, temperature, lambda_ce, lambda_kd, lambda_rank)
        ctx.save_for_backward(sel, target, teacher_ids, teacher_scores, teacher_weights, rank_weights)
        ctx.hparams = (temperature, lambda_ce, lambda_kd, lambda_rank)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        sel, target, ids, scores, weights, rank = ctx.saved_tensors
        g1, gt, gs = torch.ops.prmkd.kd_rows_bwd(grad_rows.to(torch.float32).contiguous(), sel, target, ids, scores,
                                                 weights, rank, *ctx.hparams)
        return (g1, gt, gs) + (None,) * 9


def kd_rows_from_sel(lse1: Tensor, lse_tau: Tensor | None, sel: Tensor, target: Tensor, teacher_ids: Tensor,
                     teacher_scores: Tensor, teacher_weights: Tensor, rank_weights: Tensor | None, temperature: float,
                     lambda_ce: float, lambda_kd: float, lambda_rank: float) -> Tensor:
    """``reference.kd_rows_from_sel`` (the row loss from LSE_1, LSE_tau and the logits ``sel`` [B, 1 + T*K] at
    the target and the teacher slots) by the C++ op: one pass per row instead of a dozen [B, T, K] tensor
    ops, differentiable wrt lse1, lse_tau and sel. float32 statistics; others go to the reference."""
    if not (lse1.dtype == sel.dtype == torch.float32 and lse1.device.type == "cpu"):
        from prmkd_dist.distill.reference import kd_rows_from_sel as reference_rows

        return reference_rows(lse1, lse_tau, sel, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                              temperature, lambda_ce, lambda_kd, lambda_rank)
    ids, scores, weights, rank = _teacher_args(teacher_ids, teacher_scores, teacher_weights, rank_weights)
    lt = lse1 if lse_tau is None else lse_tau  # not read when lambda_kd == 0 or there are no teacher slots
    return _KDRowsFromSel.apply(lse1.contiguous(), lt.to(torch.float32).contiguous(), sel.contiguous(),
                                target.contiguous(), ids, scores, weights, rank, float(temperature), float(lambda_ce),
                                float(lambda_kd), float(lambda_rank))


# the catalog-local ops also take the selected ids in CSR form (``sel_ptr`` / ``sparse_ptr``): the routed ids of
# prmkd_dist.parallel.routing go in as they arrive (other backends get them as a padded dense matrix)
CSR_SELECTED = True


def catalog_local_stats(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, temperature: float,
                        chunk_rows: int | None = None, sel_idx: Tensor | None = None, id_offset: int = 0,
                        sel_ptr: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The catalog-parallel local statistics (see ``reference.catalog_local_stats``) by the fused C++ op:
    float64 (max, sum-exp at 1, sum-exp at tau) [B], without holding [B, R], and the float32 logits at
    GLOBAL ids ``sel_idx`` on this shard (items [id_offset, id_offset + R), picked out of the logits tiles as the
    pass forms them; the op skips the others, so the caller never maps ids). ``sel_idx`` is [B, M], or [E] in CSR
    form with ``sel_ptr`` [B + 1] (row b's ids at sel_ptr[b] .. sel_ptr[b + 1] - 1; the logits then [E]).
    ``chunk_rows`` is unused (the op tiles by itself); float32 / bfloat16 embeddings."""
    bias = None if item_bias is None else item_bias.detach().contiguous()
    # CSR ids may stay int32 (the routed ids arrive so); the dense form is int64
    idx = None if sel_idx is None else (sel_idx if sel_ptr is not None and sel_idx.dtype == torch.int32
                                        else sel_idx.to(torch.int64)).contiguous()
    ptr = None if sel_ptr is None else sel_ptr.to(torch.int64).contiguous()
    m, z1, zt, sel = torch.ops.prmkd.kd_catalog_local_stats(
        user_emb.detach().contiguous(), item_emb.detach().contiguous(), bias, float(temperature), idx, int(id_offset),
        ptr)
    return m, z1, zt, (sel if sel_idx is not None else None)


def catalog_local_grad(user_emb: Tensor, item_emb: Tensor, item_bias: Tensor | None, coef_lse1: Tensor,
                       coef_lse_tau: Tensor, lse1: Tensor, lse_tau: Tensor, sparse_idx: Tensor, sparse_grad: Tensor,
                       temperature: float, chunk_rows: int | None = None, id_offset: int = 0,
                       sparse_ptr: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The catalog-parallel local gradients (see ``reference.catalog_local_grad``; ``sparse_idx`` global ids, the
    op keeps this shard's; [B, M], or [E] in CSR form with ``sparse_ptr`` [B + 1], ``sparse_grad`` of its shape) by
    the fused C++ op, tile by tile: (local d user_emb [B, d], d item_emb [R, d], d item_bias [R] or None), float32."""
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    bias = None if item_bias is None else item_bias.detach().contiguous()
    ptr = None if sparse_ptr is None else sparse_ptr.to(torch.int64).contiguous()
    idx = (sparse_idx if ptr is not None and sparse_idx.dtype == torch.int32
           else sparse_idx.to(torch.int64)).contiguous()
    d_user, d_item, d_bias = torch.ops.prmkd.kd_catalog_local_grad(
        user_emb.detach().contiguous(), item_emb.detach().contiguous(), bias, f32(coef_lse1), f32(coef_lse_tau),
        f32(lse1), f32(lse_tau), idx, f32(sparse_grad), float(temperature),
        int(id_offset), ptr)
    return d_user, d_item, (d_bias if item_bias is not None else None)


if not _IMPORT_ERROR:
    # shapes only, no data: lets torch.compile / FakeTensor trace through the ops

    @torch.library.register_fake("prmkd::kd_loss_fwd")
    def _kd_loss_fwd_fake(logits, target, teacher_ids, teacher_scores, teacher_weights, rank_weights,
                          temperature, lambda_ce, lambda_kd, lambda_rank):
        rows = logits.new_empty((logits.shape[0],), dtype=torch.float32)
        return rows, torch.empty_like(rows), torch.empty_like(rows)

    @torch.library.register_fake("prmkd::kd_loss_bwd")
    def _kd_loss_bwd_fake(grad_rows, logits, *_):
        return torch.empty_like(logits)

    @torch.library.register_fake("prmkd::kd_loss_linear_fwd")
    def _kd_loss_linear_fwd_fake(user_emb, *_):
        rows = user_emb.new_empty((user_emb.shape[0],), dtype=torch.float32)
        return rows, torch.empty_like(rows), torch.empty_like(rows)

    @torch.library.register_fake("prmkd::kd_loss_linear_bwd")
    def _kd_loss_linear_bwd_fake(grad_rows, user_emb, item_emb, item_bias, *_):
        d_bias = item_bias.new_empty(item_bias.shape) if item_bias is not None else \
            user_emb.new_empty((0,), dtype=torch.float32)
        return torch.empty_like(user_emb), torch.empty_like(item_emb), d_bias

    @torch.library.register_fake("prmkd::kd_rows_fwd")
    def _kd_rows_fwd_fake(lse1, *_):
        return torch.empty_like(lse1)

    @torch.library.register_fake("prmkd::kd_rows_bwd")
    def _kd_rows_bwd_fake(grad_rows, sel, *_):
        return torch.empty_like(grad_rows), torch.empty_like(grad_rows), torch.empty_like(sel)

    @torch.library.register_fake("prmkd::kd_catalog_local_stats")
    def _kd_catalog_local_stats_fake(user_emb, item_emb, item_bias, temperature, sel_idx=None, id_offset=0,
                                     sel_ptr=None):
        m = user_emb.new_empty((user_emb.shape[0],), dtype=torch.float64)
        if sel_ptr is not None:
            shape = (sel_idx.shape[0],)
        else:
            shape = (user_emb.shape[0], sel_idx.shape[1] if sel_idx is not None else 0)
        return m, torch.empty_like(m), torch.empty_like(m), user_emb.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("prmkd::kd_catalog_local_grad")
    def _kd_catalog_local_grad_fake(user_emb, item_emb, item_bias, *_):
        d_bias = item_emb.new_empty((item_emb.shape[0] if item_bias is not None else 0,), dtype=torch.float32)
        return (user_emb.new_empty(user_emb.shape, dtype=torch.float32),
                item_emb.new_empty(item_emb.shape, dtype=torch.float32), d_bias)
