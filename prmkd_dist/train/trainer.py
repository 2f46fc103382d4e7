"""Training of a SequentialStudent on a leave-one-out split, with early stopping on validation.

An example is a window of a user's training prefix: input = window[:-1], targets = window[1:] at every
position (left-padded to ``max_len``). ``data.windows`` picks the windows: ``last`` = one per user, the most
recent ``max_len`` items (the SASRec paper's setting); ``all`` = the whole prefix cut into windows ending at its
last item, every ``data.window_stride`` items, so every training interaction is a target exactly once (long
MovieLens histories otherwise lose most of their interactions). With a stride below ``max_len`` the windows
overlap and each window's first ``max_len - stride`` positions are context only (no target): every target then
sees at least ``max_len - stride`` earlier items, where consecutive windows (stride = ``max_len``) leave the first
target of each window with one item of history. The loss is full-softmax cross-entropy over the whole catalog at
every real position (``next_item_loss``). Model selection uses validation NDCG@10 only; the test split
is evaluated once, with the best weights, at the end.

A checkpoint directory holds ``model.pt`` (state dict), ``config.yaml`` and ``meta.json`` (epoch,
validation metrics, item fingerprint), so ``load_checkpoint`` rebuilds the exact model and refuses a
dataset with a different item-id mapping.

Resume (``run.resume``): after every epoch the run keeps ``<out_dir>/resume.pt``: the weights (with a
method's extensions), the optimizer, the objective's random state (``objective.state_dict()``), the global
random states, the best epoch so far (its weights) and the loop counters. A run started with the same config
and out_dir continues after the last finished epoch, so an interrupted run ends with exactly the numbers of an
uninterrupted one on the same thread count (the epoch in progress is redone); a config that differs in anything
but ``run.{resume, progress, tensorboard, out_dir}`` is refused. The file is removed when the run finishes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit, left_pad
from prmkd_dist.models.base import SequentialStudent
from prmkd_dist.train.config import ConfigError, TrainConfig, load_config, save_config
from prmkd_dist.train.engine import Engine, LocalEngine, no_teachers
from prmkd_dist.train.evaluate import evaluate, evaluate_sampled
from prmkd_dist.train.utils import get_logger, seed_everything, set_num_threads

SELECT_METRIC = "NDCG@10"
CHECKPOINT_FORMAT = "prmkd-dist/student-checkpoint"

log = get_logger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match the dataset it is used with."""


