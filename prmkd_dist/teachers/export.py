"""Export a teacher's top-K lists over the training examples into teacher-score shards (docs/shards.md).

Training examples (docs/shards.md, "Training examples"): for each user u and each position p >= 1 of the
user's training prefix ``s = split.train_sequence(u)``: history ``s[:p]`` (stored truncated to the most
recent ``max_history`` items), target ``s[p]``, ``example_key = split.train_offsets[u] + p`` (the global
index of the target in ``split.train_items``: stable and unique for a dataset), user_id u. Validation and
test items are never part of an example.

Each row's teacher list is the top-K of the catalog with the items of the user's whole prefix ``s[:p]``
excluded, except the target (the evaluation's rule: a re-consumed target stays rankable), sorted by
descending score, distinct, never padding. The teacher reads the most recent ``teacher.max_len`` items
(the whole prefix when it declares ``max_len = None``, e.g. EASE; ``max_history`` for scorers without the
attribute, e.g. the baselines). On a multi-domain dataset (``prmkd_dist.data.domains``) the list holds the
user's own domain's items only, as its evaluation ranks them, and each row's ``domain_id`` is its user's domain.

Resumable: examples are cut into fixed chunks of ``rows_per_file`` rows in key order, one chunk = one
Parquet part. A finished part is recorded in ``_export_progress.json``; a restart with the same settings
skips it. The manifest is written last, so an interrupted export reads as incomplete to every reader.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit, pad_ragged
from prmkd_dist.data.domains import restrict_to_domains, user_domain_ids
from prmkd_dist.data.paths import write_json_atomic
from prmkd_dist.data.shards import (
    MANIFEST,
    ShardMeta,
    TeacherInfo,
    TeacherShardWriter,
    write_teacher_embeddings,
)

PROGRESS_FILE = "_export_progress.json"
PROGRESS_FORMAT = "prmkd-dist/teacher-export-progress"
PROGRESS_VERSION = 1
EMBEDDINGS_DIR = "embeddings"
PRODUCER = "prmkd-dist teachers export v1"
DEFAULT_ROWS_PER_FILE = 32768  # = the resume unit; ml-latest-small: 4 parts, amazon-games: 6


class ExportError(ValueError):
    """A teacher cannot be exported as asked (incompatible catalog, bad scores, conflicting directory)."""


# ---- training examples ------------------------------------------------------------------------------
def _gather_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``values[starts[i]:ends[i]]`` for all i without a Python loop: (offsets [n+1], flat)."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # position j of row i reads values[starts[i] + j]; flat index = offsets[i] + j
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return offsets, values[idx]


def example_index(split: LeaveOneOutSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(keys, users, prefix_starts, targets) of every training example, in key order.

    The example with key g has target ``train_items[g]`` and full history ``train_items[prefix_starts:g]``:
    every training position except the first of each user."""
    lengths = np.diff(split.train_offsets)
    is_target = np.ones(len(split.train_items), dtype=bool)
    is_target[split.train_offsets[:-1][lengths > 0]] = False  # position 0 has no history
    keys = np.flatnonzero(is_target).astype(np.int64)
    user_of_position = np.repeat(np.arange(split.data.num_users, dtype=np.int64), lengths)
    users = user_of_position[keys]
    return keys, users, split.train_offsets[users], split.train_items[keys]


