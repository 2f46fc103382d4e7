"""Multi-teacher distillation training of a student from merged teacher-score shards.

The loop is the project's one training loop (``prmkd_dist.train.trainer.train``: validation NDCG@10
each epoch, early stopping, checkpoints, TensorBoard, test read once at the end); this module only
supplies its objective, :class:`DistillObjective`:

- ``distill.packing = "example"``: batches stream from the shards (``TeacherShardDataset`` /
  ``ShardLoader``), refused when their num_items or item fingerprint differ from the dataset's, one encoder
  pass per example; ``"window"`` (``distill/packed.py``): the shards are read once into a table by example
  key and every position of a training window is a row (one encoder pass per window);
- per batch: the history is cut to the batch's longest real history, ``u = user_embedding(history)``
  (the encoder's last position), and the loss is ``engine.linear_loss(u, target, teacher_ids,
  teacher_scores, w, rho, temperature, lambda_ce, lambda_kd, lambda_rank)`` with
  ``w = teacher_weights(strategy, alpha, gamma)`` and, when ``lambda_rank > 0``,
  ``rho = importance_weights(...)`` (its consistency term needs the student's logits: computed under
  no_grad in row chunks of at most ``LOGIT_CHUNK_ELEMENTS`` entries, never [B, C] at once for big C);
- ``distill.teachers`` selects a subset of the shards' teachers (columns of the batch tensors);
- optional extras: curriculum masking, collaborative embedding distillation, MKD (NKD, CPD, SLD).

"No distillation" is this same objective with ``lambda_kd = lambda_rank = 0`` (and no extras): the same
examples in the same order, CE only, for a fair comparison.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.data.loader import ShardLoader, TeacherShardDataset
from prmkd_dist.distill.curriculum import Curriculum, disagreement, length_popularity
from prmkd_dist.distill.embedding import ItemTableExtension, bake, extend_items, is_tied, load_teacher_item_embeddings
from prmkd_dist.distill.mkd import ConsistentPreference, blended_soft_label, teacher_neighbours
from prmkd_dist.distill.weights import importance_weights, teacher_weights
from prmkd_dist.models.base import SequentialStudent
from prmkd_dist.train.config import ConfigError, TrainConfig
from prmkd_dist.train.engine import Engine
from prmkd_dist.train.trainer import TrainResult, build_model, load_split_for, train
from prmkd_dist.train.utils import get_logger, seed_everything, set_num_threads

log = get_logger(__name__)

LOGIT_CHUNK_ELEMENTS = 1 << 22  # rows x C logits materialised at once for the ranking importances


def select_teachers(available: tuple[str, ...], wanted: tuple[str, ...]) -> list[int]:
    """Column indices of ``wanted`` in the shards' teacher order (all teachers when empty)."""
    if not wanted:
        return list(range(len(available)))
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ConfigError(f"distill.teachers: unknown teacher {unknown[0]!r}; the shards hold {list(available)}")
    if len(set(wanted)) != len(wanted):
        raise ConfigError(f"distill.teachers: a teacher is listed twice in {list(wanted)}")
    return [available.index(t) for t in wanted]


