"""Collaborative embedding distillation (DLLM2Rec, Cui et al. 2024) and the item-table extension it uses.

DLLM2Rec gives each student item the sum of its own collaborative embedding and a learned projection
of the teacher's (frozen) item embedding, so the student inherits the teacher's item semantics while
keeping its own ID table. Here:

    row_i = E_i + P(T_i)        E: the student's own TorchRec table (trained as before),
                                T: teacher item embeddings read from embedding shards (frozen buffer),
                                P: a learned linear map (or a 2-layer MLP), initialised to 0 so training
                                   starts from the plain student.

It is applied to the input lookup AND the output scoring. For students whose output is tied to the
input table (SASRec, GRU4Rec) the same rows serve both; Caser's separate output table gets its own
projection. MKD's neighbour-based input distillation (:mod:`prmkd_dist.distill.mkd`, NKD) plugs into the
same extension: ``row_i += beta * sum_j a_ij row_j`` over teacher-embedding neighbours j of i.

The extension is attached to a student in place (``extend_items``): the student's class becomes a
subclass that overrides ``embed_items`` and ``output_weight`` only, so every student's own encoder runs
unchanged. Because every extra term is a per-item function of frozen inputs, the trained model can be
baked (``bake``) into a plain student of the same architecture and size: its table holds the effective
rows. Checkpoints store that plain student, so serving and ``load_checkpoint`` see an ordinary model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.shards import read_teacher_embeddings
from prmkd_dist.models.base import SequentialStudent
from prmkd_dist.train.utils import get_logger

log = get_logger(__name__)

EXTENSION_ATTR = "item_ext"


def load_teacher_item_embeddings(paths, num_items: int, item_fingerprint: str) -> tuple[torch.Tensor, dict]:
    """[C, sum D_t] float32: the teachers' item embeddings side by side, each scaled to mean row norm 1
    (teachers live on different scales; the projection should not have to undo that). Items a teacher
    does not cover get a zero row there; they are counted in the report and logged, never hidden."""
    if not paths:
        raise ValueError("distill.teacher_embeddings: no embedding shard directory given")
    parts, report = [], {}
    for path in paths:
        meta, ids, emb = read_teacher_embeddings(str(path), num_items=num_items, item_fingerprint=item_fingerprint)
        name = meta.teachers[0].name
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"{path}: teacher {name!r} has an item id more than once in its embeddings")
        table = torch.zeros(num_items, emb.shape[1])
        table[torch.from_numpy(ids)] = torch.from_numpy(emb)
        present = torch.zeros(num_items, dtype=torch.bool)
        present[torch.from_numpy(ids)] = True
        scale = table[present].norm(dim=1).mean().clamp_min(1e-12) if present.any() else torch.tensor(1.0)
        parts.append(table / scale)
        missing = int(num_items - present.sum())
        report[name] = {"path": str(path), "dim": int(emb.shape[1]), "items_missing": missing}
        if missing:
            log.warning("teacher embeddings %s (%s): %d of %d items have no embedding (zero row)",
                        name, path, missing, num_items)
    return torch.cat(parts, dim=1), report


def _projection(in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    if hidden > 0:
        net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    else:
        net = nn.Sequential(nn.Linear(in_dim, out_dim))
    nn.init.zeros_(net[-1].weight)  # start as the plain student; gradients still reach it (dL/dP = g T^T)
    nn.init.zeros_(net[-1].bias)
    return net


class ItemTableExtension(nn.Module):
    """The extra per-item terms added to a student's item rows (see the module docstring).

    Args:
        teacher_emb: [C, D] frozen teacher item embeddings, or None (no projection term).
        dim: the student's item width d.
        tied: the student's output table is its input table (one projection serves both).
        hidden: 0 = linear projection, > 0 = MLP of that width.
        neighbours / neighbour_weights: [C, n] ids and weights (rows summing to 1 or 0) for NKD, or None.
        beta: weight of the neighbour term.
    """

    def __init__(self, dim: int, tied: bool, teacher_emb: torch.Tensor | None = None, hidden: int = 0,
                 neighbours: torch.Tensor | None = None, neighbour_weights: torch.Tensor | None = None,
                 beta: float = 0.0):
        super().__init__()
        self.tied = tied
        self.beta = float(beta)
        if teacher_emb is not None:
            # frozen and rebuilt from the shards: a buffer outside the state dict (checkpoints are baked)
            self.register_buffer("teacher", teacher_emb.detach().to(torch.float32), persistent=False)
            self.proj_in = _projection(teacher_emb.shape[1], dim, hidden)
            self.proj_out = None if tied else _projection(teacher_emb.shape[1], dim, hidden)
        else:
            self.teacher, self.proj_in, self.proj_out = None, None, None
        if (neighbours is None) != (neighbour_weights is None):
            raise ValueError("neighbours and neighbour_weights go together")
        if neighbours is not None:
            self.register_buffer("neighbours", neighbours.to(torch.int64), persistent=False)
            self.register_buffer("neighbour_weights", neighbour_weights.to(torch.float32), persistent=False)
        else:
            self.neighbours = self.neighbour_weights = None

    def projected(self, ids: torch.Tensor, output: bool = False) -> torch.Tensor:
        """P(T[ids]) with zeros where ids == PAD_ID; ``ids`` of any shape -> [..., d]."""
        proj = self.proj_out if (output and self.proj_out is not None) else self.proj_in
        out = proj(self.teacher[ids.clamp(min=0)])
        return out * (ids != PAD_ID).unsqueeze(-1)

    def projected_table(self, output: bool = False) -> torch.Tensor:
        proj = self.proj_out if (output and self.proj_out is not None) else self.proj_in
        return proj(self.teacher)


class ExtendedItemsMixin:
    """Placed before a student's class in the MRO by :func:`extend_items`; overrides the item rows only."""

    def _base_rows(self, history: torch.Tensor) -> torch.Tensor:
        rows = super().embed_items(history)  # the student's own (TorchRec) lookup, zeros at padding
        ext = getattr(self, EXTENSION_ATTR)
        if ext.teacher is not None:
            rows = rows + ext.projected(history)
        return rows

    def embed_items(self, history: torch.Tensor) -> torch.Tensor:
        rows = self._base_rows(history)
        ext = getattr(self, EXTENSION_ATTR)
        if ext.neighbours is not None and ext.beta:
            b, l = history.shape
            valid = history != PAD_ID
            nbr = ext.neighbours[history.clamp(min=0)].masked_fill(~valid.unsqueeze(-1), PAD_ID)  # [B, L, n]
            w = ext.neighbour_weights[history.clamp(min=0)] * valid.unsqueeze(-1)
            nb_rows = self._base_rows(nbr.reshape(b, -1)).view(b, l, nbr.shape[-1], -1)
            rows = rows + ext.beta * (w.unsqueeze(-1) * nb_rows).sum(dim=2)
        return rows

    def output_weight(self) -> torch.Tensor:
        table = super().output_weight()
        ext = getattr(self, EXTENSION_ATTR)
        if ext.teacher is not None:
            table = table + ext.projected_table(output=True)
        if ext.neighbours is not None and ext.beta:
            # sum_j a_ij row_j as one weighted bag per item: no [C, n, d] gather (4-5x faster, both passes)
            table = table + ext.beta * F.embedding_bag(ext.neighbours, table, mode="sum",
                                                       per_sample_weights=ext.neighbour_weights)
        return table


