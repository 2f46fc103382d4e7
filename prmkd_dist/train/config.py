"""Typed run configuration, read from YAML.

A config file has one mapping per section (``data``, ``model``, ``optim``, ``eval``, ``run``); each
section is a dataclass below, and the loader is generic over dataclass fields, so adding a section
(distill, teachers, parallel, ...) is one dataclass plus one field of ``TrainConfig``.

Every problem is a ``ConfigError`` naming the file, the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration file or override does not match the typed schema."""


@dataclass
class DataConfig:
    dataset: str  # builtin name ("ml-latest-small", "amazon-games"), reader YAML, or prepared dir
    max_len: int = 200  # most recent items kept per input history
    # training windows per user: "last" (the most recent max_len items) or "all" (the whole training
    # prefix in consecutive max_len windows: every interaction is a target once); see train/trainer.py
    windows: str = "last"
    # "all" windows (and the window-packed distillation, which always uses them) start every window_stride
    # items (0 = max_len: consecutive windows); a smaller stride overlaps them, the first max_len - window_stride
    # positions of a window being context without a target
    window_stride: int = 0

    def problems(self) -> dict[str, str]:
        out = {"max_len": "expected a value >= 1"} if self.max_len < 1 else {}
        if self.windows not in ("last", "all"):
            out["windows"] = f"expected 'last' or 'all', got {self.windows!r}"
        if not 0 <= self.window_stride <= max(self.max_len, 0):
            out["window_stride"] = f"expected 0 (= max_len) or 1..max_len ({self.max_len}), got {self.window_stride}"
        return out


@dataclass
class ModelConfig:
    name: str  # student name for prmkd_dist.models.build_student
    hparams: dict[str, Any] = field(default_factory=dict)  # passed as keyword arguments


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 50
    patience: int = 5  # evaluations without a better validation NDCG@10 before stopping; 0 = never stop early
    eval_every: int = 1  # epochs between validation evaluations
    loss_backend: str = "auto"  # backend of the fused catalog loss: auto | reference | cpp | triton
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # wall-clock safety net (quickstart must fit a slow machine): stop after the epoch that crosses it,
    # keep the best validated epoch; 0 = off. A run cut by it depends on machine speed.
    max_train_seconds: float = 0.0
    # feature-interaction students (DeepFM, DCN-v2): uniform negatives added to each example's candidate set
    # (target + the teachers' top-K); prmkd_dist/distill/interaction.py
    num_negatives: int = 100

    def problems(self) -> dict[str, str]:
        minimum = {"lr": (0.0, False), "weight_decay": (0.0, True), "batch_size": (1, True), "epochs": (1, True),
                   "patience": (0, True), "eval_every": (1, True), "num_negatives": (0, True),
                   "grad_clip": (0.0, True), "max_train_seconds": (0.0, True)}  # field -> (bound, inclusive)
        return {k: f"expected a value {'>=' if incl else '>'} {lo}" for k, (lo, incl) in minimum.items()
                if not (getattr(self, k) >= lo if incl else getattr(self, k) > lo)}


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (10, 20)
    num_negatives: int = 100  # sampled protocol (SASRec paper)
    sampled: bool = False  # also report the sampled protocol
    exclude_history: bool = True
    batch_size: int = 1024

    def problems(self) -> dict[str, str]:
        out = {}
        if not self.ks or any(k < 1 for k in self.ks):
            out["ks"] = "expected a non-empty list of cutoffs >= 1"
        if self.num_negatives < 1:
            out["num_negatives"] = "expected a value >= 1"
        if self.batch_size < 1:
            out["batch_size"] = "expected a value >= 1"
        return out


@dataclass
class RunConfig:
    seed: int = 0
    out_dir: str = "runs/default"
    device: str = "cpu"
    num_threads: int = 0  # 0 = torch default
    tensorboard: bool = True
    progress: bool = True  # tqdm bars
    # keep <out_dir>/resume.pt after every epoch and continue from it when it exists: an interrupted run ends with
    # the numbers of an uninterrupted one (prmkd_dist.train.trainer, "Resume")
    resume: bool = False


# ---- distillation (prmkd_dist.distill.trainer); off unless ``distill.shards`` is set ----------------
CURRICULUM_KINDS = ("none", "disagreement", "length_popularity")
PACINGS = ("linear", "root")
WEIGHT_STRATEGIES = ("uniform", "confidence", "consistency", "confidence_consistency")


