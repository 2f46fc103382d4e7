"""Sampled-softmax form of the distillation loss, for catalogs too large to score in full.

The loss of ``kd_loss_linear`` (``../shared/specs/kd-loss.md``) needs the logits at a row's candidates (its
target and its teachers' top-K: the "selected" ids) and the two log-partition functions LSE_1 and LSE_tau over
the whole catalog. Here the partitions are estimated from a set of negatives shared by the batch:

    Z_tau(b) = sum over the row's distinct candidates c of exp(s_bc / tau)
             + sum over the negatives j that are not among the row's candidates of exp(s_bj / tau) / p_j

where p_j is the probability that item j is in the negative set (``log_p``; the log-Q correction). With every
item outside the row's candidates in the set with p = 1 this is the exact partition, and the loss equals
``kd_loss_linear``'s (a test); with a sample it is the Horvitz-Thompson estimate of the non-candidate part. A
negative equal to one of the row's candidates (an accidental hit) is dropped for that row (the candidate already
counts exactly), and a candidate repeated in a row (two teachers agreeing, the target in a list) counts once.
Then the row formula is the reference's (``reference.kd_rows_from_sel``): the same CE, KL and ranking terms.

Only the candidates' and the negatives' embeddings are needed: [B, M, d] and [N, d], looked up by the caller
(the distributed engine looks them up through its sharded TorchRec table, so that the gradients reach the rows
of those items only).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from prmkd_dist.distill.loss import (
    check_finite,
    check_hyperparameters,
    check_ids,
    check_loss_inputs,
    normalise_teacher_inputs,
    reduce_rows,
    resolve_backend,
)
from prmkd_dist.distill.reference import kd_rows_from_sel

__all__ = ["kd_loss_sampled", "sample_negatives", "negative_generator", "negative_proposal", "selected_ids"]


def selected_ids(target: Tensor, teacher_ids: Tensor) -> Tensor:
    """A row's candidates [B, 1 + T*K]: its target, then its teachers' slots (-1 = empty), the column order of
    ``reference.kd_rows_from_sel``."""
    return torch.cat([target.reshape(-1, 1).to(torch.int64), teacher_ids.reshape(target.shape[0], -1).to(torch.int64)],
                     dim=1)


def negative_proposal(num_items: int, counts: np.ndarray | None = None, power: float = 0.75) -> Tensor:
    """The proposal q over the catalog [C] (float64, sums to 1): uniform, or proportional to
    ``counts ** power`` (training-set popularity; 0.75 as word2vec) with every item at least one count."""
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    if counts is None:
        return torch.full((num_items,), 1.0 / num_items, dtype=torch.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (num_items,) or not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"counts must be [{num_items}] finite and >= 0, got shape {counts.shape}")
    w = np.maximum(counts, 1.0) ** power
    return torch.from_numpy(w / w.sum())


def negative_generator(draw: int) -> torch.Generator:
    """The generator of a run's ``draw``-th negative set (0, 1, ...): seeded from the draw number alone, so that
    every rank draws the same set at the same step, whatever the world size, and a resumed run continues."""
    return torch.Generator().manual_seed(1_000_003 * (draw + 1) + 17)


def sample_negatives(proposal: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` draws with replacement from ``proposal`` [C], made distinct: (ids [N'] sorted ascending, N' <= n,
    log_p [N'] float64: log of each id's probability of being in such a set, 1 - (1 - q_j)^n). The same generator
    state gives the same set on every rank (the engine seeds it per step)."""
    if n < 1:
        raise ValueError(f"the number of negatives must be >= 1, got {n}")
    draws = torch.multinomial(proposal, n, replacement=True, generator=generator)
    ids = torch.unique(draws)  # sorted
    q = proposal[ids]
    # log(1 - (1 - q)^n) = log(-expm1(n * log1p(-q))), accurate for small q
    log_p = torch.log(-torch.expm1(n * torch.log1p(-q)))
    return ids, log_p


def _first_occurrence(ids: Tensor) -> Tensor:
    """[B, M] bool: True at each id's first slot in its row (later repeats and -1 False)."""
    srt, order = ids.sort(dim=1, stable=True)
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    out = torch.zeros_like(first)
    out.scatter_(1, order, first)
    return out & (ids >= 0)


def _hits(cand: Tensor, neg_ids: Tensor) -> Tensor:
    """[B, N] bool: negative j is one of row b's candidates (``neg_ids`` sorted, distinct)."""
    n = neg_ids.shape[0]
    pos = torch.searchsorted(neg_ids, cand.clamp_min(0)).clamp_max(max(n - 1, 0))
    found = (neg_ids[pos] == cand) & (cand >= 0) if n else torch.zeros_like(cand, dtype=torch.bool)
    hits = torch.zeros((cand.shape[0], n), dtype=torch.bool, device=cand.device)
    if n:
        rows = torch.arange(cand.shape[0], device=cand.device)[:, None].expand_as(cand)
        hits[rows[found], pos[found]] = True
    return hits


