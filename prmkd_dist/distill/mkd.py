"""MKD-style multi-level distillation parts: input layer (NKD), intermediate layer (CPD), output (SLD).

What is implemented, and how it departs from the paper's description:

- **NKD, neighbour-based input distillation.** Each item is augmented with its nearest neighbours in the
  teachers' item-embedding space: ``row_i += beta * sum_j a_ij row_j`` over the ``n`` most cosine-similar
  items j (``a_ij`` = positive similarities normalised to sum 1), where ``row`` is the student's own
  item row (plus the DLLM2Rec projection when that is on). Departure: the augmentation is applied to the
  output table as well as to the input lookup. That keeps it a per-item function of the student's table,
  so the trained model bakes into a plain student (``embedding.bake``), and for tied students (SASRec,
  GRU4Rec) input and output stay one table.
- **CPD, consistent-preference distillation of the intermediate layer.** A projector maps the student's
  user state (the encoder output at the last position, the layer below the catalog scoring) into the
  teachers' item-embedding space; it is aligned (1 - cosine) with the teachers' preference vector = the
  teacher-weighted, score-softmax-weighted mean of the embeddings of their top-K items. Departure: the
  paper aligns with teacher hidden states; the shards carry no teacher hidden states, so the teachers'
  preferences are expressed through their item embeddings and top-K lists instead.
- **SLD, soft labels from teacher and student predictions.** The soft label over the union of the
  teachers' top-K items is ``beta * (teacher ensemble, weights w_bt) + (1 - beta) * (student's own
  detached softmax over the same items, temperature tau)``; the student is trained towards it with the
  contract's KL term (a second ``engine.linear_loss`` call with one pseudo-teacher, no CE, no ranking).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prmkd_dist.constants import PAD_ID


@torch.no_grad()
def teacher_neighbours(teacher_emb: Tensor, n: int, chunk_rows: int = 2048) -> tuple[Tensor, Tensor]:
    """([C, n] neighbour ids, [C, n] weights) by cosine similarity of teacher item embeddings, self
    excluded, computed in row chunks ([chunk, C] at a time). Weights are the positive similarities
    normalised to sum 1; an item with no positive similarity (e.g. a zero row: no teacher embedding)
    gets all-zero weights, i.e. no augmentation."""
    c = teacher_emb.shape[0]
    n = min(n, c - 1)
    if n < 1:
        raise ValueError(f"NKD needs at least 2 items, got {c}")
    unit = F.normalize(teacher_emb.float(), dim=1)
    ids = torch.empty(c, n, dtype=torch.int64)
    sims = torch.empty(c, n)
    for lo in range(0, c, chunk_rows):
        hi = min(c, lo + chunk_rows)
        s = unit[lo:hi] @ unit.T
        s[torch.arange(hi - lo), torch.arange(lo, hi)] = -torch.inf  # not its own neighbour
        top = s.topk(n, dim=1)
        ids[lo:hi], sims[lo:hi] = top.indices, top.values
    pos = sims.clamp(min=0)
    total = pos.sum(dim=1, keepdim=True)
    return ids, torch.where(total > 0, pos / total.clamp_min(1e-12), torch.zeros_like(pos))


class ConsistentPreference(nn.Module):
    """CPD: projector student user state [B, d] -> teacher embedding space [B, D] and its loss."""

    def __init__(self, dim: int, teacher_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, teacher_dim))

    @staticmethod
    @torch.no_grad()
    def preference(teacher_emb: Tensor, teacher_ids: Tensor, teacher_scores: Tensor, teacher_weights: Tensor,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """([B, D] teacher preference vectors, [B] bool rows with any valid teacher slot)."""
        valid = teacher_ids >= 0
        z = (teacher_scores.float() / temperature).masked_fill(~valid, -torch.inf)
        p = torch.softmax(z, dim=-1).nan_to_num(0.0) * valid  # all-empty teacher: zeros
        b = teacher_ids.shape[0]
        mass = (p * teacher_weights.unsqueeze(-1)).reshape(b, -1)  # [B, T*K], 0 at empty slots
        # one weighted bag per row: never the [B, T, K, D] gather (655 MB at 6,400 packed rows, D = 256)
        pref = F.embedding_bag(teacher_ids.clamp(min=0).reshape(b, -1), teacher_emb, mode="sum",
                               per_sample_weights=mass.to(teacher_emb.dtype))
        return pref, valid.flatten(1).any(dim=1) & (pref.norm(dim=1) > 0)

    def loss(self, user: Tensor, teacher_emb: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
             teacher_weights: Tensor, temperature: float = 1.0) -> Tensor:
        """mean over rows with a preference of 1 - cos(proj(user), preference); 0 if none has one."""
        pref, has = self.preference(teacher_emb, teacher_ids, teacher_scores, teacher_weights, temperature)
        if not has.any():
            return user.sum() * 0.0
        cos = F.cosine_similarity(self.proj(user[has]), pref[has], dim=1)
        return (1.0 - cos).mean()


@torch.no_grad()
def blended_soft_label(student_logits_at_ids: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                       teacher_weights: Tensor, beta: float, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """SLD's pseudo-teacher ([B, 1, T*K] ids, [B, 1, T*K] scores) over the union of the teachers' lists.

    ``student_logits_at_ids`` [B, T, K]: the student's logits at ``teacher_ids``. An item listed by
    several teachers is kept once (first slot) carrying all its teacher mass. The scores are
    ``tau * log q`` so that kd_loss's softmax(scores / tau) over the slots gives back q exactly."""
    b, t, k = teacher_ids.shape
    ids = teacher_ids.reshape(b, t * k)
    z = (teacher_scores.float() / temperature).masked_fill(teacher_ids < 0, -torch.inf)
    p = torch.softmax(z, dim=-1).nan_to_num(0.0) * (teacher_ids >= 0)
    mass = (p * teacher_weights.unsqueeze(-1)).reshape(b, t * k)
    first, mass = _merge_repeats(ids, mass)
    total = mass.sum(dim=1, keepdim=True)
    p_teacher = torch.where(total > 0, mass / total.clamp_min(1e-30), torch.zeros_like(mass))
    s = (student_logits_at_ids.float().reshape(b, t * k) / temperature).masked_fill(~first, -torch.inf)
    p_student = torch.softmax(s, dim=-1).nan_to_num(0.0)
    q = beta * p_teacher + (1.0 - beta) * p_student
    out_ids = torch.where(first & (q > 0), ids, torch.full_like(ids, PAD_ID))
    scores = torch.where(out_ids >= 0, temperature * q.clamp_min(1e-30).log(), torch.zeros_like(q))
    return out_ids.unsqueeze(1), scores.unsqueeze(1)


def _merge_repeats(ids: Tensor, mass: Tensor) -> tuple[Tensor, Tensor]:
    """For [B, S] ids (PAD_ID = empty) and their [B, S] masses: ([B, S] bool, the first slot of each distinct
    valid id in its row; [B, S] the id's total mass on that slot, 0 elsewhere). By a stable sort per row,
    O(S log S) a row, where comparing every pair of slots would hold [B, S, S]."""
    valid = ids >= 0
    key = torch.where(valid, ids, torch.full_like(ids, -1))
    sorted_ids, perm = key.sort(dim=1, stable=True)  # equal ids adjacent, in slot order
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = starts.long().cumsum(dim=1) - 1  # [B, S] group index of each sorted slot
    totals = torch.zeros_like(mass).scatter_add_(1, group, mass.gather(1, perm))
    first_sorted = starts & (sorted_ids >= 0)
    merged_sorted = torch.where(first_sorted, totals.gather(1, group), torch.zeros_like(mass))
    first = torch.zeros_like(first_sorted).scatter_(1, perm, first_sorted)
    merged = torch.zeros_like(mass).scatter_(1, perm, merged_sorted)
    return first, merged