@dataclass
class EmbeddingDistillConfig:
    """DLLM2Rec collaborative embedding distillation: item row = own row + projection(teacher rows)."""
    enabled: bool = False
    hidden: int = 0  # 0 = linear projection; > 0 = two-layer MLP of that width

    def problems(self) -> dict[str, str]:
        return {"hidden": "expected a value >= 0"} if self.hidden < 0 else {}


@dataclass
class CurriculumConfig:
    """Per-batch curriculum: examples harder than the pacing quantile are masked out of the loss."""
    kind: str = "none"  # none | disagreement (teacher-student KL on the teachers' top-K) | length_popularity
    pacing: str = "linear"  # linear | root: fraction kept grows from ``start`` to 1 over ``epochs``
    start: float = 0.5
    epochs: int = 5

    def problems(self) -> dict[str, str]:
        out = {}
        if self.kind not in CURRICULUM_KINDS:
            out["kind"] = f"expected one of {CURRICULUM_KINDS}"
        if self.pacing not in PACINGS:
            out["pacing"] = f"expected one of {PACINGS}"
        if not 0.0 < self.start <= 1.0:
            out["start"] = "expected a fraction in (0, 1]"
        if self.epochs < 1:
            out["epochs"] = "expected a value >= 1"
        return out


@dataclass
class MKDConfig:
    """MKD parts (prmkd_dist.distill.mkd): NKD (input neighbours), CPD (hidden-state alignment), SLD."""
    nkd: bool = False
    nkd_neighbours: int = 10
    nkd_beta: float = 0.5  # weight of the neighbour average added to each item row
    cpd: float = 0.0  # weight of the consistent-preference loss; 0 = off
    sld: float = 0.0  # weight of the blended soft-label KD term; 0 = off (with lambda_kd > 0: one more teacher of the KD loss)
    sld_beta: float = 0.5  # share of the teachers in the blended soft label (rest: the student's own)

    def problems(self) -> dict[str, str]:
        out = {}
        if self.nkd_neighbours < 1:
            out["nkd_neighbours"] = "expected a value >= 1"
        for k in ("nkd_beta", "cpd", "sld"):
            if getattr(self, k) < 0:
                out[k] = "expected a value >= 0"
        if not 0.0 <= self.sld_beta <= 1.0:
            out["sld_beta"] = "expected a fraction in [0, 1]"
        return out


