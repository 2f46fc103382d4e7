"""Join per-teacher exports (made independently, each holding the example columns plus its own teacher
columns) into training shards keyed by ``example_key`` (docs/shards.md "Merge").

Out-of-core: pass 1 streams every input row group and appends its rows to one of ``num_buckets``
Parquet files per input, chosen by a hash of the key; pass 2 counts keys per bucket (key column only)
to find rows missing from some input; pass 3 joins bucket by bucket. Peak memory is about one bucket of
every input at once (rows of the largest input / num_buckets), whatever the total size.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prmkd_dist.data.shards import (
    EXAMPLE_COLUMNS,
    ShardFormatError,
    ShardMeta,
    ShardSet,
    TeacherMismatchError,
    TeacherShardWriter,
    list_parts,
)

_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads consecutive keys over buckets
_SRC_FILE, _SRC_ROW = "_src_file", "_src_row"


class MissingRowsError(ShardFormatError):
    """Some example keys are absent from some inputs (and allow_missing was not given)."""


class ExampleConflictError(ShardFormatError):
    """Two inputs hold different example columns for the same example_key (or a key twice)."""


@dataclass
class MergeReport:
    rows_out: int
    rows_missing: int  # keys absent from at least one input (dropped when allow_missing)
    missing_per_input: dict[str, int]
    sample_missing_keys: list[int]
    num_buckets: int
    teachers: list[str]
    out_dir: str
    manifest: dict = field(repr=False, default_factory=dict)


def _bucket_of(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    h = keys.astype(np.uint64) * _HASH_MULT
    return ((h >> np.uint64(32)) % np.uint64(num_buckets)).astype(np.int64)


def _merged_meta(sets: list[ShardSet], producer: str) -> ShardMeta:
    first = sets[0]
    names: dict[str, str] = {}
    teachers = []
    for s in sets:
        s.meta.check_catalog(first.meta.num_items, first.meta.item_fingerprint, s.root)
        for t in s.meta.teachers:
            if t.name in names:
                raise TeacherMismatchError(f"teacher {t.name!r} is in both {names[t.name]} and {s.root}")
            names[t.name] = s.root
            teachers.append(t)
    return ShardMeta(first.meta.num_items, first.meta.item_fingerprint, tuple(teachers), producer=producer)


def _partition(ss: ShardSet, idx: int, tmp: str, num_buckets: int) -> list[str | None]:
    """Pass 1: spread one input's rows over bucket files (with their source file/row for errors)."""
    writers: dict[int, pq.ParquetWriter] = {}
    paths: list[str | None] = [None] * num_buckets
    file_index = {f.path: i for i, f in enumerate(ss.files)}
    try:
        for f, start, tab in ss.iter_row_groups():
            n = len(tab)
            tab = tab.replace_schema_metadata(None)
            tab = tab.append_column(_SRC_FILE, pa.array(np.full(n, file_index[f.path], np.int32)))
            tab = tab.append_column(_SRC_ROW, pa.array(np.arange(start, start + n, dtype=np.int64)))
            bucket = _bucket_of(np.asarray(tab.column("example_key")), num_buckets)
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(num_buckets + 1))
            tab = tab.take(pa.array(order))
            for b in np.flatnonzero(np.diff(bounds)):
                if b not in writers:
                    paths[b] = os.path.join(tmp, f"in{idx}-b{b:05d}.parquet")
                    writers[b] = pq.ParquetWriter(paths[b], tab.schema)
                writers[b].write_table(tab.slice(bounds[b], bounds[b + 1] - bounds[b]))
    finally:
        for w in writers.values():
            w.close()
    return paths


def _read_keys(path: str | None) -> np.ndarray:
    if path is None:
        return np.zeros(0, np.int64)
    return np.asarray(pq.read_table(path, columns=["example_key"]).column("example_key"))


def _check_unique(tab: pa.Table, ss: ShardSet) -> None:
    keys = np.asarray(tab.column("example_key"))
    srt = np.sort(keys)
    dup = srt[1:][srt[1:] == srt[:-1]]
    if len(dup):
        rows = tab.filter(pc.equal(tab.column("example_key"), int(dup[0])))
        where = [f"{ss.files[f].path} row {r}" for f, r in zip(rows.column(_SRC_FILE).to_pylist(), rows.column(_SRC_ROW).to_pylist())]
        raise ExampleConflictError(f"example_key {int(dup[0])} occurs {len(rows)} times in {ss.root}: {where}")


def _conflict_rows(a: pa.Table, b: pa.Table, column: str) -> np.ndarray:
    """Rows where ``column`` differs between two key-aligned tables."""
    if column != "history":
        return np.flatnonzero(np.asarray(a.column(column)) != np.asarray(b.column(column)))
    ao, av = list_parts(a.column(column))
    bo, bv = list_parts(b.column(column))
    la, lb = np.diff(ao), np.diff(bo)
    bad = la != lb
    same = ~bad
    if same.any():
        # compare values of equal-length rows position by position
        rows = np.repeat(np.flatnonzero(same), la[same])
        within = np.arange(len(rows)) - np.repeat(np.cumsum(la[same]) - la[same], la[same])
        diff = av[ao[:-1][rows] + within] != bv[bo[:-1][rows] + within]
        bad[rows[diff]] = True
    return np.flatnonzero(bad)