RESUME_FILE = "resume.pt"
RESUME_FORMAT = "prmkd-dist/train-resume"
RESUME_FREE_KEYS = ("run.resume", "run.progress", "run.tensorboard", "run.out_dir")  # a resumed run may change these


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _random_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_resume_state(path: Path, cfg: TrainConfig, model, engine, objective, loop: dict) -> None:
    """``resume.pt`` after a finished epoch (module doc, "Resume"); written whole, then renamed over the last."""
    state = {"format": RESUME_FORMAT, "config": cfg.to_dict(), "model": model.state_dict(),
             "optimizer": engine.optimizer.state_dict(),
             "objective": objective.state_dict() if hasattr(objective, "state_dict") else {},
             "random": _random_states(torch.device(cfg.run.device)), "loop": loop}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_resume_state(path: Path, cfg: TrainConfig) -> tuple[dict | None, str]:
    """(the saved state of ``path``, "") if a run of ``cfg`` wrote it (module doc), else (None, why not)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are not tensors
    except Exception as e:  # a torn or foreign file
        return None, f"not a readable resume state ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        return None, f"not a prmkd-dist resume state (format {state.get('format') if isinstance(state, dict) else None!r})"
    old, new = _flat(state["config"]), _flat(cfg.to_dict())
    diff = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:5])
        return None, f"saved by a run with other settings ({shown}{'; ...' if len(diff) > 5 else ''})"
    return state, ""


def load_resume_state(path: Path, cfg: TrainConfig) -> dict:
    """The saved state of ``path`` if it was written by a run of ``cfg`` (module doc); a clear error otherwise."""
    state, why = read_resume_state(path, cfg)
    if state is None:
        raise ConfigError(f"{path}: {why}; delete it, or set run.resume=false, to start over")
    return state


@dataclass
class TrainResult:
    best_epoch: int
    valid: dict[str, float]  # validation metrics of the best epoch
    test: dict[str, float]  # full-ranking test metrics of the best weights (read once)
    test_sampled: dict[str, float] | None  # SASRec-paper protocol, when cfg.eval.sampled
    history: list[dict] = field(default_factory=list)  # one entry per validation evaluation
    train_seconds: float = 0.0
    epochs_run: int = 0
    checkpoint_dir: str | None = None
    stopped_by_budget: bool = False  # optim.max_train_seconds ended training (run not repeatable then)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# ---- data -------------------------------------------------------------------------------------------
def load_split_for(dataset: str) -> LeaveOneOutSplit:
    """The leave-one-out split of a builtin dataset name, reader YAML or prepared directory."""
    from prmkd_dist.data.prepare import load_split

    _, split = load_split(dataset)
    return split


def trainable_users(split: LeaveOneOutSplit) -> np.ndarray:
    """Users whose training prefix has at least one (input, target) pair."""
    return np.flatnonzero(np.diff(split.train_offsets) >= 2)


WINDOWS = ("last", "all")


def window_stride(max_len: int, stride: int | None) -> int:
    """The stride of ``all`` windows: ``stride`` in 1..max_len, or max_len for None / 0 (no overlap)."""
    if not stride:
        return max_len
    if not 1 <= stride <= max_len:
        raise ValueError(f"window stride must be in 1..max_len ({max_len}), got {stride}")
    return int(stride)


def configured_stride(cfg: TrainConfig) -> int | None:
    """``data.window_stride`` for the next-item objective (None: consecutive windows); a stride with
    ``windows: last`` is a configuration error (one window per user has nothing to overlap)."""
    if not cfg.data.window_stride:
        return None
    if cfg.data.windows != "all":
        raise ConfigError(f"data.window_stride={cfg.data.window_stride}: only applies to data.windows: all "
                          f"(or to distill.packing: window), got data.windows: {cfg.data.windows}")
    return cfg.data.window_stride


def training_examples(split: LeaveOneOutSplit, max_len: int, windows: str = "last",
                      stride: int | None = None) -> np.ndarray:
    """[N, 2] int64 rows (user, end): the example is ``train_sequence(user)[:end]`` (its last ``max_len`` + 1
    items make the window). ``last``: end = the prefix length, one row per trainable user. ``all``: ends
    n, n - S, n - 2 * S, ... (>= 2) with S = ``window_stride(max_len, stride)``; a window owns the targets of
    its last S positions (``training_batch`` with the same stride masks the others), so the windows' targets
    tile positions 1..n-1 exactly."""
    if windows not in WINDOWS:
        raise ValueError(f"windows must be one of {WINDOWS}, got {windows!r}")
    users = trainable_users(split)
    lengths = np.diff(split.train_offsets)[users]
    if windows == "last":
        return np.stack([users, lengths], axis=1).astype(np.int64)
    step = window_stride(max_len, stride)
    counts = -(-(lengths - 1) // step)  # windows per user: ceil((n - 1) / S), each owning S targets
    rows = np.repeat(np.arange(len(users)), counts)
    k = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)  # 0 = the most recent window
    return np.stack([users[rows], lengths[rows] - k * step], axis=1).astype(np.int64)


def training_batch(split: LeaveOneOutSplit, users: np.ndarray, max_len: int,
                   ends: np.ndarray | None = None, stride: int | None = None,
                   trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max_len] inputs and next-item targets (PAD_ID where there is no target) for ``users``; with
    ``ends``, the example of row i is the first ``ends[i]`` training items of ``users[i]`` (see
    :func:`training_examples`), otherwise the whole training prefix. With ``stride`` S < max_len (overlapping
    ``all`` windows) the first max_len - S target columns are PAD: context only, owned by an older window.
    ``trim``: drop the leading columns that are PAD in every row (``left_pad(trim=True)``; same loss, less work)."""
    seqs = [split.train_sequence(u) for u in users]
    if ends is not None:
        seqs = [s[:e] for s, e in zip(seqs, ends)]
    inputs = left_pad([s[:-1] for s in seqs], max_len)
    targets = left_pad([s[1:] for s in seqs], max_len)
    context = max_len - window_stride(max_len, stride)
    if context:
        targets[:, :context] = PAD_ID
    if trim:  # after the context mask, which is laid out on the full width
        width = max(1, min(max_len, max((len(s) - 1 for s in seqs), default=1)))
        inputs, targets = inputs[:, max_len - width:], targets[:, max_len - width:]
    return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(targets))