_EXTENDED_CLASSES: dict[type, type] = {}


def is_tied(student: SequentialStudent) -> bool:
    """Whether the student scores with its input item table (SASRec, GRU4Rec) or has its own (Caser)."""
    cls = type(student)
    return getattr(cls, "_base_output_weight", cls.output_weight) is SequentialStudent.output_weight


def extend_items(student: SequentialStudent, ext: ItemTableExtension) -> SequentialStudent:
    """Attach ``ext`` to ``student`` in place (its class becomes ``ItemExtended<Class>``); returns it."""
    if isinstance(student, ExtendedItemsMixin):
        raise ValueError("this student already has an item extension")
    cls = type(student)
    if cls not in _EXTENDED_CLASSES:
        _EXTENDED_CLASSES[cls] = type(f"ItemExtended{cls.__name__}", (ExtendedItemsMixin, cls),
                                      {"__module__": __name__, "_base_output_weight": cls.output_weight})
    ext.to(next(student.parameters()).device)
    student.__class__ = _EXTENDED_CLASSES[cls]
    setattr(student, EXTENSION_ATTR, ext)
    return student


@torch.no_grad()
def bake(model: SequentialStudent) -> SequentialStudent:
    """A plain student of the same architecture whose tables hold ``model``'s effective item rows (its
    other weights copied). Scores equal ``model``'s in eval mode. Extra submodules used only by the
    training losses (e.g. MKD's projector) are dropped. A model without extension is returned as is."""
    from prmkd_dist.models import build_student

    extra = [name for name, _ in model.named_children() if name in (EXTENSION_ATTR, "cpd")]
    if not extra:
        return model
    device = next(model.parameters()).device
    plain = build_student(model.registry_name, model.num_items, device=device, **model.hparams)
    own = plain.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in own}
    plain.load_state_dict(state, strict=True)
    if isinstance(model, ExtendedItemsMixin):
        was_training = model.training
        model.eval()
        all_items = torch.arange(model.num_items, device=device).unsqueeze(0)
        plain.item_table_weight().copy_(model.embed_items(all_items)[0])
        if not is_tied(plain):
            plain.output_weight().copy_(model.output_weight())
        model.train(was_training)
    return plain.train(model.training)
