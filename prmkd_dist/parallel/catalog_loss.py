"""Catalog-parallel distillation loss: ``kd_loss_linear`` with the item table split by rows over a process group.

Contract
--------
- Every rank of ``group`` holds the SAME batch: ``user_emb`` [B, d], ``target``, the teacher tensors and
  the weights are replicated (identical on every rank). The rows of the catalog are split: a rank holds
  ``item_emb_shard`` [R, d] = rows [item_offset, item_offset + R) of the full [C, d] table (and
  ``item_bias_shard`` [R] of the bias). The ranks' ranges tile [0, num_items) exactly, without overlap;
  ranks may hold R = 0 rows.
- Ids stay global (0..C-1, -1 = empty): the rank whose range contains an id *owns* it and is the only one
  that computes its logit; the others contribute 0 to a sum all-reduce.
- The loss is the one of :func:`prmkd_dist.kd_loss_linear` on the full table, identical on every rank.
  The partial max and sum-exp of LSE_1 and LSE_tau are all-reduced (max, then sum), the logits at the
  target and teacher ids come from their owners; then every rank evaluates the same row formula
  (:func:`prmkd_dist.distill.reference.kd_rows_from_stats`, so the semantics live in one place; the C++ backend
  evaluates the same formula in one fused op, ``torch.ops.prmkd.kd_rows_*``, tested against it).
- Gradients: each rank receives the gradient of the loss w.r.t. its OWN rows (``item_emb_shard``,
  ``item_bias_shard``), and the FULL gradient w.r.t. ``user_emb``: the local contributions of all ranks
  are all-reduced (summed) in backward, so ``user_emb.grad`` is identical on every rank and equals the
  single-process gradient. Consequently a replicated user tower receives identical, complete gradients on
  every rank and must NOT be averaged again over this group as if the ranks had seen different data
  (averaging identical values is harmless; summing them is not).
- Every rank must call this function (it runs collectives) and then ``backward`` on its result.

Data-parallel batches (``local_batch=True``): each rank passes its OWN rows (``user_emb`` [b_r, d] and its
targets and teacher tensors; b_r may differ between ranks) and the loss is the one of the concatenated global
batch (ranks in order). The user rows are all-gathered and every rank scores all rows against its shard as
above; each of the [b_r, 1 + T*K] selected ids is sent to the rank that owns it only, which returns its logit
(two all-to-alls, prmkd_dist/parallel/routing.py; the teacher scores and weights never travel), so each rank
picks the logits of its own share of the entries and evaluates the row formula for its own rows only (the
parts of the step that grew with the world size when every rank saw every rank's ids). The returned value is
the global-batch loss on every rank ("mean" divides by the global batch); its gradient on rank r is that of
rank r's rows' share, which is what data parallelism wants: backward all-gathers the rows' LSE gradients (each
shard needs all of them for its rows' gradient, which comes out complete), routes the selected logits'
gradients to their owners as in forward, and reduce-scatters the user-row gradients, so ``user_emb.grad`` is the full gradient of the global loss w.r.t. this rank's rows. The dense
gradients behind ``user_emb`` are then partial sums over ranks, to be SUMMED (not averaged) across ranks.
``reduction="none"`` returns the rank's own rows' losses [b_r].

Local part and backends: a rank's share of the statistics (local max and sum-exp at 1 and tau) and, in
backward, the gradient of its local logits (turned into its part of d user_emb and the gradients of its own
rows) come from ``catalog_local_stats`` / ``catalog_local_grad`` of the backend chosen by
:func:`prmkd_dist.distill.loss.resolve_backend` (``op="catalog_local"``, the one place that decides):
"auto" takes the Triton kernels on CUDA (float32 / bfloat16: ``prmkd_dist.kernels.kd_catalog_local``, the
fused-linear kernels of ``kd_loss_linear`` run on the shard), the fused C++ op on CPU (float32 / bfloat16:
``torch.ops.prmkd.kd_catalog_local_*``, tiled over the shard like ``kd_loss_linear``'s C++ op) and the chunked
PyTorch reference otherwise (float64). None holds the [B, R] logits at once: the reference walks the local
rows in chunks of ``chunk_rows`` (online max / sum-exp forward, recompute in backward), so the working set is
O(B * chunk_rows + B * T * K * d) whatever the catalog size; the C++ op and the Triton kernels in tiles.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from prmkd_dist.distill.loss import (
    check_finite,
    check_hyperparameters,
    check_loss_inputs,
    normalise_teacher_inputs,
    reduce_rows,
    resolve_backend,
)
from prmkd_dist.distill.reference import compute_dtype, kd_rows_from_sel
from prmkd_dist.parallel.collectives import all_gather_dim0, reduce_scatter_dim0
from prmkd_dist.parallel.routing import RoutedIds, route_ids

__all__ = ["kd_loss_linear_catalog_parallel", "default_chunk_rows"]

_CHUNK_ELEMENTS = 1 << 22  # logits held per chunk: 16 MiB in float32


def default_chunk_rows(batch: int) -> int:
    """Local catalog rows per chunk so that a [B, chunk] block of logits holds about 4M values."""
    return max(64, _CHUNK_ELEMENTS // max(batch, 1))


class _CatalogStats(torch.autograd.Function):
    """(u, W_local, b_local) -> (LSE_1 [B], LSE_tau [B], logits at the selected ids [B, M]: the target, then the
    teachers' slots), all global.

    ``local`` is the backend module (``catalog_local_stats`` / ``catalog_local_grad``). Replicated batches
    (``layout`` None): backward assumes (as the contract guarantees) that the upstream gradients are identical on
    all ranks: then the gradient of a sum all-reduce w.r.t. each rank's input is the upstream gradient itself, and
    the gradient of the log-sum-exp w.r.t. a local logit is its global softmax probability. Data-parallel batches
    (``layout`` = (sizes, lo, hi), several ranks): the outputs are the rank's own rows'; each selected id is
    routed to its owner and its logit back (prmkd_dist/parallel/routing.py), and backward routes the logits'
    gradients the same way."""

    @staticmethod
    def forward(ctx, u, w, b, tgt, slot_ids, item_offset, temperature, need_tau, chunk_rows, group, local, layout):
        # the selected ids of a row: its target, then its teachers' slots (slot_ids [B, T*K]); M = 1 + T*K
        cdt = compute_dtype(u.dtype)
        sel_ids = None
        # without a KL term LSE_tau is not needed: tau = 1 makes the local pass compute one exp per logit
        tau = float(temperature) if need_tau else 1.0
        routed = None
        with torch.no_grad():
            if layout is not None and len(layout[0]) > 1:  # each rank brought its own rows: score everybody's
                sizes, lo, hi = layout
                u = all_gather_dim0(u, sizes, group)
                # each selected id goes to its owner only, which receives its entries as a CSR over all rows
                # (the target goes in as the first column where it lies: no [B, M] concatenation)
                routed = route_ids(slot_ids, sizes, lo, hi, group, head=tgt)
                m, z1, zt, picked = _local_stats(local, u, w, b, tau, chunk_rows, routed)
            else:
                sel_ids = torch.cat([tgt[:, None], slot_ids], dim=1)
                # logits at the selected (global) ids: the owner computes them (in the same pass as its
                # statistics), everyone else adds 0 (the local part keeps the ids in [item_offset, item_offset +
                # rows) and skips the rest, -1 = empty included)
                m, z1, zt, sel = local.catalog_local_stats(u, w, b, tau, chunk_rows, sel_ids, item_offset)
            lse1, lse_tau = _global_lse(m, z1, zt, tau, group)
            lse1, lse_tau = lse1.to(cdt), lse_tau.to(cdt)
            if tau == 1.0:
                lse_tau = lse1.clone()  # the same quantity: bit-identical, as the fused op assumes at tau = 1
            if routed is None:
                sel = sel.to(cdt).contiguous()
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(sel, op=dist.ReduceOp.SUM, group=group)
            else:  # the owners' logits back to the rows' ranks: only the rank's own rows go on to the row formula
                sel = routed.to_senders(picked.to(cdt))

        ctx.save_for_backward(u, w, b if b is not None else torch.empty(0), lse1, lse_tau,
                              sel_ids if sel_ids is not None else torch.empty(0))
        ctx.n_selected = 1 + slot_ids.shape[1]
        ctx.has_bias = b is not None
        ctx.tau, ctx.need_tau, ctx.chunk_rows, ctx.group, ctx.local = tau, need_tau, chunk_rows, group, local
        ctx.routed, ctx.item_offset = routed, item_offset
        ctx.sizes = layout[0] if layout is not None else None
        if layout is not None:
            lo_row = sum(ctx.sizes[:dist.get_rank(group)])
            lse1, lse_tau = lse1[lo_row:lo_row + sel.shape[0]].clone(), lse_tau[lo_row:lo_row + sel.shape[0]].clone()
        return lse1, (lse_tau if need_tau else torch.zeros_like(lse1)), sel

    @staticmethod
    def backward(ctx, g_lse1, g_lse_tau, g_sel):
        u, w, b, lse1, lse_tau, sel_ids = ctx.saved_tensors
        b = b if ctx.has_bias else None
        sizes, routed = ctx.sizes, ctx.routed
        n_own = lse1.shape[0] if sizes is None else sizes[dist.get_rank(ctx.group)]
        zeros = lse1.new_zeros(n_own)
        g1 = g_lse1 if g_lse1 is not None else zeros
        gt = g_lse_tau if (g_lse_tau is not None and ctx.need_tau) else zeros
        if g_sel is None:
            g_sel = lse1.new_zeros((n_own, ctx.n_selected))
        if routed is not None:
            # every shard needs every row's LSE coefficients; the logits' gradients go to their owners only
            g_all = all_gather_dim0(torch.stack([g1, gt], dim=1).to(lse1.dtype), sizes, ctx.group)
            g1, gt = g_all[:, 0], g_all[:, 1]
            grad_u, grad_w, grad_b = _local_grad(ctx.local, u, w, b, g1, gt, lse1, lse_tau, ctx.tau, ctx.chunk_rows,
                                                 routed, routed.to_owners(g_sel.to(lse1.dtype)))
        else:
            # only the owner's rows are touched: every backend skips the entries that are not on its shard
            # (another rank's item or an empty slot), so g_sel goes in as it is
            grad_u, grad_w, grad_b = ctx.local.catalog_local_grad(u, w, b, g1, gt, lse1, lse_tau, sel_ids,
                                                                  g_sel.contiguous(), ctx.tau, ctx.chunk_rows,
                                                                  ctx.item_offset)
        # u's gradient is the sum of every rank's contribution (summed before any downcast): all of it when u is
        # replicated, each rank's own rows when it brought its own
        grad_u = grad_u.to(compute_dtype(u.dtype)).contiguous()
        if sizes is None:
            dist.all_reduce(grad_u, op=dist.ReduceOp.SUM, group=ctx.group)
        else:
            grad_u = reduce_scatter_dim0(grad_u, sizes, ctx.group)
        grad_b = grad_b.to(b.dtype) if (b is not None and grad_b is not None) else None
        return (grad_u.to(u.dtype), grad_w.to(w.dtype), grad_b) + (None,) * 9


def _local_stats(local, u, w, b, tau, chunk_rows, routed: RoutedIds):
    """The backend's local statistics with the routed entries (ids local to the shard): in CSR form where the
    backend takes it (the C++ op), else as a padded dense matrix, the logits read back per entry."""
    if getattr(local, "CSR_SELECTED", False):
        return local.catalog_local_stats(u, w, b, tau, chunk_rows, routed.ids, 0, sel_ptr=routed.ptr)
    dense, rows, cols = routed.dense()
    m, z1, zt, sel = local.catalog_local_stats(u, w, b, tau, chunk_rows, dense, 0)
    return m, z1, zt, sel[rows, cols]


def _local_grad(local, u, w, b, g1, gt, lse1, lse_tau, tau, chunk_rows, routed: RoutedIds, values: Tensor):
    """The backend's local gradients with the routed entries' upstream gradients ``values`` [E] (as above)."""
    if getattr(local, "CSR_SELECTED", False):
        return local.catalog_local_grad(u, w, b, g1, gt, lse1, lse_tau, routed.ids, values, tau, chunk_rows, 0,
                                        sparse_ptr=routed.ptr)
    dense, rows, cols = routed.dense()
    dense_values = values.new_zeros(dense.shape)
    dense_values[rows, cols] = values
    return local.catalog_local_grad(u, w, b, g1, gt, lse1, lse_tau, dense, dense_values, tau, chunk_rows, 0)


def _global_lse(m: Tensor, z1: Tensor, zt: Tensor, tau: float, group) -> tuple[Tensor, Tensor]:
    """(LSE_1, LSE_tau) [B] float64 over all ranks from each rank's local max ``m`` and sums
    ``z1`` = sum exp(s - m), ``zt`` = sum exp((s - m) / tau); ranks without rows send -inf / 0.
    One max and one (stacked) sum all-reduce, in float64 (the sums of far-apart ranks must not underflow
    early)."""
    m, z1, zt = m.to(torch.float64), z1.to(torch.float64), zt.to(torch.float64)
    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
    finite = torch.isfinite(m)
    d = torch.where(finite, m - gm, torch.zeros_like(m))  # -inf - finite is fine, but keep it explicit
    z = torch.stack([torch.where(finite, z1 * d.exp(), torch.zeros_like(z1)),
                     torch.where(finite, zt * (d / tau).exp(), torch.zeros_like(zt))])
    dist.all_reduce(z, op=dist.ReduceOp.SUM, group=group)
    return gm + z[0].log(), gm / tau + z[1].log()


def _gather_layout(batch: int, item_offset: int, rows: int, device: torch.device, group
                   ) -> tuple[list[int], list[tuple[int, int]]]:
    """Every rank's batch size and item range [offset, offset + rows), in rank order (one small all-gather)."""
    mine = torch.tensor([batch, item_offset, rows], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [int(p[0]) for p in parts], [(int(p[1]), int(p[1]) + int(p[2])) for p in parts]


def _check_tiling(ranges: list[tuple[int, int]], num_items: int) -> None:
    """Every rank's [offset, offset + rows) must tile [0, num_items) exactly."""
    spans = sorted((lo, hi, rank) for rank, (lo, hi) in enumerate(ranges) if hi > lo)
    expected = 0
    for lo, hi, rank in spans:
        if lo != expected:
            raise ValueError(f"item_emb_shard ranges do not tile [0, {num_items}): rank {rank} holds [{lo}, {hi}) "
                             f"but the next uncovered row is {expected} (all ranges: {ranges})")
        expected = hi
    if expected != num_items:
        raise ValueError(f"item_emb_shard ranges cover [0, {expected}), expected [0, {num_items}) "
                         f"(all ranges: {ranges})")


def kd_loss_linear_catalog_parallel(
    user_emb: Tensor,
    item_emb_shard: Tensor,
    item_offset: int,
    num_items: int,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None = None,
    *,
    item_bias_shard: Tensor | None = None,
    temperature: float = 1.0,
    lambda_ce: float = 1.0,
    lambda_kd: float = 1.0,
    lambda_rank: float = 0.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    check_inputs: bool = True,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
    local_batch: bool = False,
) -> Tensor:
    """``kd_loss_linear`` over a catalog split by rows across ``group`` (see the module docstring).

    ``user_emb`` [B, d] and the batch tensors are replicated; ``item_emb_shard`` [R, d] holds global item
    rows [item_offset, item_offset + R) (``item_bias_shard`` [R] likewise). Returns the same loss on every
    rank: a scalar, or [B] for ``reduction="none"``. ``backend`` picks the local part ("auto", "triton", "cpp"
    or "reference"; see the module docstring). ``chunk_rows`` bounds the [B, chunk_rows] logits block of the
    reference local part (default: about 4M values; the C++ op and the Triton kernels tile by themselves).
    ``check_inputs`` as in ``kd_loss`` (the data scans; it also verifies, with one small all-gather, that the
    ranks' ranges tile the catalog). ``local_batch``: each rank passes its own rows instead of the same batch
    (module docstring, "Data-parallel batches")."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kd_loss_linear_catalog_parallel needs an initialised torch.distributed process group")
    for name, x in (("user_emb", user_emb), ("item_emb_shard", item_emb_shard)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-d tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"{name} must be float32, bfloat16 or float64, got {x.dtype}")
    if user_emb.dtype != item_emb_shard.dtype:
        raise ValueError(f"user_emb ({user_emb.dtype}) and item_emb_shard ({item_emb_shard.dtype}) must share one dtype")
    if user_emb.shape[1] != item_emb_shard.shape[1]:
        raise ValueError(f"user_emb {tuple(user_emb.shape)} and item_emb_shard {tuple(item_emb_shard.shape)} must share d")
    if item_emb_shard.device != user_emb.device:
        raise ValueError(f"item_emb_shard is on {item_emb_shard.device}, user_emb on {user_emb.device}")
    rows = item_emb_shard.shape[0]
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if item_offset < 0 or item_offset + rows > num_items:
        raise ValueError(f"item_emb_shard rows [{item_offset}, {item_offset + rows}) fall outside [0, {num_items})")
    if item_bias_shard is not None:
        if item_bias_shard.shape != (rows,):
            raise ValueError(f"item_bias_shard must be [R] = [{rows}], got {tuple(item_bias_shard.shape)}")
        if item_bias_shard.dtype != item_emb_shard.dtype or item_bias_shard.device != item_emb_shard.device:
            raise ValueError("item_bias_shard must have the dtype and device of item_emb_shard")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(user_emb.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    check_hyperparameters(temperature, lambda_ce, lambda_kd, lambda_rank, reduction)
    batch = user_emb.shape[0]
    check_loss_inputs(num_items, batch, user_emb.device, target, teacher_ids, teacher_scores, teacher_weights,
                      rank_weights, check_inputs, allow_empty=local_batch)
    sizes, ranges = (_gather_layout(batch, int(item_offset), rows, user_emb.device, group)
                     if (local_batch or check_inputs) else (None, None))
    if not local_batch:
        sizes = None
    elif sum(sizes) == 0:
        raise ValueError("every rank's batch is empty (B = 0 on all ranks): the loss of no rows is undefined")
    if check_inputs:
        check_finite("user_emb", user_emb)
        check_finite("item_emb_shard", item_emb_shard)
        check_finite("item_bias_shard", item_bias_shard)
        _check_tiling(ranges, num_items)
    layout = None
    if sizes is not None:
        # data-parallel rows: with several ranks the selected ids are routed to their owners (routing.py); on one
        # rank the layout only sets the global-batch semantics
        lo = torch.tensor([r[0] for r in ranges], dtype=torch.int64)
        hi = torch.tensor([r[1] for r in ranges], dtype=torch.int64)
        layout = (sizes, lo, hi)

    local = resolve_backend(backend, user_emb.device, user_emb.dtype, op="catalog_local").module
    fdt = compute_dtype(user_emb.dtype)
    tgt, ids, scores, tw, rw = normalise_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights,
                                                        rank_weights, lambda_rank, fdt)
    n_slots = ids.shape[1] * ids.shape[2]
    need_tau = lambda_kd != 0.0 and n_slots > 0
    # one gather for the target and every teacher slot: [B, 1 + T*K] global ids (-1 = nothing to fetch)
    lse1, lse_tau, sel = _CatalogStats.apply(user_emb.contiguous(), item_emb_shard.contiguous(),
                                             item_bias_shard.contiguous() if item_bias_shard is not None else None,
                                             tgt, ids.reshape(batch, n_slots), int(item_offset), float(temperature),
                                             need_tau, int(chunk_rows), group, local, layout)
    # the row formula over the gathered statistics: the backend's fused op where it has one (C++), else the
    # reference's tensor ops (reference.kd_rows_from_stats: the one statement of the formula)
    rows_from_sel = getattr(local, "kd_rows_from_sel", kd_rows_from_sel)
    rows_loss = rows_from_sel(lse1, lse_tau if need_tau else None, sel, tgt, ids, scores, tw, rw, float(temperature),
                              float(lambda_ce), float(lambda_kd), float(lambda_rank))
    if sizes is None or reduction == "none":
        return reduce_rows(rows_loss, reduction)
    # this rank's share of the global-batch loss carries its gradient; the value is the global loss (one
    # scalar all-reduce), so every rank reports the same number
    share = rows_loss.sum() / (sum(sizes) if reduction == "mean" else 1)
    total = share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return share + (total - share.detach())