def merge_teacher_shards(
    inputs: list[str],
    out_dir: str,
    *,
    allow_missing: bool = False,
    num_buckets: int | None = None,
    rows_per_bucket: int = 1_000_000,
    rows_per_row_group: int = 8192,
    rows_per_file: int = 1_048_576,
    tmp_dir: str | None = None,
    overwrite: bool = False,
    producer: str = "prmkd-dist shards merge",
) -> MergeReport:
    """Join per-teacher exports by example_key into one shard dataset at ``out_dir``.

    Checks: same num_items and item fingerprint; teacher names disjoint; each key at most once per
    input; example columns (user_id, domain_id, history, target) equal across inputs for a key
    (ExampleConflictError names the key, column and both files/rows). Keys missing from some input
    raise MissingRowsError (count + sample), or with ``allow_missing`` are dropped and reported.
    Output rows are ordered by (bucket, key), deterministically. ``num_buckets`` defaults to
    ceil(rows of the largest input / rows_per_bucket)."""
    if len(inputs) < 1:
        raise ValueError("merge needs at least one input directory")
    sets = [ShardSet.open(p) for p in inputs]
    meta = _merged_meta(sets, producer)
    nb = int(num_buckets or max(1, math.ceil(max(s.num_rows for s in sets) / rows_per_bucket)))
    tmp = tempfile.mkdtemp(prefix="prmkd-merge-", dir=tmp_dir)
    try:
        parts = [_partition(s, i, tmp, nb) for i, s in enumerate(sets)]
        # pass 2: duplicate keys, and which keys are missing where (key column only)
        missing_per_input = {s.root: 0 for s in sets}
        sample: list[int] = []
        rows_missing = 0
        for b in range(nb):
            keys = []
            for s, p in zip(sets, parts):
                raw = _read_keys(p[b])
                uniq = np.unique(raw)
                if len(uniq) < len(raw):  # a key twice in one input: report where, before anything else
                    _check_unique(pq.read_table(p[b], columns=["example_key", _SRC_FILE, _SRC_ROW]), s)
                keys.append(uniq)
            union = np.unique(np.concatenate(keys))
            common = union
            for k in keys:
                common = np.intersect1d(common, k, assume_unique=True)
            if len(union) > len(common):
                miss = np.setdiff1d(union, common, assume_unique=True)
                rows_missing += len(miss)
                sample.extend(miss[: max(0, 10 - len(sample))].tolist())
                for s, k in zip(sets, keys):
                    missing_per_input[s.root] += len(union) - len(k)
        if rows_missing and not allow_missing:
            detail = ", ".join(f"{r}: {c} absent" for r, c in missing_per_input.items() if c)
            raise MissingRowsError(
                f"{rows_missing} example key(s) are not in every input ({detail}); e.g. keys {sample}. "
                "Pass allow_missing (--allow-missing) to drop them."
            )
        # pass 3: join bucket by bucket
        # rows are re-checked on write: inputs may come from writers other than ours
        w = TeacherShardWriter(out_dir, meta, rows_per_row_group=rows_per_row_group,
                               rows_per_file=rows_per_file, overwrite=overwrite)
        rows_out = 0
        try:
            for b in range(nb):
                tabs = []
                for s, p in zip(sets, parts):
                    if p[b] is None:
                        tabs = None
                        break
                    tabs.append(pq.read_table(p[b]))
                if not tabs:
                    continue
                common = np.asarray(tabs[0].column("example_key"))
                for t in tabs[1:]:
                    common = np.intersect1d(common, np.asarray(t.column("example_key")))
                common = np.sort(common)
                aligned = []
                for t in tabs:
                    keys = np.asarray(t.column("example_key"))
                    order = np.argsort(keys)
                    pos = order[np.searchsorted(keys[order], common)]
                    aligned.append(t.take(pa.array(pos)))
                ref = aligned[0]
                for s, t in zip(sets[1:], aligned[1:]):
                    for col in EXAMPLE_COLUMNS[1:]:
                        bad = _conflict_rows(ref, t, col)
                        if len(bad):
                            r = int(bad[0])
                            raise ExampleConflictError(
                                f"example_key {int(common[r])}: column {col!r} differs between "
                                f"{sets[0].files[ref.column(_SRC_FILE)[r].as_py()].path} row {ref.column(_SRC_ROW)[r].as_py()} "
                                f"and {s.files[t.column(_SRC_FILE)[r].as_py()].path} row {t.column(_SRC_ROW)[r].as_py()} "
                                f"({len(bad)} conflicting row(s) in this bucket)"
                            )
                cols = {c: ref.column(c) for c in EXAMPLE_COLUMNS}
                for s, t in zip(sets, aligned):
                    for ti in s.meta.teachers:
                        cols[ti.ids_column] = t.column(ti.ids_column)
                        cols[ti.scores_column] = t.column(ti.scores_column)
                w.write_table(pa.table(cols))
                rows_out += len(common)
        except BaseException:
            w.abort()
            raise
        manifest = w.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeReport(rows_out, rows_missing, missing_per_input, sample, nb, list(meta.teacher_names), out_dir, manifest)