def standardise_scores(ids: Tensor, scores: Tensor) -> Tensor:
    """Teacher scores divided, per row and teacher, by their standard deviation over the valid slots.

    Teachers score on unrelated scales (a softmax logit, an EASE reconstruction in [0, 1], a cosine): one
    temperature cannot suit them all. Softmax ignores shifts, so dividing by the spread gives every teacher
    list the same sharpness before ``temperature`` applies. Lists with fewer than 2 valid slots, or equal
    scores, keep their scale (their softmax does not depend on it)."""
    valid = ids >= 0
    n = valid.sum(dim=-1, keepdim=True)
    x = torch.where(valid, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    mean = x.sum(dim=-1, keepdim=True) / n.clamp(min=1)
    var = torch.where(valid, (x - mean) ** 2, torch.zeros_like(x)).sum(dim=-1, keepdim=True) / n.clamp(min=1)
    std = var.sqrt()
    scale = torch.where((n >= 2) & (std > 0), std, torch.ones_like(std))
    return torch.where(valid, x / scale, torch.zeros_like(x)).to(scores.dtype)


def _full_rows(engine: Engine):
    rows = engine.output_rows()
    if rows.first_id != 0 or rows.weight.shape[0] != rows.num_items:
        raise NotImplementedError("ranking importances, the disagreement curriculum and SLD need the whole "
                                  "output table on this process; the engine holds a shard of it")
    return rows


def logits_at(engine: Engine, user: Tensor, ids: Tensor) -> Tensor:
    """The student's logits at ``ids`` [B, ...] (PAD_ID slots read item 0; mask them yourself)."""
    rows = _full_rows(engine)
    flat = ids.reshape(ids.shape[0], -1).clamp(min=0)
    out = torch.einsum("bd,bsd->bs", user, rows.weight[flat])
    if rows.bias is not None:
        out = out + rows.bias[flat]
    return out.reshape(ids.shape)


@torch.no_grad()
def chunked_importance_weights(engine: Engine, user: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                               **kw) -> Tensor:
    """``importance_weights`` computed over row chunks so that at most LOGIT_CHUNK_ELEMENTS logits
    exist at a time (the weights are per row, so chunking changes nothing)."""
    rows = _full_rows(engine)
    step = max(1, LOGIT_CHUNK_ELEMENTS // max(rows.num_items, 1))
    out = []
    for lo in range(0, user.shape[0], step):
        logits = user[lo:lo + step].detach() @ rows.weight.detach().T
        if rows.bias is not None:
            logits = logits + rows.bias.detach()
        out.append(importance_weights(teacher_ids[lo:lo + step], teacher_scores[lo:lo + step], logits, **kw))
    return torch.cat(out) if out else teacher_scores.new_zeros(teacher_ids.shape)


def with_pseudo_teacher(ids: Tensor, scores: Tensor, w: Tensor, rho: Tensor | None, extra_ids: Tensor,
                        extra_scores: Tensor, extra_weight: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The teacher lists [N, T, K] with one more teacher appended ([N, 1, S] lists, teacher weight
    ``extra_weight``, no ranking weight): [N, T + 1, max(K, S)], empty slots padded. By the loss contract the
    KD terms of the teachers add (``lambda_kd * tau^2 * sum_t w_t KL_t``) and a teacher with all-zero ranking
    weights has no ranking term, so one loss over these lists equals the loss over the T teachers plus
    ``lambda_kd * extra_weight * tau^2 * KL_extra``, computed in one pass over the catalog."""
    width = max(ids.shape[-1], extra_ids.shape[-1])

    def pad(x: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)

    out_ids = torch.cat([pad(ids, PAD_ID), pad(extra_ids, PAD_ID)], dim=1)
    out_scores = torch.cat([pad(scores, 0.0), pad(extra_scores.to(scores.dtype), 0.0)], dim=1)
    out_w = torch.cat([w, w.new_full((w.shape[0], 1), float(extra_weight))], dim=1)
    out_rho = None if rho is None else torch.cat([pad(rho, 0.0), rho.new_zeros(rho.shape[0], 1, width)], dim=1)
    return out_ids, out_scores, out_w, out_rho


def scaled_teacher_weights(w: Tensor, selected: tuple[str, ...], scale: dict[str, float]) -> Tensor:
    """``w`` [B, T] (the strategy's teacher weights) with column t multiplied by ``distill.teacher_scale``'s factor
    for teacher ``selected[t]`` (absent = 1). A name that is not a distilled teacher is a config error: a typo
    would otherwise leave the teacher at full weight without a word."""
    if not scale:
        return w
    unknown = sorted(set(scale) - set(selected))
    if unknown:
        raise ConfigError(f"distill.teacher_scale: no teacher {unknown[0]!r} among the distilled teachers "
                          f"{list(selected)} (expected their names as in the shards)")
    assert w.shape[-1] == len(selected), (tuple(w.shape), selected)
    return w * torch.tensor([float(scale.get(t, 1.0)) for t in selected], dtype=w.dtype, device=w.device)


class DistillLoss:
    """What every distillation objective shares: the configured loss over student rows (``rows_loss``), the
    curriculum, the MKD extras, per-epoch statistics and the baked checkpoint. Subclasses supply the
    batches and turn each into rows: :class:`DistillObjective` (one row per streamed example) and
    :class:`prmkd_dist.distill.packed.WindowDistillObjective` (one row per position of a window)."""

    def __init__(self, cfg: TrainConfig, split: LeaveOneOutSplit, model: SequentialStudent,
                 teacher_emb: Tensor | None = None):
        d = cfg.distill
        if not d.enabled:
            raise ConfigError("distill.shards: no shard directory given (distillation is off)")
        self.cfg, self.d, self.model = cfg, d, model
        self.device = torch.device(cfg.run.device)
        self.teacher_emb = None if teacher_emb is None else teacher_emb.to(self.device)
        self.curriculum = None
        if d.curriculum.kind != "none":
            pop = np.bincount(split.train_items, minlength=split.data.num_items)
            self.curriculum = Curriculum(d.curriculum.kind, d.curriculum.pacing, d.curriculum.start,
                                         d.curriculum.epochs, popularity=pop)
            self.curriculum.popularity = self.curriculum.popularity.to(self.device)
        self.epoch = 1
        self.rows_read = 0
        self.k = 0  # the shards' K (set by the subclass): the default consistency cut-off of the importances
        self.selected: tuple[str, ...] = ()  # the distilled teachers' names, column order (set by the subclass)
        self.last: dict = {}  # what the last batch used (weights, kept rows): for tests and debugging
        self._sums = {"loss_cpd": 0.0, "loss_sld": 0.0, "batches": 0}

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.curriculum is not None:
            self.curriculum.epoch = epoch

    def epoch_stats(self) -> dict[str, float]:
        out = {"rows_read": float(self.rows_read)}
        n = max(self._sums["batches"], 1)
        if self.d.mkd.cpd > 0:
            out["loss_cpd"] = self._sums["loss_cpd"] / n
        if self.d.mkd.sld > 0 and self.d.lambda_kd == 0:  # otherwise SLD is a teacher of the KD term, not apart
            out["loss_sld"] = self._sums["loss_sld"] / n
        self._sums = {"loss_cpd": 0.0, "loss_sld": 0.0, "batches": 0}
        if self.curriculum is not None:
            stats = self.curriculum.stats()
            log.info("epoch %d curriculum: kept fraction %.3f, masked %d of %d rows", self.epoch,
                     stats["curriculum_fraction"], stats["curriculum_rows_masked"], stats["curriculum_rows_seen"])
            out.update(stats)
        return out

    def checkpoint_model(self, model: SequentialStudent) -> SequentialStudent:
        return bake(model)

    def prepared_lists(self, ids: Tensor, scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """The parts of the loss that depend on the data alone: (scores after ``score_norm``, teacher
        weights w [N, T]). A caller that holds every row up front computes them once (``rows_loss(weights=)``)."""
        d = self.d
        if d.score_norm == "std":
            scores = standardise_scores(ids, scores)
        w = teacher_weights(ids, scores, target, strategy=d.strategy, alpha=d.alpha, gamma=d.gamma)
        return scores, scaled_teacher_weights(w, self.selected, d.teacher_scale)

    def rows_loss(self, engine: Engine, user: Tensor, target: Tensor, ids: Tensor, scores: Tensor,
                  history: Tensor, lengths: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """The distillation loss of N student rows ``user`` [N, d] with their targets [N] and the selected
        teachers' lists [N, T, K]; ``history`` (and ``lengths``) only feed the length/popularity curriculum.
        With ``weights`` (from ``prepared_lists``), ``scores`` are the prepared ones and w = ``weights``."""
        d = self.d
        if weights is None:
            scores, w = self.prepared_lists(ids, scores, target)
        else:
            w = weights
        keep = None
        if self.curriculum is not None:
            if self.curriculum.kind == "disagreement":
                with torch.no_grad():
                    diff = disagreement(logits_at(engine, user.detach(), ids), ids, scores, w, d.temperature)
            else:
                diff = length_popularity(history, target, self.curriculum.popularity, lengths)
            keep = self.curriculum.keep(diff)
            user, target, ids, scores, w = user[keep], target[keep], ids[keep], scores[keep], w[keep]
        rho = None
        if d.lambda_rank > 0:
            rho = chunked_importance_weights(
                engine, user, ids, scores, gamma_position=d.gamma_position, gamma_confidence=d.gamma_confidence,
                gamma_consistency=d.gamma_consistency, student_topk=d.student_topk or self.k)
        self.last = {"teacher_weights": w, "rank_weights": rho, "keep": keep, "target": target,
                     "teacher_ids": ids, "teacher_scores": scores}
        loss_lists = (ids, scores, w, rho)
        sld_separate = None
        if d.mkd.sld > 0:
            with torch.no_grad():
                sl_ids, sl_scores = blended_soft_label(logits_at(engine, user.detach(), ids), ids, scores, w,
                                                       d.mkd.sld_beta, d.temperature)
            if d.lambda_kd > 0:  # one more teacher of the KD term: one pass over the catalog, not two
                loss_lists = with_pseudo_teacher(ids, scores, w, rho, sl_ids, sl_scores, d.mkd.sld / d.lambda_kd)
            else:
                sld_separate = (sl_ids, sl_scores)
        loss = engine.linear_loss(user, target, *loss_lists, temperature=d.temperature,
                                  lambda_ce=d.lambda_ce, lambda_kd=d.lambda_kd, lambda_rank=d.lambda_rank)
        if d.mkd.cpd > 0:
            cpd = engine.model.cpd.loss(user, self.teacher_emb, ids, scores, w, d.temperature)
            loss = loss + d.mkd.cpd * cpd
            self._sums["loss_cpd"] += float(cpd.detach())
        if sld_separate is not None:
            no_target = torch.full_like(target, PAD_ID)
            sld = engine.linear_loss(user, no_target, *sld_separate, torch.ones_like(w[:, :1]), None,
                                     temperature=d.temperature, lambda_ce=0.0, lambda_kd=1.0, lambda_rank=0.0)
            loss = loss + d.mkd.sld * sld
            self._sums["loss_sld"] += float(sld.detach())
        self._sums["batches"] += 1
        return loss


class DistillObjective(DistillLoss):
    """The per-example distillation objective over streamed shards (module docstring)."""

    def __init__(self, cfg: TrainConfig, split: LeaveOneOutSplit, model: SequentialStudent,
                 teacher_emb: Tensor | None = None, rank: int = 0, world_size: int = 1):
        super().__init__(cfg, split, model, teacher_emb)
        d = self.d
        self.dataset = TeacherShardDataset(
            d.shards, cfg.optim.batch_size, max_len=cfg.data.max_len, shuffle=True, seed=cfg.run.seed,
            shuffle_buffer_rows=d.shuffle_buffer_rows, rank=rank, world_size=world_size,  # lockstep batches per rank
            num_items=split.data.num_items, item_fingerprint=split.data.fingerprint)
        self.loader = ShardLoader(self.dataset)
        self.teacher_names = tuple(self.loader.teacher_names)
        self.teacher_index = select_teachers(self.teacher_names, d.teachers)
        self.selected = tuple(self.teacher_names[i] for i in self.teacher_index)
        self.k = self.dataset.k

    # ---- objective protocol -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {}  # an epoch's order is the loader's function of (run.seed, epoch): nothing to carry

    def load_state_dict(self, state: dict) -> None:
        pass

    def num_batches(self) -> int:
        cap = self.d.max_batches_per_epoch
        return min(len(self.loader), cap) if cap else len(self.loader)

    def batches(self, epoch: int):
        self.start_epoch(epoch)
        self.loader.set_epoch(epoch - 1)  # the loader's epochs count from 0
        rows = 0
        for i, batch in enumerate(self.loader):
            if i == self.num_batches():
                break
            rows += int(batch["target"].shape[0])
            yield batch
        self.rows_read = rows
        planned = self.dataset.epoch_accounting()["rows_per_rank"]
        if rows < planned:
            log.warning("epoch %d read %d of this rank's %d rows (distill.max_batches_per_epoch=%d)", epoch, rows,
                        planned, self.d.max_batches_per_epoch)

    # ---- the loss -----------------------------------------------------------------------------------
    def prepare(self, batch: dict) -> dict:
        """Device tensors of the selected teachers, history cut to the batch's longest real history."""
        hist = batch["history"].to(self.device)
        longest = int((hist != PAD_ID).sum(dim=1).max()) if hist.numel() else 0
        hist = hist[:, hist.shape[1] - max(longest, 1):]
        idx = torch.tensor(self.teacher_index, dtype=torch.long)
        return {"history": hist, "target": batch["target"].to(self.device),
                "teacher_ids": batch["teacher_ids"][:, idx].to(self.device),
                "teacher_scores": batch["teacher_scores"][:, idx].to(self.device)}

    def loss(self, engine: Engine, batch: dict) -> Tensor:
        b = self.prepare(batch)
        user = engine.model.user_embedding(b["history"])
        return self.rows_loss(engine, user, b["target"], b["teacher_ids"], b["teacher_scores"], b["history"])


def prepare_student(cfg: TrainConfig, split: LeaveOneOutSplit, model: SequentialStudent | None = None
                    ) -> tuple[SequentialStudent, Tensor | None, dict]:
    """The student with the configured extensions attached (embedding distillation, NKD, CPD), the
    teacher item embeddings (or None) and their report."""
    d = cfg.distill
    if model is None:
        model = build_model(cfg, split.data.num_items, split)
    model.to(torch.device(cfg.run.device))
    if getattr(model, "needs_users", False):  # DeepFM, DCN-v2, LightGCN: no item-table extensions
        from prmkd_dist.distill.interaction import _unsupported

        _unsupported(cfg, cfg.model.name, "graph")
        return model, None, {}
    teacher_emb, report = None, {}
    if d.embedding.enabled or d.mkd.nkd or d.mkd.cpd > 0:
        teacher_emb, report = load_teacher_item_embeddings(d.teacher_embeddings, split.data.num_items,
                                                           split.data.fingerprint)
    if d.embedding.enabled or d.mkd.nkd:
        nbr = teacher_neighbours(teacher_emb, d.mkd.nkd_neighbours) if d.mkd.nkd else (None, None)
        ext = ItemTableExtension(model.dim, is_tied(model), teacher_emb if d.embedding.enabled else None,
                                 hidden=d.embedding.hidden, neighbours=nbr[0], neighbour_weights=nbr[1],
                                 beta=d.mkd.nkd_beta)
        extend_items(model, ext)
    if d.mkd.cpd > 0:
        model.cpd = ConsistentPreference(model.dim, teacher_emb.shape[1]).to(torch.device(cfg.run.device))
    return model, teacher_emb, report


def build_objective(cfg: TrainConfig, split: LeaveOneOutSplit, model: SequentialStudent,
                    teacher_emb: Tensor | None = None):
    """(the configured distillation objective for ``model`` from ``prepare_student``, its number of rows)."""
    if getattr(model, "needs_users", False):  # one row per training position (distill/interaction.py)
        from prmkd_dist.distill.interaction import student_objective

        objective = student_objective(cfg, split, model)
        return objective, len(objective.examples)
    if cfg.distill.packing == "window":
        from prmkd_dist.distill.packed import WindowDistillObjective

        objective = WindowDistillObjective(cfg, split, model, teacher_emb)
        return objective, objective.table.num_rows
    objective = DistillObjective(cfg, split, model, teacher_emb)
    return objective, objective.dataset.num_rows


def train_distilled(cfg: TrainConfig, split: LeaveOneOutSplit | None = None,
                    model: SequentialStudent | None = None) -> TrainResult:
    """Distil the configured teachers into ``model`` (default: built from ``cfg.model``) on ``split``
    (default ``cfg.data.dataset``); same loop, early stopping and outputs as ``train``. The checkpoint
    holds the baked plain student."""
    if not cfg.distill.enabled:
        raise ConfigError("distill.shards: no shard directory given (use prmkd_dist.train.trainer.train)")
    set_num_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)
    split = split if split is not None else load_split_for(cfg.data.dataset)
    model, teacher_emb, report = prepare_student(cfg, split, model)
    objective, rows = build_objective(cfg, split, model, teacher_emb)
    log.info("distilling teachers %s (of %s) from %s (%s packing): %d rows, %d batches/epoch",
             list(objective.selected), list(objective.teacher_names), cfg.distill.shards, cfg.distill.packing, rows,
             objective.num_batches())
    return train(cfg, split, model, objective=objective)


__all__ = ["DistillLoss", "DistillObjective", "standardise_scores", "train_distilled", "prepare_student",
           "build_objective", "select_teachers", "with_pseudo_teacher", "chunked_importance_weights", "logits_at",
           "LOGIT_CHUNK_ELEMENTS"]