def training_examples(split: LeaveOneOutSplit, max_history: int = 200
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All training examples: (keys, users, history_offsets [N+1], history_values, targets), histories
    chronological and truncated to the most recent ``max_history`` items (module doc)."""
    if max_history < 1:
        raise ExportError(f"max_history must be >= 1, got {max_history}")
    keys, users, starts, targets = example_index(split)
    offsets, values = _gather_ranges(split.train_items, np.maximum(starts, keys - max_history), keys)
    return keys, users, offsets, values, targets


# ---- the teacher ------------------------------------------------------------------------------------
def _device_of(teacher) -> torch.device:
    if isinstance(teacher, torch.nn.Module):
        for t in list(teacher.parameters()) + list(teacher.buffers()):
            return t.device
    return torch.device("cpu")


def teacher_digest(teacher) -> str:
    """sha256 of the teacher's class and weights (state_dict bytes): a resumed export refuses to mix the
    parts of two different teachers. About a second per GB of weights. Precomputed lists give their own
    ``digest`` (of the lists)."""
    if isinstance(getattr(teacher, "digest", None), str):
        return teacher.digest
    h = hashlib.sha256(f"{type(teacher).__module__}.{type(teacher).__qualname__}".encode())
    if isinstance(teacher, torch.nn.Module):
        for name, t in sorted(teacher.state_dict().items()):
            h.update(name.encode())
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_item_embeddings(teacher) -> torch.Tensor | None:
    """The teacher's item embeddings [C, d] (float32, CPU) if it has an ``item_embeddings()`` that gives some."""
    fn = getattr(teacher, "item_embeddings", None)
    if not callable(fn):
        return None
    with torch.no_grad():
        emb = fn()
    return None if emb is None else emb.detach().float().cpu()


def _precomputed(teacher) -> Callable | None:
    """A teacher whose lists were computed elsewhere (``prmkd_dist.teachers.crossfit``) hands them out through
    ``example_topk(keys, starts, split, k) -> (ids, scores)`` instead of scoring histories."""
    fn = getattr(teacher, "example_topk", None)
    return fn if callable(fn) else None


def _check_teacher(teacher, split: LeaveOneOutSplit, name: str | None, k: int) -> str:
    if not callable(getattr(teacher, "score", None)) and _precomputed(teacher) is None:
        raise ExportError(f"{type(teacher).__qualname__}: a teacher needs a score(history [B, L]) -> [B, C] method "
                          "(or example_topk(keys, starts, split, k) for precomputed lists)")
    name = name or getattr(teacher, "name", None)
    if not name:
        raise ExportError(f"{type(teacher).__qualname__} has no `name`: pass name=...")
    data = split.data
    if getattr(teacher, "num_items", data.num_items) != data.num_items:
        raise ExportError(f"teacher {name!r} scores {teacher.num_items} items, dataset {data.name!r} has {data.num_items}")
    fp = getattr(teacher, "item_fingerprint", None)
    if fp is not None and fp != data.fingerprint:
        raise ExportError(f"teacher {name!r} was built on items with fingerprint {fp}, dataset {data.name!r} has "
                          f"{data.fingerprint}: its score columns would be other items")
    if not 1 <= k <= data.num_items:
        raise ExportError(f"k must be in 1..num_items={data.num_items}, got {k}")
    return name


def _input_length(teacher, max_history: int) -> int | None:
    """How many recent items the teacher reads: its ``max_len``; None = the whole prefix."""
    if not hasattr(teacher, "max_len"):
        return max_history
    return teacher.max_len


def first_occurrences(split: LeaveOneOutSplit) -> np.ndarray:
    """[len(train_items)] bool: the item at this training position is not earlier in the user's prefix."""
    n = len(split.train_items)
    users = np.repeat(np.arange(split.data.num_users, dtype=np.int64), np.diff(split.train_offsets))
    order = np.lexsort((np.arange(n), split.train_items, users))  # by user, item, position
    su, si = users[order], split.train_items[order]
    first = np.ones(n, dtype=bool)
    first[order[1:]] = (su[1:] != su[:-1]) | (si[1:] != si[:-1])
    return first


def _history_scores(teacher, keys: np.ndarray, starts: np.ndarray, split: LeaveOneOutSplit,
                    input_len: int | None, device: torch.device) -> torch.Tensor:
    """``teacher.score`` of each example's input history: [n, C] float32 on the CPU."""
    tstart = starts if input_len is None else np.maximum(starts, keys - input_len)
    toff, tvals = _gather_ranges(split.train_items, tstart, keys)
    width = max(1, int(np.diff(toff).max())) if len(keys) else 1
    history = torch.from_numpy(pad_ragged(toff, tvals, width, PAD_ID, np.int64, keep="last"))
    return teacher.score(history.to(device)).float().cpu()


def _prefix_additive_scores(teacher, rows: torch.Tensor, keys: np.ndarray, starts: np.ndarray,
                            split: LeaveOneOutSplit, first: np.ndarray, device: torch.device) -> torch.Tensor:
    """Scores of whole-prefix histories for a teacher whose score is the sum of ``rows[i]`` over the
    distinct items i of the history (EASE): consecutive prefixes of one user differ by one item, so each
    run of consecutive keys costs one full ``score`` (its first example) and one row per further example,
    instead of a row per history item per example (histories of thousands of items on MovieLens)."""
    n = len(keys)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (starts[1:] != starts[:-1]) | (keys[1:] != keys[:-1] + 1)
    heads = np.flatnonzero(new_run)
    out = torch.empty(n, split.data.num_items, dtype=torch.float32)
    out[torch.from_numpy(heads)] = _history_scores(teacher, keys[heads], starts[heads], split, None, device)
    tail = np.flatnonzero(~new_run)
    if len(tail):
        added = split.train_items[keys[tail] - 1]  # the item that extends the previous example's prefix
        w = torch.from_numpy(first[keys[tail] - 1].astype(np.float32))[:, None]
        out[torch.from_numpy(tail)] = rows[torch.from_numpy(added).to(rows.device)].float().cpu() * w
    bounds = np.append(heads, n)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo > 1:
            torch.cumsum(out[lo:hi], dim=0, out=out[lo:hi])
    return out


def score_topk(teacher, keys: np.ndarray, starts: np.ndarray, split: LeaveOneOutSplit, k: int,
               input_len: int | None, device: torch.device, first: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids [n, k] int64, scores [n, k] float32) of examples ``keys`` (module doc for the rule);
    slots beyond a row's candidates: id PAD_ID, score 0.0. A whole-prefix teacher (``input_len`` None) that
    exposes ``additive_rows()`` (score = sum of those rows over the distinct history items) is scored
    incrementally along each user's prefixes; ``first`` = :func:`first_occurrences` (computed if None). Precomputed
    lists (``example_topk``, e.g. cross-fitted ones) are looked up, not scored."""
    precomputed = _precomputed(teacher)
    if precomputed is not None:
        return precomputed(keys, starts, split, k)
    n = len(keys)
    targets = split.train_items[keys]
    additive = getattr(teacher, "additive_rows", None)
    rows = additive() if (callable(additive) and input_len is None) else None
    if rows is not None:
        first = first_occurrences(split) if first is None else first
        scores = _prefix_additive_scores(teacher, rows, keys, starts, split, first, device)
    else:
        scores = _history_scores(teacher, keys, starts, split, input_len, device)
    if scores.shape != (n, split.data.num_items):
        raise ExportError(f"score() returned {tuple(scores.shape)} for {n} examples, expected {(n, split.data.num_items)}")
    # NaN/inf propagate into a row sum: one cheap reduction, the exact check only on suspect rows
    suspect = (~torch.isfinite(scores.sum(dim=1))).nonzero().flatten()
    bad = [int(r) for r in suspect if not bool(torch.isfinite(scores[r]).all())]
    if bad:
        raise ExportError(f"score() returned NaN/inf for example_key {int(keys[bad[0]])} ({len(bad)} row(s) in the batch)")
    scores = scores.clone()  # a scorer may hand back a shared/expanded tensor: never write into it
    if split.data.domains:  # a user's list holds its own domain's items only, as its evaluation ranks them
        users = np.searchsorted(split.train_offsets, keys, side="right") - 1
        scores = restrict_to_domains(scores, split.data, users)
    eoff, evals = _gather_ranges(split.train_items, starts, keys)  # the whole prefix
    rows = torch.from_numpy(np.repeat(np.arange(n), np.diff(eoff)))
    arange = torch.arange(n)
    tgt = torch.from_numpy(targets)
    target_scores = scores[arange, tgt].clone()
    scores[rows, torch.from_numpy(evals)] = float("-inf")
    scores[arange, tgt] = target_scores  # a re-consumed target stays rankable
    top_scores, top_ids = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    empty = torch.isinf(top_scores)  # only excluded items were left
    return (top_ids.masked_fill(empty, PAD_ID).numpy().astype(np.int64),
            top_scores.masked_fill(empty, 0.0).numpy().astype(np.float32))


# ---- progress / resume ------------------------------------------------------------------------------
def _read_progress(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, PROGRESS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            progress = json.load(f)
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: corrupt progress file ({e}); re-export with resume=False") from None
    if progress.get("format") != PROGRESS_FORMAT or progress.get("version") != PROGRESS_VERSION:
        raise ExportError(f"{path}: not a progress file of this version; re-export with resume=False")
    return progress


def _clear(out_dir: str) -> None:
    """Remove a previous export: the manifest first, so a crash mid-cleanup reads as incomplete."""
    for entry in sorted(os.listdir(out_dir), key=lambda f: f != MANIFEST):
        path = os.path.join(out_dir, entry)
        if entry == MANIFEST or entry == PROGRESS_FILE or entry.startswith(("part-", ".part-", ".staging-")):
            os.remove(path) if os.path.isfile(path) else shutil.rmtree(path)
        elif entry == EMBEDDINGS_DIR:
            shutil.rmtree(path)


def _settings_diff(old: dict, new: dict) -> list[str]:
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


# ---- export -----------------------------------------------------------------------------------------
def export_teacher_shards(
    teacher,
    split: LeaveOneOutSplit,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    k: int = 50,
    max_history: int = 200,
    batch_size: int = 512,
    domain_id: int | None = None,
    score_semantics: str | None = None,
    resume: bool = True,
    replace_stale: bool = False,
    progress: bool = True,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    rows_per_row_group: int = 8192,
    embeddings: bool = True,
    on_part: Callable[[int, dict], None] | None = None,
) -> dict:
    """Write ``teacher``'s top-``k`` lists for every training example of ``split`` into ``out_dir`` (one
    directory per teacher), plus its item embeddings (if ``teacher.item_embeddings()`` gives some and
    ``embeddings``) into ``out_dir/embeddings``. Returns a summary dict.

    ``teacher``: any object with ``score(history [B, L]) -> [B, C]`` (a Teacher, a baseline) and a ``name``
    (or pass ``name``). ``score_semantics``: default the teacher's ``score_semantics`` attribute, else
    "logit". ``resume=True`` continues an interrupted export made with the same teacher and settings
    (finished parts are kept); ``resume=False`` deletes any previous export in ``out_dir`` first.
    ``replace_stale``: with ``resume``, an export of another teacher or other settings in ``out_dir`` is replaced
    rather than refused (the teacher pipeline owns its export directories: a retrained teacher's old lists are stale).
    ``on_part(part_index, part_entry)`` is called after each part is finished (a progress hook)."""
    t0 = time.perf_counter()
    out_dir = os.fspath(out_dir)
    name = _check_teacher(teacher, split, name, k)
    if max_history < 1 or batch_size < 1 or rows_per_file < 1:
        raise ExportError("max_history, batch_size and rows_per_file must be >= 1")
    semantics = score_semantics or getattr(teacher, "score_semantics", "logit")
    data = split.data
    if data.domains and domain_id is not None:
        raise ExportError(f"{data.name} is a multi-domain dataset: each example's domain_id comes from its user's "
                          f"domain ({', '.join(d.name for d in data.domains)}); do not pass domain_id={domain_id}")
    info = TeacherInfo(name, int(k), semantics, producer=f"{type(teacher).__qualname__}")
    meta = ShardMeta(data.num_items, data.fingerprint, (info,), producer=PRODUCER)
    keys, users, starts, targets = example_index(split)
    num_parts = -(-len(keys) // rows_per_file)
    input_len = _input_length(teacher, max_history)
    settings = {
        "teacher": name, "teacher_class": f"{type(teacher).__module__}.{type(teacher).__qualname__}",
        "teacher_digest": teacher_digest(teacher), "k": int(k), "max_history": int(max_history),
        "domain_id": "per user" if data.domains else int(domain_id or 0), "score_semantics": semantics, "teacher_input_len": input_len,
        "rows_per_file": int(rows_per_file), "rows_per_row_group": int(rows_per_row_group),
        "dataset": data.name, "num_items": data.num_items, "item_fingerprint": data.fingerprint,
        "num_examples": int(len(keys)),
    }

    os.makedirs(out_dir, exist_ok=True)
    state = _read_progress(out_dir) if resume else None
    if state is not None and state["settings"] != settings and replace_stale:
        state = None
        _clear(out_dir)
    if state is not None and state["settings"] != settings:
        raise ExportError(f"{out_dir}: holds an export with other settings ({'; '.join(_settings_diff(state['settings'], settings))}); "
                          "pass resume=False (--overwrite) to replace it")
    if state is None:
        if resume and os.path.exists(os.path.join(out_dir, MANIFEST)):
            raise ExportError(f"{out_dir}: holds shards not written by this exporter (no {PROGRESS_FILE}); "
                              "pass resume=False (--overwrite) to replace them")
        _clear(out_dir)
        state = {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "settings": settings, "parts": {},
                 "manifest": None, "complete": False}
    progress_path = os.path.join(out_dir, PROGRESS_FILE)
    lost = [i for i, p in state["parts"].items() if not os.path.exists(os.path.join(out_dir, p["file"]))]
    for i in lost:  # a recorded part whose file was deleted since: export it again
        del state["parts"][i]
        state["complete"] = False
    skipped = sorted(int(i) for i in state["parts"])

    if not state["complete"]:
        write_json_atomic(progress_path, state)
        device = _device_of(teacher)
        module = teacher if isinstance(teacher, torch.nn.Module) else None
        was_training = module.training if module is not None else False
        if module is not None:
            module.eval()
        done_rows = sum(p["rows"] for p in state["parts"].values())
        bar = tqdm(total=len(keys), initial=done_rows, desc=f"export {name}", unit="ex", disable=not progress)
        first = first_occurrences(split) if callable(getattr(teacher, "additive_rows", None)) else None
        try:
            with torch.no_grad():
                for part in range(num_parts):
                    if str(part) in state["parts"]:
                        continue
                    lo, hi = part * rows_per_file, min(len(keys), (part + 1) * rows_per_file)
                    entry, manifest = _export_part(teacher, split, out_dir, part, meta, keys[lo:hi], users[lo:hi],
                                                   starts[lo:hi], targets[lo:hi], k, max_history, batch_size,
                                                   domain_id, input_len, device, rows_per_row_group, bar, first)
                    state["parts"][str(part)] = entry
                    state["manifest"] = state["manifest"] or {k_: v for k_, v in manifest.items() if k_ not in ("parts", "num_rows")}
                    write_json_atomic(progress_path, state)
                    if on_part is not None:
                        on_part(part, entry)
        finally:
            bar.close()
            if module is not None:
                module.train(was_training)
        _finish(out_dir, meta, state, num_parts)
        write_json_atomic(progress_path, state)

    emb_dir = None
    emb = teacher_item_embeddings(teacher) if embeddings else None
    if emb is not None:
        emb_dir = os.path.join(out_dir, EMBEDDINGS_DIR)
        emb_meta = ShardMeta(data.num_items, data.fingerprint, (TeacherInfo(name, 1, semantics, info.producer),),
                             producer=PRODUCER, kind="embeddings", embedding_dim=int(emb.shape[1]))
        write_teacher_embeddings(emb_dir, emb_meta, np.arange(data.num_items), emb.numpy(), overwrite=True)
    seconds = time.perf_counter() - t0
    return {
        "out_dir": out_dir, "teacher": name, "k": int(k), "score_semantics": semantics,
        "num_rows": int(len(keys)), "num_parts": num_parts, "parts_skipped": sorted(skipped),
        "empty_slots": int(sum(p["empty_slots"] for p in state["parts"].values())),
        "embeddings": emb_dir, "seconds": round(seconds, 3),
    }


def _export_part(teacher, split, out_dir, part, meta, keys, users, starts, targets, k, max_history, batch_size,
                 domain_id, input_len, device, rows_per_row_group, bar, first=None) -> tuple[dict, dict]:
    """Write one chunk as ``part-<part>.parquet``: a complete one-file export in a staging directory,
    whose file is then renamed into ``out_dir`` (atomic: a part is either absent or whole)."""
    staging = os.path.join(out_dir, f".staging-{part:05d}")
    shutil.rmtree(staging, ignore_errors=True)  # left over by an interrupted run
    empty = 0
    w = TeacherShardWriter(staging, meta, rows_per_row_group=min(rows_per_row_group, len(keys)), rows_per_file=len(keys))
    try:
        for lo in range(0, len(keys), batch_size):
            sl = slice(lo, lo + batch_size)
            ids, scores = score_topk(teacher, keys[sl], starts[sl], split, k, input_len, device, first)
            empty += int((ids == PAD_ID).sum())
            hist = _gather_ranges(split.train_items, np.maximum(starts[sl], keys[sl] - max_history), keys[sl])
            domains = user_domain_ids(split.data, users[sl]) if split.data.domains else int(domain_id or 0)
            w.write_batch(example_key=keys[sl], user_id=users[sl], domain_id=domains, history=hist,
                          target=targets[sl], teachers={meta.teachers[0].name: (ids, scores)})
            bar.update(len(ids))
    except BaseException:
        w.abort()
        raise
    manifest = w.close()
    (only,) = manifest["parts"]
    final = f"part-{part:05d}.parquet"
    os.replace(os.path.join(staging, only["file"]), os.path.join(out_dir, final))
    shutil.rmtree(staging)
    return {**only, "file": final, "first_key": int(keys[0]), "last_key": int(keys[-1]), "empty_slots": empty}, manifest


def _finish(out_dir: str, meta: ShardMeta, state: dict, num_parts: int) -> None:
    """Write the dataset manifest listing every part in order (the last step: the export is complete)."""
    missing = [i for i in range(num_parts) if str(i) not in state["parts"]]
    if missing:
        raise ExportError(f"{out_dir}: parts {missing[:5]} are not finished; cannot write {MANIFEST}")
    if num_parts == 0:  # no example at all: an empty, valid dataset
        with TeacherShardWriter(out_dir, meta, overwrite=True):
            pass
    else:
        parts = [state["parts"][str(i)] for i in range(num_parts)]
        manifest = {**state["manifest"], "num_rows": sum(p["rows"] for p in parts),
                    "parts": [{"file": p["file"], "rows": p["rows"], "row_groups": p["row_groups"]} for p in parts]}
        write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    state["complete"] = True
