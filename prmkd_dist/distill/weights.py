"""Weights of the distillation loss: per-teacher weights w_bt and per-slot ranking importances rho_btk.

Definitions are the contract in /work/shared/specs/kd-loss.md ("The weights"):

- :func:`teacher_weights` follows PRM-KD's confidence- and consistency-aware integration of teachers:
  a teacher that is confident about the ground truth, and that agrees with the other teachers, gets more
  weight; the weights are a softmax (temperature ``gamma``) over the teachers that have any valid slot.
- :func:`importance_weights` follows DLLM2Rec's importance-aware ranking distillation: a slot matters
  more when it is high in the teacher's list (position), when the teacher is sure of it (confidence),
  and when the student already ranks it in its own top-``student_topk`` (consistency).

Both are computed without gradient and return constants, vectorised over the batch (no per-row loops).
Empty slots are ``teacher_ids == -1`` (PAD_ID).
"""
from __future__ import annotations

import torch
from torch import Tensor

from prmkd_dist.distill.loss import check_finite, check_ids, check_teacher_shapes

__all__ = ["teacher_weights", "importance_weights", "TEACHER_WEIGHT_STRATEGIES"]

TEACHER_WEIGHT_STRATEGIES = ("uniform", "confidence", "consistency", "confidence_consistency")