# ---- loss -------------------------------------------------------------------------------------------
def next_item_loss(engine: Engine, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training objective of one batch: full-softmax cross-entropy over the catalog at every position
    that has a target, through the fused catalog loss (``kd_loss_linear`` with no teachers: the [N, C]
    logits are never materialised by the C++ and Triton backends)."""
    hidden = engine.model.encode(inputs)
    mask = targets >= 0
    rows = hidden[mask]
    return engine.linear_loss(rows, targets[mask], *no_teachers(rows.shape[0], rows.device))


class NextItemObjective:
    """The default objective of :func:`train`: each epoch, the examples of :func:`training_examples` in a
    fresh random order (one rng seeded by ``run.seed``), batched by ``training_batch``, loss ``next_item_loss``.

    An objective is what :func:`train` needs from a training method, so that every method shares one loop
    (early stopping, evaluation, checkpoints, TensorBoard): ``batches(epoch)`` yields opaque batches,
    ``loss(engine, batch)`` turns one into a scalar, ``epoch_stats()`` returns extra numbers logged per
    epoch (e.g. rows a curriculum masked out), ``checkpoint_model(model)`` gives the plain student
    that a checkpoint stores (a method that extends the student bakes its extension in), and ``state_dict()`` /
    ``load_state_dict()`` carry whatever random state decides later epochs' batches (``run.resume``)."""

    def __init__(self, split: LeaveOneOutSplit, max_len: int, batch_size: int, seed: int, device: torch.device,
                 windows: str = "last", stride: int | None = None):
        self.split, self.max_len, self.batch_size, self.device = split, max_len, batch_size, device
        self.stride = stride if windows == "all" else None
        self.examples = training_examples(split, max_len, windows, self.stride)
        if len(self.examples) == 0:
            raise ValueError(f"{split.data.name}: no user has >= 2 training items; nothing to train on")
        self.rng = np.random.default_rng(seed)

    def num_batches(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def batches(self, epoch: int):
        # uniform random batches, each trimmed to its longest history (exact). Batching by length would make
        # short-history data several times cheaper, but measured on Games it learns worse (RESULTS, issue 2).
        order = self.examples[self.rng.permutation(len(self.examples))]
        for s in range(0, len(order), self.batch_size):
            rows = order[s:s + self.batch_size]
            yield training_batch(self.split, rows[:, 0], self.max_len, rows[:, 1], self.stride, trim=True)

    def loss(self, engine: Engine, batch) -> torch.Tensor:
        inputs, targets = batch
        return next_item_loss(engine, inputs.to(self.device), targets.to(self.device))

    def epoch_stats(self) -> dict[str, float]:
        return {}

    def checkpoint_model(self, model: SequentialStudent) -> SequentialStudent:
        return model

    def state_dict(self) -> dict:
        """What a resumed run needs to draw the next epochs' order as an uninterrupted one would (trainer, "Resume")."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


# ---- model / checkpoints ----------------------------------------------------------------------------
def build_model(cfg: TrainConfig, num_items: int, split: LeaveOneOutSplit | None = None,
                data_hparams: dict | None = None) -> SequentialStudent:
    """``build_student(cfg.model.name, num_items, **cfg.model.hparams)``; the model's ``max_len``
    defaults to ``data.max_len`` (Caser sets its own, shorter window in ``model.hparams``).

    A data-bound student (``needs_users``: DeepFM, DCN-v2, LightGCN; ``models/features.py``) needs ``split``
    (its data hyper-parameters are derived from it and its data buffers filled) or, when rebuilding a
    checkpoint, the stored ``data_hparams`` (the buffers then come from the state dict)."""
    from prmkd_dist.models import STUDENTS, build_student

    hparams = dict(cfg.model.hparams)
    hparams.setdefault("max_len", cfg.data.max_len)
    cls = STUDENTS.get(cfg.model.name)
    if not getattr(cls, "needs_users", False):
        return build_student(cfg.model.name, num_items, device=cfg.run.device, **hparams)
    if split is None and data_hparams is None:
        raise ValueError(f"student {cfg.model.name!r} is bound to its training data (user ids, item attributes, "
                         f"graph): build_model needs the split")
    derived = data_hparams if data_hparams is not None else cls.data_hparams(split, **hparams)
    given = sorted(set(derived) & set(cfg.model.hparams))
    if given:
        raise ValueError(f"model.hparams: {given} are derived from the data for {cfg.model.name!r}; remove them")
    model = build_student(cfg.model.name, num_items, device=cfg.run.device, **hparams, **derived)
    if split is not None:
        model.bind_data(split)
    return model


def model_data_hparams(model) -> dict:
    """The data-derived hyper-parameters of a data-bound student ({} for the others)."""
    cls = type(model)
    if not getattr(cls, "needs_users", False):
        return {}
    return {k: model.hparams[k] for k in ("num_users", "num_attributes", "num_edges") if k in model.hparams}


def save_checkpoint(directory: str | Path, model: SequentialStudent, cfg: TrainConfig, split: LeaveOneOutSplit,
                    epoch: int, valid: dict[str, float]) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), d / "model.pt")
    save_config(cfg, d / "config.yaml")
    meta = {"format": CHECKPOINT_FORMAT, "version": 1, "epoch": epoch, "valid": valid,
            "dataset": split.data.name, "num_items": split.data.num_items, "item_fingerprint": split.data.fingerprint,
            "data_hparams": model_data_hparams(model)}
    (d / "meta.json").write_text(json.dumps(meta, indent=2))


def load_checkpoint(directory: str | Path, split: LeaveOneOutSplit | None = None,
                    map_location: str = "cpu") -> tuple[SequentialStudent, TrainConfig, dict]:
    """Rebuild a saved student: ``(model in eval mode, config, meta)``. With ``split``, the item
    fingerprint must match (a different id mapping would silently score the wrong items)."""
    d = Path(directory)
    for name in ("model.pt", "config.yaml", "meta.json"):
        if not (d / name).exists():
            raise CheckpointError(f"{d}: not a student checkpoint (missing {name})")
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{d / 'meta.json'}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    cfg = load_config(d / "config.yaml")
    if split is not None and split.data.fingerprint != meta["item_fingerprint"]:
        raise CheckpointError(f"{d}: trained on items with fingerprint {meta['item_fingerprint']} ({meta['dataset']}), "
                              f"but the dataset {split.data.name} has {split.data.fingerprint}")
    model = build_model(cfg, int(meta["num_items"]), data_hparams=meta.get("data_hparams") or None)
    model.load_state_dict(torch.load(d / "model.pt", map_location=map_location, weights_only=True))
    return model.eval(), cfg, meta


# ---- the loop ---------------------------------------------------------------------------------------
def _tb_writer(cfg: TrainConfig):
    if not cfg.run.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(cfg.run.out_dir) / "tensorboard"))


def _eval_kwargs(cfg: TrainConfig) -> dict:
    ks = tuple(sorted(set(cfg.eval.ks) | {10}))  # NDCG@10 drives model selection
    return dict(ks=ks, batch_size=cfg.eval.batch_size, exclude_history=cfg.eval.exclude_history,
                max_len=cfg.data.max_len, progress=cfg.run.progress)


def train(cfg: TrainConfig, split: LeaveOneOutSplit | None = None,
          model: SequentialStudent | None = None, objective=None) -> TrainResult:
    """Train ``model`` (default: built from ``cfg.model``) on ``split`` (default: ``cfg.data.dataset``)
    with early stopping on validation NDCG@10; returns the best epoch's validation and test metrics.
    ``objective`` (default :class:`NextItemObjective`) supplies the batches and the loss; the
    distillation trainer passes its own. Same config, seed and thread count -> same numbers on CPU."""
    set_num_threads(cfg.run.num_threads)
    seed_everything(cfg.run.seed)
    split = split if split is not None else load_split_for(cfg.data.dataset)
    device = torch.device(cfg.run.device)
    if model is None:
        model = build_model(cfg, split.data.num_items, split)
    if model.num_items != split.data.num_items:
        raise ValueError(f"model has {model.num_items} items, dataset {split.data.name} has {split.data.num_items}")
    model.to(device)
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    ckpt_dir = out_dir / "checkpoint"

    engine = LocalEngine(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip,
                         loss_backend=cfg.optim.loss_backend)
    if objective is None and getattr(model, "needs_users", False):  # DeepFM, DCN-v2, LightGCN
        from prmkd_dist.distill.interaction import student_objective

        objective = student_objective(cfg, split, model)
    if objective is None:
        objective = NextItemObjective(split, cfg.data.max_len, cfg.optim.batch_size, cfg.run.seed, device,
                                      cfg.data.windows, configured_stride(cfg))
    writer = _tb_writer(cfg)
    eval_kw = _eval_kwargs(cfg)

    best = {"score": -math.inf, "epoch": 0, "valid": {}, "state": None}
    history, bad_evals, step, epoch, stopped_by_budget, finished, elapsed = [], 0, 0, 0, False, False, 0.0
    resume_path = out_dir / RESUME_FILE
    if cfg.run.resume and resume_path.exists():
        saved = load_resume_state(resume_path, cfg)
        model.load_state_dict(saved["model"])
        engine.optimizer.load_state_dict(saved["optimizer"])
        if hasattr(objective, "load_state_dict"):
            objective.load_state_dict(saved["objective"])
        _set_random_states(saved["random"])
        loop = saved["loop"]
        best, history, bad_evals, step, epoch = loop["best"], loop["history"], loop["bad_evals"], loop["step"], loop["epoch"]
        stopped_by_budget, finished, elapsed = loop["stopped_by_budget"], loop["finished"], loop["elapsed"]
        log.info("resumed from %s after epoch %d (best epoch %d)", resume_path, epoch, best["epoch"])
    t0 = time.perf_counter() - elapsed  # the time budget and train_seconds count the interrupted part too
    first = cfg.optim.epochs + 1 if finished else epoch + 1
    epochs_bar = tqdm(range(first, cfg.optim.epochs + 1), desc="epochs", unit="ep", disable=not cfg.run.progress,
                      initial=first - 1, total=cfg.optim.epochs)

    def keep_state():
        if cfg.run.resume:
            save_resume_state(resume_path, cfg, model, engine, objective, {
                "best": best, "history": history, "bad_evals": bad_evals, "step": step, "epoch": epoch,
                "stopped_by_budget": stopped_by_budget, "finished": finished, "elapsed": time.perf_counter() - t0})

    for epoch in epochs_bar:
        engine.train()
        loss_sum, n_batches = 0.0, 0
        for batch in tqdm(objective.batches(epoch), total=objective.num_batches(), desc=f"epoch {epoch}",
                          unit="batch", leave=False, disable=not cfg.run.progress):
            loss = objective.loss(engine, batch)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"epoch {epoch} step {step}: loss is {float(loss.detach())}; lower optim.lr?")
            engine.step(loss)
            loss_value = float(loss.detach())
            loss_sum += loss_value
            n_batches += 1
            step += 1
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, step)
        train_loss = loss_sum / max(n_batches, 1)
        stats = objective.epoch_stats()  # read every epoch: an objective may reset its counters here
        if writer is not None:
            for k, v in stats.items():
                writer.add_scalar(f"train/{k}", v, epoch)
        budget = cfg.optim.max_train_seconds
        out_of_time = budget > 0 and time.perf_counter() - t0 >= budget
        if epoch % cfg.optim.eval_every and epoch != cfg.optim.epochs and not out_of_time:
            keep_state()
            continue
        valid = evaluate(model, split, "valid", **eval_kw)
        history.append({"epoch": epoch, "train_loss": train_loss, **stats, **valid})
        if writer is not None:
            writer.add_scalar("train/epoch_loss", train_loss, epoch)
            for k, v in valid.items():
                if k != "users":
                    writer.add_scalar(f"valid/{k}", v, epoch)
        epochs_bar.set_postfix(loss=f"{train_loss:.4f}", ndcg10=f"{valid[SELECT_METRIC]:.4f}")
        log.info("epoch %d loss %.4f valid %s %.4f", epoch, train_loss, SELECT_METRIC, valid[SELECT_METRIC])
        if valid[SELECT_METRIC] > best["score"]:
            best = {"score": valid[SELECT_METRIC], "epoch": epoch, "valid": valid,
                    "state": copy.deepcopy(model.state_dict())}
            save_checkpoint(ckpt_dir, objective.checkpoint_model(model), cfg, split, epoch, valid)
            bad_evals = 0
        else:
            bad_evals += 1
            if cfg.optim.patience > 0 and bad_evals >= cfg.optim.patience:
                log.info("early stop at epoch %d (best epoch %d)", epoch, best["epoch"])
                finished = True
        if out_of_time and not finished:
            log.warning("optim.max_train_seconds=%.0f reached after epoch %d; keeping best epoch %d",
                        budget, epoch, best["epoch"])
            stopped_by_budget = finished = True
        finished = finished or epoch == cfg.optim.epochs
        keep_state()
        if finished:
            break
    epochs_bar.close()
    train_seconds = time.perf_counter() - t0

    model.load_state_dict(best["state"])
    test = evaluate(model, split, "test", **eval_kw)
    test_sampled = None
    if cfg.eval.sampled:
        test_sampled = evaluate_sampled(model, split, "test", num_negatives=cfg.eval.num_negatives,
                                        seed=cfg.run.seed, ks=(10,), batch_size=cfg.eval.batch_size,
                                        max_len=cfg.data.max_len, progress=cfg.run.progress)
    if writer is not None:
        for k, v in test.items():
            if k != "users":
                writer.add_scalar(f"test/{k}", v, best["epoch"])
        writer.close()
    result = TrainResult(best_epoch=best["epoch"], valid=best["valid"], test=test, test_sampled=test_sampled,
                         history=history, train_seconds=train_seconds, epochs_run=epoch,
                         checkpoint_dir=str(ckpt_dir), stopped_by_budget=stopped_by_budget)
    (out_dir / "results.json").write_text(json.dumps(result.to_dict(), indent=2))
    if cfg.run.resume:
        resume_path.unlink(missing_ok=True)  # finished: nothing to resume (it holds two copies of the weights)
    return result
