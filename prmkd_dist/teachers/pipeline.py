"""The teacher stage in one call: train a dataset's teachers, export each one's top-K over the training
examples, merge the exports into the training shards, validate them, and measure every teacher
(validation/test full-ranking metrics, parameters, inference cost) side by side.

Teacher configs (``prmkd_dist/configs/teachers/<kind>[_variant]-<ml|games>.yaml``)::

    name: id-transformer          # teacher name = shard column prefix (letters, digits, _ -)
    kind: id_transformer          # unisrec | id_transformer | ease | transition
    dataset: ml-latest-small      # for `teachers train`; the pipeline passes its own dataset
    hparams: {dim: 256, ...}      # constructor keywords (ease: l2, or l2_grid to pick the best on validation;
                                  #   recent: N reads only the N most recent items; transition: l2 or l2_grid,
                                  #   window, decay, alpha > 0 for SLIST)
    train: {lr: 1.0e-3, ...}      # fit_teacher keywords (neural teachers only)
    export: {k: 50, max_history: 200, batch_size: 512}   # + cross_fit: N exports out-of-fold lists: each example's
                                  #   from one of N teachers fitted without its user (prmkd_dist.teachers.crossfit)
    distill: {teacher: slist, temperature: 2.0, ...}   # optional, neural teachers: also learn from another teacher
                                  #   of the same pipeline (its export = the distill shards; it is trained and
                                  #   exported first); the other keys are the trainer's `distill` section
    fast: {hparams: {...}, train: {...}, export: {...}}   # overrides for --fast (a smoke run)

Layout of the pipeline's output directory (default ``artifacts/teachers/<dataset>``)::

    models/<name>/      saved teachers (Teacher.save); reused when their recorded config is unchanged
    exports/<name>/     one teacher's shards (+ embeddings/), resumable (prmkd_dist.teachers.export)
    shards/             the merged training shards (all teachers), validated
    pipeline.json       the report: stage times, metrics, parameters, inference cost
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from prmkd_dist.data.dataset import LeaveOneOutSplit, left_pad
from prmkd_dist.data.merge import merge_teacher_shards
from prmkd_dist.data.paths import artifacts_root
from prmkd_dist.data.shards import validate_shards
from prmkd_dist.teachers.base import Teacher, TeacherError, eval_history_len, load_teacher

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "teachers"
KINDS = ("unisrec", "id_transformer", "ease", "transition")
CLOSED_FORM = ("ease", "transition")  # fitted, not trained: no train section
# The teachers of each builtin dataset: amazon-games has no item text, so no text teacher, and its collaborative teacher
# of another family is SLIST (an item-transition model): EASE reads a history as a set and stays 23 % below the
# student there, SLIST is 9 % above it (benchmarks/RESULTS.md, teachers amazon-games).
DATASET_TEACHERS = {
    "ml-latest-small": ("unisrec-ml", "id_transformer-ml", "ease-ml"),
    "amazon-games": ("transition_slist-games", "id_transformer-games"),  # the ID transformer distils from SLIST
}
# Packaged configs outside the default sets, for `--teachers`: on ml the item-transition teachers, SLIT and SLIST (the
# strongest there), stay out of the default set until the default multi-teacher recipe is measured with them.
EXTRA_TEACHERS = {
    "ml-latest-small": ("transition-ml", "transition_slist-ml"),
    "amazon-games": ("transition-games", "ease-games", "transition_slist_oof-games", "id_transformer_oof-games"),
}
_SECTIONS = {"name", "kind", "dataset", "hparams", "train", "export", "distill", "fast"}
_TRAIN_KEYS = {"lr", "batch_size", "epochs", "patience", "eval_every", "weight_decay", "grad_clip", "seed", "num_threads",
               "windows"}
_EXPORT_KEYS = {"k", "max_history", "batch_size", "rows_per_file", "cross_fit"}
COST_COLUMNS = ["NDCG@10", "HR@10", "NDCG@20", "HR@20", "params", "ms/1k users", "train s"]


class TeacherConfigError(ValueError):
    """A teacher config file does not follow the documented form (the message names file and key)."""


@dataclass
class TeacherConfig:
    name: str
    kind: str
    dataset: str
    hparams: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    source: str = ""
    distill: dict = field(default_factory=dict)  # {teacher: <name>, <DistillConfig keys>}; {} = CE only

    @property
    def distill_from(self) -> str | None:
        """The name of the teacher this one is distilled from (None: trained on the CE target alone)."""
        return self.distill.get("teacher") if self.distill else None

    def distill_config(self, shards: str | os.PathLike):
        """The trainer's DistillConfig for this teacher, reading ``shards`` (the source teacher's export)."""
        from prmkd_dist.train.config import ConfigError, DistillConfig, _build

        raw = {k: v for k, v in self.distill.items() if k != "teacher"}
        raw["shards"] = str(shards)
        try:
            return _build(DistillConfig, raw, "distill", self.source)
        except ConfigError as e:
            raise TeacherConfigError(str(e)) from None

    def resolved(self) -> dict:
        """What decides the trained weights (a saved teacher with the same record is reused)."""
        out = {"name": self.name, "kind": self.kind, "hparams": self.hparams, "train": self.train}
        if self.distill:
            out["distill"] = self.distill
        return out


def teacher_config_path(name_or_path: str | os.PathLike) -> Path:
    """A YAML path, or the name of a builtin teacher config (``id_transformer-ml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise TeacherConfigError(f"{path}: no such teacher config file")
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if builtin.is_file():
        return builtin
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise TeacherConfigError(f"{name_or_path!r} is neither a teacher config file nor a builtin one ({names})")


def load_teacher_config(name_or_path: str | os.PathLike, fast: bool = False) -> TeacherConfig:
    """Read and check a teacher config; ``fast`` applies its ``fast:`` overrides section by section."""
    path = teacher_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TeacherConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise TeacherConfigError(f"{path}: expected a mapping with keys {sorted(_SECTIONS)}")
    unknown = set(raw) - _SECTIONS
    if unknown:
        raise TeacherConfigError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    for key in ("name", "kind", "dataset"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise TeacherConfigError(f"{path}: {key!r} must be a non-empty string")
    if raw["kind"] not in KINDS:
        raise TeacherConfigError(f"{path}: kind {raw['kind']!r}, expected one of {KINDS}")
    sections = {}
    for sec, allowed in (("hparams", None), ("train", _TRAIN_KEYS), ("export", _EXPORT_KEYS)):
        value = copy.deepcopy(raw.get(sec) or {})
        if fast:
            value.update((raw.get("fast") or {}).get(sec) or {})
        if not isinstance(value, dict):
            raise TeacherConfigError(f"{path}: {sec!r} must be a mapping")
        bad = set(value) - allowed if allowed is not None else set()
        if bad:
            raise TeacherConfigError(f"{path}: {sec}.{sorted(bad)[0]} is not a known key; expected {sorted(allowed)}")
        sections[sec] = value
    bad_fast = set(raw.get("fast") or {}) - {"hparams", "train", "export"}
    if bad_fast:
        raise TeacherConfigError(f"{path}: fast.{sorted(bad_fast)[0]}: only hparams, train and export can be overridden")
    if raw["kind"] in CLOSED_FORM and sections["train"]:
        raise TeacherConfigError(f"{path}: {raw['kind']} has a closed form; 'train' must be empty")
    folds = sections["export"].get("cross_fit")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
        raise TeacherConfigError(f"{path}: export.cross_fit must be an int >= 2 (the number of user folds), got {folds!r}")
    distill = copy.deepcopy(raw.get("distill") or {})
    if distill:
        if raw["kind"] in CLOSED_FORM:
            raise TeacherConfigError(f"{path}: {raw['kind']} has a closed form; only neural teachers take 'distill'")
        if not isinstance(distill, dict) or not isinstance(distill.get("teacher"), str) or not distill["teacher"]:
            raise TeacherConfigError(f"{path}: distill: expected a mapping whose 'teacher' names the teacher to "
                                     "distil from (another teacher of the same pipeline)")
        if distill["teacher"] == raw["name"]:
            raise TeacherConfigError(f"{path}: distill.teacher: a teacher cannot distil from itself")
        if "shards" in distill:
            raise TeacherConfigError(f"{path}: distill.shards: set by the pipeline (the source teacher's export); "
                                     "name the teacher in distill.teacher instead")
    cfg = TeacherConfig(raw["name"], raw["kind"], raw["dataset"], sections["hparams"], sections["train"],
                        sections["export"], str(path), distill)
    if distill:
        cfg.distill_config("<source export>")  # keys and ranges checked now, not after the source's training
    return cfg


def source_export_dir(cfg: TeacherConfig, exports_root: str | os.PathLike) -> Path:
    """The export directory ``cfg`` distils from (``<exports_root>/<distill.teacher>``); it must be complete (the
    manifest is written last, so an interrupted export has none)."""
    path = Path(exports_root) / cfg.distill_from
    if not (path / "_manifest.json").is_file():
        raise TeacherConfigError(f"{cfg.source}: distill.teacher {cfg.distill_from!r}: no export at {path} (train and "
                                 f"export that teacher first, e.g. `prmkd-dist teachers pipeline` does both in order)")
    return path


def run_key(*parts) -> str:
    """8 hex digits naming what decides a training (config, data fingerprint, the source's export): the scratch
    directory of a resumable teacher training carries it, so a changed config starts in a fresh directory instead
    of continuing another training's state."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def export_record(export_dir: str | os.PathLike) -> dict:
    """What identifies an export made by ``teachers export`` (teacher weights digest, K, history length, rows), read
    from its progress file; {} for shards written by another tool (then a pupil is reused on its config alone)."""
    path = Path(export_dir) / "_export_progress.json"
    if not path.is_file():
        return {}
    settings = json.loads(path.read_text()).get("settings") or {}
    return {k: settings.get(k) for k in ("teacher_digest", "k", "max_history", "num_examples", "item_fingerprint")}


def dependency_order(configs: list[TeacherConfig]) -> list[TeacherConfig]:
    """``configs`` with every distillation source before the teachers distilled from it (otherwise in the given
    order); a source outside the list or a cycle is an error naming the config."""
    by_name = {c.name: c for c in configs}
    done: list[TeacherConfig] = []
    visiting: set[str] = set()

    def visit(c: TeacherConfig) -> None:
        if any(d.name == c.name for d in done):
            return
        if c.name in visiting:
            raise TeacherConfigError(f"{c.source}: distill.teacher forms a cycle through {c.name!r}")
        visiting.add(c.name)
        if c.distill_from is not None:
            if c.distill_from not in by_name:
                raise TeacherConfigError(f"{c.source}: distill.teacher {c.distill_from!r} is not a teacher of this "
                                         f"pipeline ({sorted(by_name)})")
            visit(by_name[c.distill_from])
        visiting.discard(c.name)
        done.append(c)

    for c in configs:
        visit(c)
    return done


# ---- train ------------------------------------------------------------------------------------------
def train_teacher(cfg: TeacherConfig, split: LeaveOneOutSplit, progress: bool = False,
                  work_dir: str | os.PathLike | None = None, exports_root: str | os.PathLike | None = None,
                  resume: bool = False) -> Teacher:
    """Build and train (or fit) the teacher ``cfg`` describes on ``split``; ``info`` records the config,
    the training summary and ``train_seconds_total``. A config with ``distill`` reads its source teacher's
    export under ``exports_root`` (default ``artifacts/teachers/<dataset>/exports``). ``resume``: a neural
    teacher's training keeps its state in ``work_dir`` after every epoch and continues from it (``work_dir`` must
    then be one training's own: ``run_key`` names it)."""
    from prmkd_dist.teachers import EASE, IDTransformerTeacher, ItemTransition, UniSRecTeacher
    from prmkd_dist.teachers.training import fit_teacher

    t0 = time.perf_counter()
    data = split.data
    try:
        if cfg.kind == "ease":
            hp = dict(cfg.hparams)
            grid = hp.pop("l2_grid", None)
            recent = hp.pop("recent", None)
            if grid is not None and "l2" in hp:
                raise TeacherConfigError(f"{cfg.source}: EASE hparams give both l2 and l2_grid; keep one")
            if set(hp) - {"l2"}:
                raise TeacherConfigError(f"{cfg.source}: EASE hparams are l2 or l2_grid, and recent; got {sorted(cfg.hparams)}")
            try:
                teacher = (EASE.fit_select(split, grid=grid, name=cfg.name, recent=recent) if grid
                           else EASE.fit(split, l2=float(hp.get("l2", 500.0)), name=cfg.name, recent=recent))
            except TeacherError as e:  # a closed form fails only on its hparams (l2 <= 0, recent, empty grid)
                raise TeacherConfigError(f"{cfg.source}: {e}") from None
        elif cfg.kind == "transition":
            hp = dict(cfg.hparams)
            grid = hp.pop("l2_grid", None)
            if grid is not None and "l2" in hp:
                raise TeacherConfigError(f"{cfg.source}: transition hparams give both l2 and l2_grid; keep one")
            if set(hp) - {"l2", "window", "decay", "alpha"}:
                raise TeacherConfigError(f"{cfg.source}: transition hparams are l2 or l2_grid, window, decay and alpha; got {sorted(cfg.hparams)}")
            shape = {k: hp[k] for k in ("window", "decay", "alpha") if k in hp}
            try:
                teacher = (ItemTransition.fit_select(split, grid=grid, name=cfg.name, **shape) if grid
                           else ItemTransition.fit(split, l2=float(hp.get("l2", 100.0)), name=cfg.name, **shape))
            except TeacherError as e:
                raise TeacherConfigError(f"{cfg.source}: {e}") from None
        else:
            cls = UniSRecTeacher if cfg.kind == "unisrec" else IDTransformerTeacher
            # the train seed also fixes the initial weights (fit_teacher seeds only the training that follows)
            distill = None
            if cfg.distill:
                root = exports_root if exports_root is not None else artifacts_root() / "teachers" / data.name / "exports"
                source = source_export_dir(cfg, root)
                distill = cfg.distill_config(source)
            teacher = cls.from_data(data, name=cfg.name, seed=int(cfg.train.get("seed", 0)), **cfg.hparams)
            fit_teacher(teacher, split, progress=progress, out_dir=work_dir, distill=distill, resume=resume, **cfg.train)
    except TypeError as e:  # an hparam the constructor does not take
        raise TeacherConfigError(f"{cfg.source}: {e}") from None
    teacher.info["pipeline_config"] = cfg.resolved()
    if cfg.distill:  # a pupil is stale once its source's lists change (pipeline reuse check)
        teacher.info["distill_source"] = export_record(source)
    teacher.info["dataset_fingerprint"] = data.fingerprint
    teacher.info["train_seconds_total"] = round(time.perf_counter() - t0, 2)
    return teacher


# ---- measure ----------------------------------------------------------------------------------------
def inference_ms_per_1k_users(teacher, split: LeaveOneOutSplit, users: int = 1024, batch_size: int = 256,
                              k: int = 10) -> float:
    """Wall milliseconds to score the catalog and take the top-``k`` for 1,000 users' validation
    histories (batches of ``batch_size``, after one warm-up batch), at the current torch thread count."""
    ids = split.eval_users("valid")
    ids = np.resize(ids, users) if len(ids) else ids  # small datasets: repeat users to fill the sample
    hist = torch.from_numpy(left_pad([split.history(u, "valid") for u in ids], eval_history_len(teacher, split)))
    module = teacher if isinstance(teacher, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            torch.topk(teacher.score(hist[:batch_size]), k, dim=1)  # warm-up
            t0 = time.perf_counter()
            for lo in range(0, len(hist), batch_size):
                torch.topk(teacher.score(hist[lo:lo + batch_size]), k, dim=1)
            seconds = time.perf_counter() - t0
    finally:
        if module is not None:
            module.train(was_training)
    return 1000.0 * seconds / max(len(hist), 1) * 1000.0


def measure_teacher(teacher, split: LeaveOneOutSplit, progress: bool = False, cost_users: int = 1024) -> dict:
    """Full-ranking validation/test metrics (the evaluation's exclusion rule), parameters, and the
    inference cost measured on ``cost_users`` validation histories."""
    from prmkd_dist.train.evaluate import evaluate

    kw = dict(ks=(10, 20), max_len=eval_history_len(teacher, split), batch_size=256, progress=progress)
    params = teacher.num_parameters() if hasattr(teacher, "num_parameters") else sum(
        t.numel() for t in teacher.state_dict().values())
    return {"valid": evaluate(teacher, split, "valid", **kw), "test": evaluate(teacher, split, "test", **kw),
            "params": int(params), "ms_per_1k_users": round(inference_ms_per_1k_users(teacher, split, users=cost_users), 1),
            "threads": torch.get_num_threads()}


def format_report(report: dict) -> str:
    """Markdown table: one row per teacher, its validation metrics next to its size and inference cost,
    then the stage times."""
    from prmkd_dist.train.utils import format_table

    rows = {}
    for name, t in report["teachers"].items():
        v = t["metrics"]["valid"]
        rows[f"{name} ({t['kind']})"] = {"NDCG@10": v["NDCG@10"], "HR@10": v["HR@10"], "NDCG@20": v["NDCG@20"],
                                         "HR@20": v["HR@20"], "params": t["metrics"]["params"],
                                         "ms/1k users": int(round(t["metrics"]["ms_per_1k_users"])),
                                         "train s": None if t["train_seconds"] is None else int(round(t["train_seconds"]))}
    lines = [f"teachers of {report['dataset']} (validation, full ranking; inference = score + top-10 on "
             f"{report['threads']} thread(s))", format_table(rows, COST_COLUMNS)]
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["stage_seconds"].items()))
    lines.append(f"training shards: {report['shards']['out_dir']} ({report['shards']['rows']} rows, "
                 f"teachers {', '.join(report['shards']['teachers'])})")
    return "\n".join(lines)


# ---- the pipeline -----------------------------------------------------------------------------------
def _trained_teacher(cfg: TeacherConfig, split: LeaveOneOutSplit, model_dir: Path, pretrained: str | None,
                     progress: bool) -> tuple[Teacher, str]:
    """(teacher, how): given (``pretrained`` dir), reused (saved here with the same config) or trained."""
    fp = split.data.fingerprint
    exports = model_dir.parent.parent / "exports"  # <pipeline out>/exports: where a distillation source's lists lie
    if pretrained:
        teacher = load_teacher(pretrained, fingerprint=fp)
        if teacher.name != cfg.name:
            teacher.name = cfg.name  # the shard column follows the pipeline's name for it
        return teacher, f"given ({pretrained})"
    source = export_record(exports / cfg.distill_from) if cfg.distill else None
    if _saved_matches(model_dir, cfg, fp, source):
        return load_teacher(model_dir, fingerprint=fp), "reused"
    key = run_key(cfg.resolved(), fp, source)
    teacher = train_teacher(cfg, split, progress=progress, work_dir=model_dir.parent / f".{cfg.name}-{key}-run",
                            exports_root=exports, resume=True)
    teacher.save(model_dir)
    return teacher, "trained"


def _saved_matches(model_dir: Path, cfg: TeacherConfig, fingerprint: str, distill_source: dict | None = None) -> bool:
    """Whether ``model_dir`` holds a teacher saved by the pipeline for ``cfg`` on this data (and, given
    ``distill_source``, distilled from that export): read from teacher.json, before any weight is loaded."""
    if not (model_dir / "teacher.json").is_file():
        return False
    meta = json.loads((model_dir / "teacher.json").read_text())
    info = meta.get("info") or {}
    return (info.get("pipeline_config") == cfg.resolved() and meta.get("item_fingerprint") == fingerprint
            and (distill_source is None or info.get("distill_source") == distill_source))


def _save_atomically(teacher: Teacher, directory: Path) -> None:
    """``teacher.save(directory)`` through a sibling temporary dir: a kill leaves the old state or the new, never a
    teacher.json beside half its weights."""
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    teacher.save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _saved_fold_teacher(cfg: TeacherConfig, run_dir: Path, fingerprint: str) -> Teacher | None:
    """The fold teacher a previous run trained in ``run_dir`` (the dir is keyed by the config, the source's settings,
    the data and the fold count), or None. Checked again against the config: a stale one is not reused."""
    if not _saved_matches(run_dir / "teacher", cfg, fingerprint):
        return None
    return load_teacher(run_dir / "teacher", fingerprint=fingerprint)


def _cross_fitted(cfg: TeacherConfig, split: LeaveOneOutSplit, folds: int, out: Path, progress: bool, log,
                  source: TeacherConfig | None = None, only: list[int] | None = None, claim: bool = False,
                  fitted: list[int] | None = None):
    """The out-of-fold lists of ``cfg`` (its fold teachers fitted as the pipeline fits it; finished folds kept in
    ``exports/.<name>-folds`` and reused while the config is unchanged). ``only``: fit just these folds (0-based)
    and return None unless every fold is then finished (``cross_fit_lists``); each fold has its own scratch
    directories, so workers on other folds share ``out``; ``claim``/``fitted``: ``cross_fit_lists``'s.

    A teacher distilled from another (``distill``; ``source`` is that teacher's config) is cross-fitted with its
    source nested in each fold: the fold's source is fitted on the fold's split too and exports its lists of the
    fold's examples, and the fold's pupil learns from those, as the full pupil learns from the full source's export.
    Distilling from the full source instead would carry the held-out users' examples into the fold teacher through
    the source's lists (a closed form fitted on them lists their memorised targets)."""
    from prmkd_dist.teachers.crossfit import cross_fit_lists
    from prmkd_dist.teachers.export import export_teacher_shards

    record, source_kw = cfg.resolved(), {}
    if cfg.distill:
        if source is None or source.name != cfg.distill_from:
            raise TeacherConfigError(f"{cfg.source}: export.cross_fit with distill needs the source teacher "
                                     f"{cfg.distill_from!r} in the same pipeline (each fold refits it)")
        if source.distill or source.export.get("cross_fit"):
            raise TeacherConfigError(f"{cfg.source}: export.cross_fit with distill: the source {source.name!r} must be "
                                     "trained on the CE target and export in sample (no distill, no cross_fit of its "
                                     "own): each fold refits it once")
        source_kw = {k: v for k, v in source.export.items() if k != "cross_fit"}
        record = {"pupil": record, "source": source.resolved(), "source_export": source_kw}

    fit_key = json.dumps(record, sort_keys=True, default=str)
    key = run_key(fit_key, split.data.fingerprint, folds)

    def fit(sub: LeaveOneOutSplit, fold: int):
        fold_exports = out / "exports" / f".{cfg.name}-fold-{fold:02d}-source"
        run_dir = out / "models" / f".{cfg.name}-fold-{fold:02d}-{key}-run"
        saved = _saved_fold_teacher(cfg, run_dir, sub.data.fingerprint)
        if saved is not None:  # trained before its listing was cut short: list again, do not train again
            log(f"[teachers] {cfg.name}: fold {fold + 1}'s trained teacher reused from {run_dir / 'teacher'}")
            return saved
        if cfg.distill:
            log(f"[teachers] {cfg.name}: the fold's source {source.name} (fitted without the fold's users)")
            src = train_teacher(source, sub, progress=progress,
                                work_dir=out / "models" / f".{cfg.name}-fold-{fold:02d}-{source.name}-run")
            export_teacher_shards(src, sub, fold_exports / source.name, name=source.name, progress=progress,
                                  replace_stale=True, embeddings=False, **source_kw)
            del src  # one closed-form teacher in memory at a time
        # a fold's training resumes after its last finished epoch (an hour per fold on amazon-games)
        teacher = train_teacher(cfg, sub, progress=progress, resume=True, work_dir=run_dir,
                                exports_root=fold_exports if cfg.distill else None)
        if cfg.kind not in CLOSED_FORM:  # a closed form refits in minutes and weighs GBs: not kept
            _save_atomically(teacher, run_dir / "teacher")
        return teacher
    done = fitted if fitted is not None else []
    lists = cross_fit_lists(fit, split, name=cfg.name, folds=folds, k=int(cfg.export.get("k", 50)),
                            max_history=int(cfg.export.get("max_history", 200)),
                            batch_size=int(cfg.export.get("batch_size", 512)),
                            work_dir=out / "exports" / f".{cfg.name}-folds", fit_key=fit_key, log=log, only=only,
                            claim=claim, fitted=done)
    # a fold's scratch (its source's lists, checkpoints, the kept fold teacher) is dead once its lists are recorded:
    # this run's folds, or every fold once all are finished (other workers' folds too)
    for fold in (range(folds) if lists is not None else done):
        scratch = [out / "models" / f".{cfg.name}-fold-{fold:02d}-{key}-run",
                   out / "exports" / f".{cfg.name}-fold-{fold:02d}-source"]
        if source is not None:
            scratch.append(out / "models" / f".{cfg.name}-fold-{fold:02d}-{source.name}-run")
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
    return lists


def _fold_worker(configs: list[TeacherConfig], split: LeaveOneOutSplit, out: Path, folds: list[int] | str,
                 progress: bool, log) -> dict:
    """``run_teacher_pipeline(cross_fit_folds=folds)``: the given folds (1-based) of every cross-fitted teacher, or
    with ``"auto"`` every fold no other worker has claimed (``cross_fit_lists(claim=True)``)."""
    crossed = [c for c in configs if c.export.get("cross_fit")]
    if not crossed:
        raise TeacherConfigError(f"cross_fit_folds {folds}: none of {[c.name for c in configs]} has export.cross_fit")
    auto = folds == "auto"
    if not auto and (isinstance(folds, str) or not folds):
        raise TeacherConfigError(f"cross_fit_folds {folds!r}: expected fold numbers (1-based) or 'auto'")
    report = {"dataset": split.data.name, "out_dir": str(out), "threads": torch.get_num_threads(), "cross_fit": {}}
    for cfg in crossed:
        n = int(cfg.export["cross_fit"])
        if not auto and [f for f in folds if not 1 <= f <= n]:
            raise TeacherConfigError(f"cross_fit_folds {folds}: {cfg.name} has folds 1..{n}")
        log(f"[teachers] {cfg.name}: cross-fit " + (f"the unclaimed folds of {n}" if auto else
                                                    f"fold(s) {', '.join(map(str, folds))} of {n}"))
        t0, fitted = time.perf_counter(), []
        lists = _cross_fitted(cfg, split, n, out, progress, log, only=None if auto else [f - 1 for f in folds],
                              claim=auto, fitted=fitted,
                              source=next((c for c in configs if c.name == cfg.distill_from), None))
        report["cross_fit"][cfg.name] = {"folds": n, "fitted": [f + 1 for f in fitted], "complete": lists is not None,
                                         "seconds": round(time.perf_counter() - t0, 2)}
        del lists
    return report


def run_teacher_pipeline(dataset: str, out_dir: str | os.PathLike | None = None, fast: bool = False, *,
                         teachers: list[str] | None = None, pretrained: dict[str, str] | None = None,
                         progress: bool = True, log=print, cross_fit_folds: list[int] | str | None = None) -> dict:
    """Train/export/merge/validate/measure the teachers of ``dataset`` (module doc); returns the report
    (also written to ``<out_dir>/pipeline.json``).

    ``dataset``: a builtin name, reader YAML or prepared directory (anything ``load_split`` takes).
    ``teachers``: teacher config names/paths (default: ``DATASET_TEACHERS`` of the dataset's name).
    ``pretrained``: {teacher name: saved teacher dir} used instead of training that teacher.
    ``fast``: each config's ``fast`` overrides (tiny models, one epoch: a smoke run, not real numbers).
    ``cross_fit_folds``: a fold worker: fit only these folds (1-based, as the log numbers them) of every cross-fitted
    teacher into ``out_dir`` and stop (no full teacher, export or merge); workers on other folds may share
    ``out_dir``, and a later run without it reuses every finished fold; ``"auto"``: fit every fold no other live
    worker is fitting (N identical workers split the folds; a killed worker's fold is free again). Returns
    {"cross_fit": {name: {"folds", "fitted" (the folds this worker fitted), "complete"}}}."""
    from prmkd_dist.data.prepare import load_split

    t_all = time.perf_counter()
    stage: dict[str, float] = {}
    t0 = time.perf_counter()
    data, split = load_split(dataset)
    stage["load data"] = time.perf_counter() - t0
    names = list(teachers) if teachers else list(DATASET_TEACHERS.get(data.name, ()))
    if not names:
        raise TeacherConfigError(f"no default teachers for dataset {data.name!r} (defaults exist for "
                                 f"{', '.join(DATASET_TEACHERS)}); pass teachers=[config, ...]")
    configs = [load_teacher_config(n, fast=fast) for n in names]
    dup = {c.name for c in configs if [d.name for d in configs].count(c.name) > 1}
    if dup:
        raise TeacherConfigError(f"teacher names must differ, {sorted(dup)} used twice")
    configs = dependency_order(configs)  # a distillation source is trained and exported before its pupils
    pretrained = dict(pretrained or {})
    unknown = set(pretrained) - {c.name for c in configs}
    if unknown:
        raise TeacherConfigError(f"pretrained teachers {sorted(unknown)} are not in this pipeline ({[c.name for c in configs]})")
    out = Path(out_dir) if out_dir is not None else artifacts_root() / "teachers" / data.name
    out.mkdir(parents=True, exist_ok=True)

    if cross_fit_folds is not None:
        folds = cross_fit_folds if isinstance(cross_fit_folds, str) else [int(f) for f in cross_fit_folds]
        return _fold_worker(configs, split, out, folds, progress, log)

    report = {"dataset": data.name, "fingerprint": data.fingerprint, "fast": fast, "out_dir": str(out),
              "threads": torch.get_num_threads(), "teachers": {}, "stage_seconds": stage}
    exports = []
    for cfg in configs:
        from prmkd_dist.teachers.export import export_teacher_shards, teacher_item_embeddings

        export_kw = {k: v for k, v in cfg.export.items() if k != "cross_fit"}
        folds = cfg.export.get("cross_fit")
        lists = None
        if folds:  # before the full teacher: one closed-form teacher in memory at a time (2.2 GB each on Games)
            log(f"[teachers] {cfg.name}: cross-fit {folds} folds")
            t0 = time.perf_counter()
            lists = _cross_fitted(cfg, split, folds, out, progress, log,
                                  source=next((c for c in configs if c.name == cfg.distill_from), None))
            stage[f"cross-fit {cfg.name}"] = time.perf_counter() - t0
        log(f"[teachers] {cfg.name}: train ({cfg.kind}, {Path(cfg.source).name})")
        t0 = time.perf_counter()
        teacher, how = _trained_teacher(cfg, split, out / "models" / cfg.name, pretrained.get(cfg.name), progress)
        stage[f"train {cfg.name}"] = time.perf_counter() - t0
        if lists is None:
            lists = teacher
        else:  # the out-of-fold lists travel with the full teacher's item embeddings
            lists.embeddings = teacher_item_embeddings(teacher)
        log(f"[teachers] {cfg.name}: {how}; export top-{cfg.export.get('k', 50)}" + (" (out-of-fold)" if folds else ""))
        t0 = time.perf_counter()
        exp = export_teacher_shards(lists, split, out / "exports" / cfg.name, name=cfg.name, progress=progress,
                                    replace_stale=True, **export_kw)
        del lists
        stage[f"export {cfg.name}"] = time.perf_counter() - t0
        exports.append(exp["out_dir"])
        log(f"[teachers] {cfg.name}: {exp['num_rows']} rows; evaluate")
        t0 = time.perf_counter()
        # --fast is a smoke run: a smaller timing sample keeps it quick
        metrics = measure_teacher(teacher, split, progress=progress, cost_users=256 if fast else 1024)
        stage[f"measure {cfg.name}"] = time.perf_counter() - t0
        report["teachers"][cfg.name] = {
            "kind": cfg.kind, "config": cfg.source, "model_dir": pretrained.get(cfg.name) or str(out / "models" / cfg.name),
            "how": how, "train_seconds": teacher.info.get("train_seconds_total", teacher.info.get("train_seconds",
                                                                                               teacher.info.get("fit_seconds"))),
            "score_semantics": exp["score_semantics"],
            "export": {**{k: v for k, v in exp.items() if k != "out_dir"}, "cross_fit": folds},
            "metrics": metrics, "info": teacher.info,
        }
        del teacher  # EASE at C = 24k is 2.2 GB: hold one teacher at a time

    log(f"[teachers] merge {len(exports)} export(s)")
    t0 = time.perf_counter()
    merged = merge_teacher_shards(exports, str(out / "shards"), overwrite=True, producer="prmkd-dist teachers pipeline")
    stage["merge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = validate_shards(str(out / "shards"), num_items=data.num_items, item_fingerprint=data.fingerprint)
    stage["validate"] = time.perf_counter() - t0
    stage["total"] = time.perf_counter() - t_all
    report["shards"] = {"out_dir": str(out / "shards"), "rows": summary["rows"], "files": summary["files"],
                        "teachers": list(merged.teachers), "rows_missing": merged.rows_missing}
    (out / "pipeline.json").write_text(json.dumps(report, indent=2, default=str))
    return report
