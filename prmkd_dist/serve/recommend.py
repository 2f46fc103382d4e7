"""Batch recommendation from files: histories in (Parquet or JSON Lines), top-K out (Parquet or JSON Lines).

Input: one row per user with a user key column (any scalar, copied through) and a history column (a
list of item ids, oldest first). The ids are internal ids (0..C-1) by default, or the dataset's raw
ids with ``raw_ids=True``. An unknown raw id is an error naming the file and row, unless
``skip_unknown=True``: then it is dropped from its history and counted (``RecommendStats``).

Output: one row per input row, in input order: the user key, ``items`` (the top-K ids, raw when the
input was raw, best first) and ``scores`` (float32). Rows with fewer than K candidates (a history
covering almost the whole catalog) get shorter lists: empty slots are not written.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prmkd_dist.constants import PAD_ID
from prmkd_dist.serve.artifact import ServingArtifact

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}


class RecommendInputError(ValueError):
    """An input file of ``recommend`` is unreadable or a row does not have the documented form."""


@dataclass
class RecommendStats:
    rows: int = 0
    unknown_ids_skipped: int = 0
    rows_with_unknown_ids: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def file_format(path: str | os.PathLike, what: str) -> str:
    """"parquet" or "jsonl" from the file suffix; RecommendInputError otherwise."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise RecommendInputError(f"{path}: {what} must end in one of {sorted(FORMATS)}")
    return fmt


def read_histories(path: str | os.PathLike, user_col: str = "user",
                   history_col: str = "history") -> tuple[list, list[list], list[str]]:
    """(user keys, histories, locations) of an input file; each history is the row's list of ids as
    stored, each location names the file and row ("f.parquet: row 0", "f.jsonl: line 1") for errors."""
    path = Path(path)
    if not path.is_file():
        raise RecommendInputError(f"{path}: no such input file")
    if file_format(path, "the input") == "parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise RecommendInputError(f"{path}: not a readable Parquet file ({e})") from None
        for col in (user_col, history_col):
            if col not in table.column_names:
                raise RecommendInputError(f"{path}: no column {col!r} (columns: {table.column_names}); "
                                          f"expected {user_col!r} and {history_col!r} (a list of item ids)")
        if not pa.types.is_list(table.schema.field(history_col).type) and \
                not pa.types.is_large_list(table.schema.field(history_col).type):
            raise RecommendInputError(f"{path}: column {history_col!r} is {table.schema.field(history_col).type}, "
                                      f"expected a list of item ids")
        users = table.column(user_col).to_pylist()
        histories = table.column(history_col).to_pylist()
        for row, h in enumerate(histories):
            if h is None:
                raise RecommendInputError(f"{path}: row {row}: column {history_col!r} is null (use [] for no history)")
        return users, histories, [f"{path}: row {row}" for row in range(len(users))]
    users, histories, where = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecommendInputError(f"{path}: line {line_no}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or user_col not in obj or history_col not in obj:
                raise RecommendInputError(f"{path}: line {line_no}: expected an object with keys {user_col!r} "
                                          f"and {history_col!r}, got {line.strip()[:80]!r}")
            if not isinstance(obj[history_col], list):
                raise RecommendInputError(f"{path}: line {line_no}: {history_col!r} must be a list of item ids, "
                                          f"got {type(obj[history_col]).__name__}")
            users.append(obj[user_col])
            histories.append(obj[history_col])
            where.append(f"{path}: line {line_no}")
    return users, histories, where


def _convert(artifact: ServingArtifact, hist: list, raw_ids: bool, skip_unknown: bool, where: str,
             stats: RecommendStats) -> np.ndarray:
    """One stored history -> internal ids (the row-level checks, with the file's row in the message)."""
    if raw_ids:
        ids = artifact.lookup_raw(hist)
        unknown = ids == PAD_ID
        if unknown.any():
            if not skip_unknown:
                raise RecommendInputError(f"{where}: raw item id {hist[int(np.flatnonzero(unknown)[0])]!r} is not "
                                          f"in the artifact's catalog ({int(unknown.sum())} unknown in this row; "
                                          f"--skip-unknown drops and counts them)")
            stats.unknown_ids_skipped += int(unknown.sum())
            stats.rows_with_unknown_ids += 1
            ids = ids[~unknown]
        return ids
    for x in hist:
        if isinstance(x, bool) or not isinstance(x, int):
            raise RecommendInputError(f"{where}: internal item ids must be integers, got {x!r} "
                                      f"(pass --raw-ids for the dataset's raw ids)")
    ids = np.asarray(hist, dtype=np.int64)
    bad = (ids < 0) | (ids >= artifact.num_items)
    if bad.any():
        raise RecommendInputError(f"{where}: item id {int(ids[bad][0])} is not in 0..{artifact.num_items - 1} "
                                  f"(pass --raw-ids if these are the dataset's raw ids)")
    return ids


def write_recommendations(path: str | os.PathLike, users: list, items: list[list], scores: list[list],
                          user_col: str = "user") -> None:
    """Write rows (user key, items, scores) as Parquet or JSON Lines (by suffix)."""
    path = Path(path)
    fmt = file_format(path, "the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        table = pa.table({user_col: pa.array(users), "items": pa.array(items),
                          "scores": pa.array(scores, type=pa.list_(pa.float32()))})
        pq.write_table(table, path)
        return
    with open(path, "w", encoding="utf-8") as f:
        for u, i, s in zip(users, items, scores):
            f.write(json.dumps({user_col: u, "items": i, "scores": s}) + "\n")


def recommend_file(artifact: ServingArtifact | str | os.PathLike, input_path: str | os.PathLike,
                   output_path: str | os.PathLike, k: int = 10, raw_ids: bool = False,
                   approximate: bool = False, nprobe: int | None = None, skip_unknown: bool = False,
                   exclude_seen: bool = True, batch_size: int = 256, user_col: str = "user",
                   history_col: str = "history", progress: bool = True) -> RecommendStats:
    """Top-``k`` recommendations for every row of ``input_path`` into ``output_path`` (module doc for
    the file forms). Every row is checked before any scoring, so a bad row fails fast."""
    import time

    t0 = time.perf_counter()
    if not isinstance(artifact, ServingArtifact):
        artifact = ServingArtifact.load(artifact)
    file_format(output_path, "the output")  # fail before the work, not after
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    users, stored, where = read_histories(input_path, user_col, history_col)
    stats = RecommendStats(rows=len(users))
    histories = [_convert(artifact, h, raw_ids, skip_unknown, w, stats) for h, w in zip(stored, where)]
    out_items: list[list] = []
    out_scores: list[list] = []
    with tqdm(total=len(histories), desc="recommend", unit="user", disable=not progress) as bar:
        for start in range(0, len(histories), batch_size):
            ids, scores = artifact.recommend(histories[start:start + batch_size], k=k, exclude_seen=exclude_seen,
                                             approximate=approximate, nprobe=nprobe)
            for row_ids, row_scores in zip(ids.numpy(), scores.numpy()):
                keep = row_ids != PAD_ID  # empty slots are not written
                out_items.append(list(artifact.to_raw(row_ids[keep])) if raw_ids else row_ids[keep].tolist())
                out_scores.append(row_scores[keep].tolist())
            bar.update(len(ids))
    write_recommendations(output_path, users, out_items, out_scores, user_col)
    stats.seconds = time.perf_counter() - t0
    return stats
