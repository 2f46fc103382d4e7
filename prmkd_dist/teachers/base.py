"""The Teacher interface: what every teacher (built-in or a user's own) offers to the rest of prmkd-dist.

A teacher maps left-padded histories ``[B, L]`` (PAD_ID = -1 on the left, most recent item at the right
end) to scores over the whole catalog ``[B, C]`` whose columns are the item ids 0..C-1 of the dataset it
was trained on (identified by ``item_fingerprint``). Scores are logits: higher = better. The shard
export only needs ``topk``; the distillation of item embeddings may use ``item_embeddings``.

A teacher is saved as a directory::

    teacher.json        {"format": "prmkd-dist/teacher", "version": 1, "kind", "class": "module:QualName",
                         "name", "num_items", "item_fingerprint", "config": {constructor kwargs},
                         "info": {free-form: training metrics, timings, ...}}
    weights.safetensors the module's state_dict (parameters and persistent buffers)

Plugging in your own model: subclass ``Teacher``, give it a unique ``kind``, implement ``score`` and
``config`` (the JSON-serialisable keyword arguments that rebuild the architecture), decorate it with
``@register_teacher``. ``save``/``load_teacher``/``topk`` then work unchanged::

    @register_teacher
    class PopularityTeacher(Teacher):
        kind = "popularity"

        def __init__(self, num_items: int, item_fingerprint: str, name: str = "popularity"):
            super().__init__(num_items, item_fingerprint, name)
            self.register_buffer("counts", torch.zeros(num_items))

        def config(self) -> dict:
            return {}

        def score(self, history):
            return self.counts.expand(history.shape[0], -1)

``load_teacher(dir)`` finds the class through the registry, or imports the module named in
teacher.json, so a plug-in defined in your own package loads without registering it by hand first.
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import json
import os
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from prmkd_dist.constants import PAD_ID

FORMAT = "prmkd-dist/teacher"
VERSION = 1
CONFIG_FILE = "teacher.json"
WEIGHTS_FILE = "weights.safetensors"


class TeacherError(ValueError):
    """A teacher cannot be built, loaded or used as asked."""


class FingerprintMismatchError(TeacherError):
    """A teacher built on one item-id space is used with a dataset of another."""


TEACHER_REGISTRY: dict[str, type["Teacher"]] = {}


def register_teacher(cls: type["Teacher"]) -> type["Teacher"]:
    """Class decorator: make ``cls`` loadable by its ``kind`` (unique across the registry)."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TeacherError(f"{cls.__qualname__}: a registered teacher needs a non-empty class attribute `kind`")
    other = TEACHER_REGISTRY.get(kind)
    if other is not None and other is not cls and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TeacherError(f"teacher kind {kind!r} is already registered by {other.__module__}.{other.__qualname__}")
    TEACHER_REGISTRY[kind] = cls
    return cls


def check_history(history: torch.Tensor, num_items: int, who: str = "history") -> None:
    """Raise TeacherError unless ``history`` is a [B, L] integer tensor of ids in 0..C-1 or PAD_ID."""
    if history.dim() != 2 or history.dtype not in (torch.int64, torch.int32):
        raise TeacherError(f"{who}: expected a [B, L] int64 tensor, got {tuple(history.shape)} {history.dtype}")
    bad = (history < PAD_ID) | (history >= num_items)
    if bool(bad.any()):
        row, col = (int(x) for x in bad.nonzero()[0])
        raise TeacherError(
            f"{who}: row {row}, position {col} holds id {int(history[row, col])}; expected 0..{num_items - 1} or PAD_ID={PAD_ID}"
        )


def eval_history_len(teacher, split) -> int:
    """History length to evaluate ``teacher`` on ``split`` with: its own ``max_len``, else the longest test input
    (a whole-history teacher such as EASE: the training prefix + the validation item)."""
    return int(getattr(teacher, "max_len", None) or np.diff(split.train_offsets).max() + 1)


def seed_init(seed: int | None) -> None:
    """Seed torch's RNG (when ``seed`` is given) right before a teacher's network is built. Without it the
    initial weights depend on whatever drew from the RNG earlier in the process: another teacher's training
    in the pipeline, or the text encoder on a text-cache miss but not on a hit, so the same config trained
    alone and inside the pipeline (or twice) started from different weights."""
    if seed is not None:
        torch.manual_seed(int(seed))