def kd_loss_sampled(
    user_emb: Tensor,
    cand_emb: Tensor,
    neg_emb: Tensor,
    neg_ids: Tensor,
    neg_log_p: Tensor,
    num_items: int,
    target: Tensor,
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    teacher_weights: Tensor,
    rank_weights: Tensor | None = None,
    *,
    cand_bias: Tensor | None = None,
    neg_bias: Tensor | None = None,
    temperature: float = 1.0,
    lambda_ce: float = 1.0,
    lambda_kd: float = 1.0,
    lambda_rank: float = 0.0,
    reduction: str = "mean",
    check_inputs: bool = True,
    backend: str = "auto",
) -> Tensor:
    """The distillation loss with sampled partitions (module docstring).

    ``user_emb`` [B, d]; ``cand_emb`` [B, M, d] the embeddings of ``selected_ids(target, teacher_ids)`` (any row
    at the empty slots: they are masked), ``cand_bias`` [B, M] likewise; ``neg_emb`` [N, d] and ``neg_bias`` [N]
    of the negatives ``neg_ids`` [N] (sorted, distinct: :func:`sample_negatives`), ``neg_log_p`` [N] their log
    inclusion probabilities. ``num_items`` bounds the ids. Returns the mean (or sum, or [B] for "none") of the
    rows' losses; gradients flow to user_emb, cand_emb, neg_emb and the biases. ``backend`` evaluates the row
    formula (:func:`prmkd_dist.distill.loss.resolve_backend`: the fused C++ op on CPU float32, the reference's
    tensor ops otherwise)."""
    if user_emb.dim() != 2 or cand_emb.dim() != 3 or neg_emb.dim() != 2:
        raise ValueError(f"user_emb must be [B, d], cand_emb [B, M, d], neg_emb [N, d]; got "
                         f"{tuple(user_emb.shape)}, {tuple(cand_emb.shape)}, {tuple(neg_emb.shape)}")
    batch, d = user_emb.shape
    check_hyperparameters(temperature, lambda_ce, lambda_kd, lambda_rank, reduction)
    check_loss_inputs(num_items, batch, user_emb.device, target, teacher_ids, teacher_scores, teacher_weights,
                      rank_weights, check_inputs)
    cand = selected_ids(target, teacher_ids)
    if cand_emb.shape != (batch, cand.shape[1], d):
        raise ValueError(f"cand_emb must be [B, 1 + T*K, d] = [{batch}, {cand.shape[1]}, {d}] (the target then the "
                         f"teachers' slots), got {tuple(cand_emb.shape)}")
    n = neg_ids.shape[0]
    if neg_ids.dim() != 1 or neg_emb.shape != (n, d) or neg_log_p.shape != (n,):
        raise ValueError(f"neg_ids [N], neg_emb [N, d] and neg_log_p [N] must agree: {tuple(neg_ids.shape)}, "
                         f"{tuple(neg_emb.shape)}, {tuple(neg_log_p.shape)} (d = {d})")
    if cand_bias is not None and cand_bias.shape != cand.shape:
        raise ValueError(f"cand_bias must be [B, M] = {tuple(cand.shape)}, got {tuple(cand_bias.shape)}")
    if neg_bias is not None and neg_bias.shape != (n,):
        raise ValueError(f"neg_bias must be [N] = [{n}], got {tuple(neg_bias.shape)}")
    if check_inputs:
        check_ids("neg_ids", neg_ids, num_items)
        if n > 1 and not bool((neg_ids[1:] > neg_ids[:-1]).all()):
            raise ValueError("neg_ids must be sorted ascending and distinct (sample_negatives makes them so)")
        check_finite("neg_log_p", neg_log_p)
        if n and float(neg_log_p.max()) > 1e-9:
            raise ValueError(f"neg_log_p are log probabilities: expected <= 0, got max {float(neg_log_p.max())}")
        check_finite("user_emb", user_emb)

    fdt = torch.float64 if user_emb.dtype == torch.float64 else torch.float32
    tgt, ids, scores, tw, rw = normalise_teacher_inputs(target, teacher_ids, teacher_scores, teacher_weights,
                                                        rank_weights, lambda_rank, fdt)
    u = user_emb.to(fdt)
    sel = torch.einsum("bd,bmd->bm", u, cand_emb.to(fdt))
    if cand_bias is not None:
        sel = sel + cand_bias.to(fdt)
    neg = u @ neg_emb.to(fdt).T
    if neg_bias is not None:
        neg = neg + neg_bias.to(fdt)
    if check_inputs:  # the embeddings through their logits ([B, M] and [B, N], not [B, M, d])
        check_finite("the candidates' logits (cand_emb / cand_bias)", sel.detach())
        check_finite("the negatives' logits (neg_emb / neg_bias)", neg.detach())
    counted = _first_occurrence(cand)          # each distinct candidate once
    keep = ~_hits(cand, neg_ids.to(torch.int64))  # negatives that are not the row's candidates
    log_p = neg_log_p.to(fdt)

    def lse(tau: float) -> Tensor:
        own = (sel / tau).masked_fill(~counted, -math.inf)
        rest = (neg / tau - log_p).masked_fill(~keep, -math.inf)
        return torch.logsumexp(torch.cat([own, rest], dim=1), dim=1)

    n_slots = ids.shape[1] * ids.shape[2]
    need_tau = lambda_kd != 0.0 and n_slots > 0
    lse1 = lse(1.0)
    lse_tau = (lse1 if temperature == 1.0 else lse(float(temperature))) if need_tau else None
    local = resolve_backend(backend, user_emb.device, user_emb.dtype, op="catalog_local").module
    rows_from_sel = getattr(local, "kd_rows_from_sel", kd_rows_from_sel)
    rows = rows_from_sel(lse1, lse_tau, sel, tgt, ids, scores, tw, rw, float(temperature), float(lambda_ce),
                         float(lambda_kd), float(lambda_rank))
    return reduce_rows(rows, reduction)