@dataclass
class DistillConfig:
    shards: str = ""  # merged teacher-score shard directory; "" = no distillation (plain trainer)
    teachers: tuple[str, ...] = ()  # subset of the shards' teachers; empty = all
    strategy: str = "confidence_consistency"  # teacher_weights strategy
    alpha: float = 0.5
    gamma: float = 0.2
    temperature: float = 1.0
    lambda_ce: float = 1.0
    lambda_kd: float = 1.0
    lambda_rank: float = 0.0  # > 0 turns on importance-aware ranking distillation
    # "std": divide each teacher list's scores by their spread (teachers on different scales share one
    # temperature; distill.trainer.standardise_scores); "none": use the shards' scores as logits
    score_norm: str = "none"
    # {teacher name: factor >= 0}: multiplies that teacher's weight w_bt on every row after the strategy (absent
    # = 1). For a teacher known to be weaker than the student: the strategies normalise over the teachers, so a
    # lone teacher always gets weight 1 (on Games, distilling EASE alone at full weight cost 9 % NDCG@10)
    teacher_scale: dict[str, float] = field(default_factory=dict)
    gamma_position: float = 0.3
    gamma_confidence: float = 0.5
    gamma_consistency: float = 0.1
    student_topk: int = 0  # consistency cut-off of importance_weights; 0 = the shards' K
    teacher_embeddings: tuple[str, ...] = ()  # embedding shard dirs (embedding distillation, NKD, CPD)
    embedding: EmbeddingDistillConfig = field(default_factory=EmbeddingDistillConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    mkd: MKDConfig = field(default_factory=MKDConfig)
    # "example": stream the shards, one encoder pass per example (any data size); "window": read the shards
    # into memory by example key and distil every position of a training window (sequential students;
    # about max_len times fewer encoder passes). See prmkd_dist/distill/packed.py.
    packing: str = "example"
    shuffle_buffer_rows: int = 16384
    # smoke runs only: stop each epoch after this many batches (the rows not read are logged); 0 = all
    max_batches_per_epoch: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.shards)

    def problems(self) -> dict[str, str]:
        out = {}
        if self.strategy not in WEIGHT_STRATEGIES:
            out["strategy"] = f"expected one of {WEIGHT_STRATEGIES}"
        if not 0.0 <= self.alpha <= 1.0:
            out["alpha"] = "expected a value in [0, 1]"
        for k in ("gamma", "temperature"):
            if not getattr(self, k) > 0:
                out[k] = "expected a value > 0"
        for k in ("lambda_ce", "lambda_kd", "lambda_rank", "gamma_position", "gamma_confidence",
                  "gamma_consistency", "student_topk"):
            if getattr(self, k) < 0:
                out[k] = "expected a value >= 0"
        for name, f in self.teacher_scale.items():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 0:
                out["teacher_scale"] = f"teacher {name!r}: expected a finite number >= 0, got {f!r}"
        if self.score_norm not in ("none", "std"):
            out["score_norm"] = f"expected 'none' or 'std', got {self.score_norm!r}"
        if self.packing not in ("example", "window"):
            out["packing"] = f"expected 'example' or 'window', got {self.packing!r}"
        if self.shuffle_buffer_rows < 1:
            out["shuffle_buffer_rows"] = "expected a value >= 1"
        if self.max_batches_per_epoch < 0:
            out["max_batches_per_epoch"] = "expected a value >= 0"
        needs_emb = self.embedding.enabled or self.mkd.nkd or self.mkd.cpd > 0
        if needs_emb and not self.teacher_embeddings:
            out["teacher_embeddings"] = ("expected at least one embedding shard directory "
                                         "(embedding.enabled, mkd.nkd and mkd.cpd read teacher item embeddings)")
        return out


@dataclass
class TrainConfig:
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict:
        """Plain YAML-able dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---- generic typed conversion ----------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str, source: str):
    """Check/convert ``value`` to the annotation ``tp``; ``where`` is the dotted key for errors."""
    def fail(expected: str):
        raise ConfigError(f"{source}: {where}: expected {expected}, got {type(value).__name__} {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where, source)
            except ConfigError as e:
                errors.append(str(e))
        fail(" or ".join(_type_name(a) for a in args))
    if tp is bool:
        if not isinstance(value, bool):
            fail("a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string: accept numeric literals only
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        fail("a number")
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(f"a list of {_type_name(args[0])}")
        return tuple(_convert(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    raise TypeError(f"config schema uses an unsupported type {tp!r} at {where}")  # a bug in this file


def _build(cls, raw, where: str, source: str):
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where or 'top level'}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]!s}; expected one of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], prefix + name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {prefix}{name} ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    # value-range checks live next to the fields (optional ``problems() -> {field: expectation}``)
    for name, expected in (obj.problems() if hasattr(obj, "problems") else {}).items():
        raise ConfigError(f"{source}: {prefix}{name}={getattr(obj, name)!r}: {expected}")
    return obj


def _apply_override(raw: dict, override: str) -> None:
    """Apply ``"a.b.c=value"`` (value parsed as YAML) to the raw nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-3")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty component in key {key!r}")
    node = raw
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> TrainConfig:
    """Build a TrainConfig from a nested dict (plus ``section.key=value`` overrides)."""
    import copy

    raw = copy.deepcopy(raw) if raw is not None else {}
    for ov in overrides or []:
        _apply_override(raw, ov)
    src = source + (f" (with overrides {list(overrides)})" if overrides else "")
    return _build(TrainConfig, raw, "", src)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or the name of a packaged config (``quickstart`` -> configs/quickstart.yaml)."""
    p = Path(path)
    if p.exists():
        return p
    packaged = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if packaged.exists() and len(p.parts) == 1:
        return packaged
    raise ConfigError(f"{path}: config file not found (packaged configs: {sorted(x.stem for x in CONFIG_DIR.glob('*.yaml'))})")


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (path or packaged name) and apply ``"section.key=value"`` overrides."""
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level: expected a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, str(p), overrides)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