class Teacher(nn.Module, abc.ABC):
    """Base class of every teacher. Subclasses set ``kind`` and implement ``score`` and ``config``."""

    kind: str = ""
    # what the scores mean, as the shard format records it (prmkd_dist.data.shards.SCORE_SEMANTICS):
    # "logit" = trained through a softmax over items, "similarity" = any other higher-is-better score
    score_semantics: str = "logit"

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None):
        super().__init__()
        if num_items <= 0:
            raise TeacherError(f"num_items must be > 0, got {num_items}")
        if not item_fingerprint:
            raise TeacherError("item_fingerprint must be the dataset's fingerprint (InteractionData.fingerprint)")
        self.num_items = int(num_items)
        self.item_fingerprint = str(item_fingerprint)
        self.name = name or self.kind
        # free-form facts saved with the teacher (validation metrics, training time, ...)
        self.info: dict[str, Any] = {}

    # ---- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded item ids -> [B, C] float scores (higher = better; see ``score_semantics``).

        Any L is accepted; a teacher with a bounded context uses the most recent items."""

    @abc.abstractmethod
    def config(self) -> dict:
        """JSON-serialisable keyword arguments that, with num_items/item_fingerprint/name, rebuild this
        architecture: ``type(self)(num_items=..., item_fingerprint=..., name=..., **config())``."""

    def item_embeddings(self) -> torch.Tensor | None:
        """[C, D] item representations the teacher scores with, or None if it has none (e.g. EASE)."""
        return None

    @property
    def max_len(self) -> int | None:
        """Longest history the teacher reads (it keeps the most recent items); None = the whole history.
        An exporter builds histories this long."""
        return None

    # ---- derived ------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Number of stored weights: parameters and persistent buffers, frozen ones included."""
        return sum(t.numel() for t in self.state_dict().values())

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Eval mode and no autograd for the duration; restores the previous mode afterwards."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    @torch.no_grad()
    def topk(self, history: torch.Tensor, k: int, exclude_history: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best items per row: ``(ids [B, k] int64, scores [B, k] float32)``, sorted by descending
        score, distinct, never PAD_ID while candidates remain.

        ``exclude_history`` removes the items of the row's history (as the full-ranking evaluation does
        with seen items). A row with fewer than ``k`` candidates left gets empty slots at its end:
        id PAD_ID with score 0.0 (kd_loss's empty slot, finite so that its input check accepts it; an
        exporter writing the variable-length shard lists simply drops them)."""
        check_history(history, self.num_items)
        if not 0 < k <= self.num_items:
            raise TeacherError(f"k must be in 1..num_items={self.num_items}, got {k}")
        with self.inference():
            scores = self.score(history).float()
        if scores.shape != (history.shape[0], self.num_items):
            raise TeacherError(f"{self.name}: score() returned {tuple(scores.shape)}, expected {(history.shape[0], self.num_items)}")
        if not bool(torch.isfinite(scores).all()):
            row = int((~torch.isfinite(scores)).any(dim=1).nonzero()[0])
            raise TeacherError(f"{self.name}: score() returned a NaN/inf in row {row}")
        if exclude_history:
            # an extra column C receives the padding, so PAD_ID never masks a real item
            padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
            cols = torch.where(history == PAD_ID, self.num_items, history).to(torch.int64).to(scores.device)
            padded.scatter_(1, cols, float("-inf"))
            scores = padded[:, : self.num_items]
        top_scores, top_ids = torch.topk(scores, k, dim=1, largest=True, sorted=True)
        empty = torch.isinf(top_scores)
        top_ids = top_ids.masked_fill(empty, PAD_ID)
        top_scores = top_scores.masked_fill(empty, 0.0)
        return top_ids.to(torch.int64), top_scores.to(torch.float32)

    def check_compatible(self, fingerprint: str) -> None:
        """Raise FingerprintMismatchError unless this teacher was built on the item-id space ``fingerprint``."""
        if fingerprint != self.item_fingerprint:
            raise FingerprintMismatchError(
                f"teacher {self.name!r} was built on items with fingerprint {self.item_fingerprint}, "
                f"but the dataset has {fingerprint}: its score columns would be other items"
            )

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write teacher.json and weights.safetensors into ``directory`` (created if needed)."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "name": self.name,
            "num_items": self.num_items,
            "item_fingerprint": self.item_fingerprint,
            "config": self.config(),
            "info": self.info,
        }
        text = json.dumps(meta, indent=2)  # fail before writing anything if config/info are not JSON
        save_model(self, os.path.join(directory, WEIGHTS_FILE))
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            f.write(text)

    @classmethod
    def load(cls, directory: str | os.PathLike, fingerprint: str | None = None,
             device: str | torch.device = "cpu") -> "Teacher":
        """Load a saved teacher; if ``fingerprint`` is given (the dataset's), refuse a teacher built on
        another item-id space. Called on a subclass, also checks that the saved teacher is of that class."""
        teacher = load_teacher(directory, fingerprint=fingerprint, device=device)
        if not isinstance(teacher, cls):
            raise TeacherError(f"{directory}: holds a {type(teacher).__qualname__}, not a {cls.__qualname__}")
        return teacher


def read_teacher_meta(directory: str | os.PathLike) -> dict:
    """The validated teacher.json of a saved teacher."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.exists(path):
        raise TeacherError(f"{directory}: not a saved teacher (no {CONFIG_FILE})")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TeacherError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    for key in ("kind", "class", "num_items", "item_fingerprint", "config"):
        if key not in meta:
            raise TeacherError(f"{path}: missing key {key!r}")
    return meta


def _teacher_class(meta: dict, path: str) -> type[Teacher]:
    cls = TEACHER_REGISTRY.get(meta["kind"])
    if cls is None:
        module_name, _, qualname = meta["class"].partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as e:
            raise TeacherError(f"{path}: teacher kind {meta['kind']!r} is not registered and module {module_name!r} cannot be imported ({e})") from e
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        cls = TEACHER_REGISTRY.get(meta["kind"]) or obj
    if not (isinstance(cls, type) and issubclass(cls, Teacher)):
        raise TeacherError(f"{path}: no Teacher class for kind {meta['kind']!r} ({meta['class']})")
    return cls


def load_teacher(directory: str | os.PathLike, fingerprint: str | None = None,
                 device: str | torch.device = "cpu") -> Teacher:
    """Rebuild a saved teacher of any registered (or importable) kind, in eval mode on ``device``.

    ``fingerprint``: the dataset's ``InteractionData.fingerprint``; a mismatch raises
    FingerprintMismatchError before any weight is read."""
    import prmkd_dist.teachers  # noqa: F401  (registers the built-in kinds)

    directory = os.fspath(directory)
    meta = read_teacher_meta(directory)
    path = os.path.join(directory, CONFIG_FILE)
    cls = _teacher_class(meta, path)
    if fingerprint is not None and fingerprint != meta["item_fingerprint"]:
        raise FingerprintMismatchError(
            f"{path}: teacher {meta.get('name')!r} was built on items with fingerprint {meta['item_fingerprint']}, "
            f"but the dataset has {fingerprint}: its score columns would be other items"
        )
    try:
        teacher = cls(num_items=int(meta["num_items"]), item_fingerprint=meta["item_fingerprint"],
                      name=meta.get("name"), **meta["config"])
    except TypeError as e:
        raise TeacherError(f"{path}: config does not fit {cls.__qualname__}: {e}") from e
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.exists(weights):
        raise TeacherError(f"{directory}: missing {WEIGHTS_FILE}")
    missing, unexpected = load_model(teacher, weights, strict=False, device=str(device))
    if missing or unexpected:
        raise TeacherError(f"{weights}: weights do not match {cls.__qualname__}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    teacher.info = dict(meta.get("info") or {})
    return teacher.to(device).eval()


class SequentialModelTeacher(Teacher):
    """A teacher whose scores come from a ``SequentialStudent``-shaped network ``self.model`` (encode /
    output_weight / score), so that the project's trainer (full-softmax CE, early stopping on validation
    NDCG@10) trains it unchanged. Subclasses build ``self.model`` in ``__init__`` from their config."""

    model: nn.Module

    @property
    def max_len(self) -> int:
        """Longest history the network reads; ``score`` keeps the most recent ``max_len`` items."""
        return int(self.model.max_len)

    def score(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.score(history[:, -self.max_len:])

    def item_embeddings(self) -> torch.Tensor:
        return self.model.output_weight()