def _valid_softmax(scores: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Softmax of ``scores`` over the ``valid`` entries along ``dim``; 0 on invalid entries and where none is valid."""
    z = scores.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(z, dim=dim, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.where(valid, (z - lse).exp(), torch.zeros_like(z))


def _sorted_lists(ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each teacher's ids sorted ascending (stable), empty slots first as a sentinel that equals no id:
    (sorted ids [B, T, K], the slot each sorted entry came from [B, T, K])."""
    sentinel = torch.iinfo(torch.int64).min
    keyed = torch.where(valid, ids, torch.full_like(ids, sentinel))
    return keyed.sort(dim=-1, stable=True)


def _first_occurrence(ids: Tensor, valid: Tensor, sorted_lists: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[B, T, K] bool: valid slots whose id does not already appear at an earlier slot of the same teacher
    (so that |S_bt| counts the *set* of ids). One stable sort per list: among equal ids the earliest slot
    sorts first, so "differs from its sorted predecessor" marks exactly the first occurrences."""
    sorted_ids, slot = sorted_lists if sorted_lists is not None else _sorted_lists(ids, valid)
    new = torch.ones_like(valid)
    new[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    first = torch.empty_like(valid).scatter_(-1, slot, new)
    return valid & first


def _membership(ids: Tensor, valid: Tensor, sorted_lists: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """[B, T, T', K] bool: is the valid id at slot (t, k) among the valid ids of teacher t'?

    Uses a batched binary search over each teacher's sorted ids: memory B*T*T*K, not B*T*K*T*K."""
    batch, n_t, k = ids.shape
    sorted_ids = (sorted_lists if sorted_lists is not None else _sorted_lists(ids, valid))[0]  # [B, T', K]
    queries = ids.reshape(batch, 1, n_t * k).expand(batch, n_t, n_t * k)   # [B, T', T*K]
    pos = torch.searchsorted(sorted_ids.contiguous(), queries.contiguous()).clamp(max=k - 1)
    found = sorted_ids.gather(-1, pos) == queries                            # [B, T', T*K]
    found = found.reshape(batch, n_t, n_t, k).transpose(1, 2)                # [B, T, T', K]
    return found & valid.unsqueeze(2)


@torch.no_grad()
def teacher_weights(
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    target: Tensor,
    strategy: str = "confidence_consistency",
    alpha: float = 0.5,
    gamma: float = 0.2,
) -> Tensor:
    """Per-row, per-teacher weights w [B, T] (float32, no grad), a softmax over the non-empty teachers.

    - confidence c_bt: the teacher's softmax (tau = 1) over its valid slots, at the slot whose id is
      ``target[b]`` (summed if the id repeats within that teacher's list); 0 if the target is not among
      the valid ids or ``target[b] = -1``;
    - consistency o_bt: mean over t' != t of |S_bt ∩ S_bt'| / max(|S_bt|, 1), S = the set of valid ids;
      1 when T = 1;
    - score: "uniform" 0, "confidence" c, "consistency" o, "confidence_consistency" alpha*c + (1-alpha)*o;
    - w_bt = softmax over the teachers with a valid slot of score_bt / gamma; 0 for empty teachers
      (a row where every teacher is empty gets all zeros).
    """
    check_teacher_shapes(teacher_ids, teacher_scores)
    batch, n_t, _ = teacher_ids.shape
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target must be [B] = [{batch}], got shape {tuple(target.shape)}")
    if strategy not in TEACHER_WEIGHT_STRATEGIES:
        raise ValueError(f"strategy must be one of {TEACHER_WEIGHT_STRATEGIES}, got {strategy!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    check_ids("teacher_ids", teacher_ids, None)
    check_ids("target", target, None)
    check_finite("teacher_scores", teacher_scores)

    ids = teacher_ids.to(torch.int64)
    valid = ids >= 0
    non_empty = valid.any(dim=2)  # [B, T]
    scores = teacher_scores.to(torch.float32)
    if n_t == 0:
        return scores.new_zeros(batch, 0)

    score = scores.new_zeros(batch, n_t)
    if strategy in ("confidence", "confidence_consistency"):
        probs = _valid_softmax(scores, valid, dim=2)
        hit = valid & (ids == target.to(torch.int64)[:, None, None]) & (target >= 0)[:, None, None]
        confidence = (probs * hit).sum(dim=2)
        score = score + (confidence if strategy == "confidence" else alpha * confidence)
    if strategy in ("consistency", "confidence_consistency"):
        if n_t == 1:
            consistency = scores.new_ones(batch, 1)
        else:
            lists = _sorted_lists(ids, valid)  # one sort serves both
            first = _first_occurrence(ids, valid, lists)                            # [B, T, K]
            shared = (_membership(ids, valid, lists) & first.unsqueeze(2)).sum(dim=-1)  # [B, T, T'] = |S_t ∩ S_t'|
            off_diag = ~torch.eye(n_t, dtype=torch.bool, device=ids.device)
            size = first.sum(dim=-1).clamp(min=1)                                  # max(|S_bt|, 1)
            consistency = (shared * off_diag).sum(dim=-1).to(scores.dtype) / (size * (n_t - 1))
        score = score + (consistency if strategy == "consistency" else (1.0 - alpha) * consistency)
    return _valid_softmax(score / gamma, non_empty, dim=1)


@torch.no_grad()
def importance_weights(
    teacher_ids: Tensor,
    teacher_scores: Tensor,
    logits: Tensor,
    gamma_position: float = 0.3,
    gamma_confidence: float = 0.5,
    gamma_consistency: float = 0.1,
    position_scale: float | None = None,
    student_topk: int | None = None,
) -> Tensor:
    """Ranking-term importances rho [B, T, K] (float32, no grad) for ``kd_loss(..., rank_weights=rho)``.

    rho_btk = gamma_position * pi + gamma_confidence * confidence + gamma_consistency * consistency on
    valid slots, 0 on empty slots, with
    - pi: exp(-j / position_scale) for the j-th valid slot of the teacher's list (j = 1, 2, ...),
      normalised over its valid slots. ``position_scale`` defaults to K / 4 (at least 1e-6): the weight of
      a slot halves about every K/6 positions, so the head of the list dominates without the tail
      vanishing;
    - confidence: the teacher's softmax (tau = 1) over its valid slots;
    - consistency: 1 if the student ranks the item in its top ``student_topk`` (default K), i.e. fewer
      than ``student_topk`` columns of ``logits`` have a strictly larger value; else 0.
    ``logits`` is the student's [B, C] score matrix (any float dtype; compared in float32).
    """
    check_teacher_shapes(teacher_ids, teacher_scores)
    batch, n_t, k = teacher_ids.shape
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(f"logits must be [B, C] with B = {batch}, got shape {tuple(logits.shape)}")
    if logits.device != teacher_ids.device:
        raise ValueError(f"logits is on {logits.device}, teacher_ids on {teacher_ids.device}")
    num_items = logits.shape[1]
    if position_scale is None:
        position_scale = max(k / 4.0, 1e-6)
    if not position_scale > 0:
        raise ValueError(f"position_scale must be > 0, got {position_scale}")
    if student_topk is None:
        student_topk = k
    if student_topk < 0:
        raise ValueError(f"student_topk must be >= 0, got {student_topk}")
    for name, g in (("gamma_position", gamma_position), ("gamma_confidence", gamma_confidence),
                    ("gamma_consistency", gamma_consistency)):
        if not g >= 0:
            raise ValueError(f"{name} must be >= 0, got {g}")
    check_ids("teacher_ids", teacher_ids, num_items)
    check_finite("teacher_scores", teacher_scores)
    check_finite("logits", logits)

    ids = teacher_ids.to(torch.int64)
    valid = ids >= 0
    scores = teacher_scores.to(torch.float32)
    rho = scores.new_zeros(batch, n_t, k)
    if rho.numel() == 0:
        return rho

    if gamma_position:
        ordinal = valid.cumsum(dim=2).to(torch.float32)  # j-th valid slot, j = 1, 2, ...
        rho += gamma_position * _valid_softmax(-ordinal / position_scale, valid, dim=2)
    if gamma_confidence:
        rho += gamma_confidence * _valid_softmax(scores, valid, dim=2)
    if gamma_consistency and student_topk > 0:
        s = logits.detach().to(torch.float32)
        m = min(student_topk, num_items)
        # rank(x) < m  <=>  x >= the m-th largest logit (fewer than m columns are strictly larger)
        threshold = s.topk(m, dim=1).values[:, m - 1]
        s_ids = s.gather(1, ids.clamp(min=0).reshape(batch, -1)).reshape(batch, n_t, k)
        rho += gamma_consistency * ((s_ids >= threshold[:, None, None]) & valid).to(torch.float32)
    return rho

