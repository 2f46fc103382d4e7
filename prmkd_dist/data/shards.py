"""Teacher-score shards: the contract between any teacher and the trainer (docs/shards.md).

A shard dataset is a directory of Parquet parts plus a manifest:

    part-00000.parquet ...   one row per training example (see ``example_schema``)
    _manifest.json           written LAST, atomically: lists the parts and their row counts.
                             A directory without it is an unfinished export and is refused.

Every part carries the metadata (``ShardMeta``) in its Parquet key-value metadata under
``prmkd.shard``, so a single file is self-describing. Teacher item embeddings use the same machinery
with ``kind="embeddings"`` (``embedding_schema``).

This module depends on numpy/pyarrow only (the loader builds on it and must stay portable).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.paths import write_json_atomic

SCHEMA_VERSION = 1
FORMAT = "prmkd-dist/teacher-shards"
META_KEY = b"prmkd.shard"
MANIFEST = "_manifest.json"
SCORE_SEMANTICS = ("logit", "log_prob", "similarity")
KINDS = ("examples", "embeddings")
EXAMPLE_COLUMNS = ("example_key", "user_id", "domain_id", "history", "target")
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# ---- errors ---------------------------------------------------------------------------------------
class ShardFormatError(ValueError):
    """A shard dataset (directory, file, metadata or row) does not follow the contract."""


class ShardVersionError(ShardFormatError):
    """The shard schema version is not the one this code reads."""


class FingerprintMismatchError(ShardFormatError):
    """The shards refer to another item-id space (item fingerprint or catalog size differ)."""


class TeacherMismatchError(ShardFormatError):
    """Files of one dataset (or inputs of a merge) disagree on the teachers."""


class IncompleteShardError(ShardFormatError):
    """No manifest, a part missing, or a truncated/corrupt Parquet file."""


class BadRowError(ShardFormatError):
    """A row holds invalid values; the message names file, column and row (0-based within the file)."""

    def __init__(self, file: str, column: str, row: int, problem: str):
        self.file, self.column, self.row, self.problem = file, column, row, problem
        super().__init__(f"{file}: column {column!r}, row {row}: {problem}")


# ---- metadata -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherInfo:
    """One teacher in a shard: its column prefix, top-K width, score meaning and provenance."""

    name: str
    k: int
    score_semantics: str
    producer: str = ""

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise ShardFormatError(f"teacher name {self.name!r}: expected letters, digits, '_' or '-'")
        if int(self.k) < 1:
            raise ShardFormatError(f"teacher {self.name!r}: k must be >= 1, got {self.k}")
        if self.score_semantics not in SCORE_SEMANTICS:
            raise ShardFormatError(
                f"teacher {self.name!r}: score_semantics {self.score_semantics!r}, expected one of {SCORE_SEMANTICS}"
            )

    @property
    def ids_column(self) -> str:
        return f"teacher.{self.name}.ids"

    @property
    def scores_column(self) -> str:
        return f"teacher.{self.name}.scores"


@dataclass(frozen=True)
class ShardMeta:
    """Metadata carried by every file of a shard dataset (Parquet key-value metadata ``prmkd.shard``).

    ``num_items``/``item_fingerprint`` pin the item-id space (prmkd_dist.data.dataset.item_fingerprint).
    ``kind="examples"``: training rows with ``teachers``; ``kind="embeddings"``: one teacher's item
    embeddings of width ``embedding_dim`` (``teachers`` then holds that single teacher, k unused = 1).
    """

    num_items: int
    item_fingerprint: str
    teachers: tuple[TeacherInfo, ...]
    producer: str = ""
    kind: str = "examples"
    embedding_dim: int | None = None
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        object.__setattr__(self, "teachers", tuple(self.teachers))
        if self.kind not in KINDS:
            raise ShardFormatError(f"kind {self.kind!r}, expected one of {KINDS}")
        if int(self.num_items) < 1:
            raise ShardFormatError(f"num_items must be >= 1, got {self.num_items}")
        if not self.item_fingerprint:
            raise ShardFormatError("item_fingerprint is required (item_fingerprint() of the InteractionData)")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ShardFormatError(f"duplicate teacher names {names}")
        if self.kind == "embeddings" and (len(self.teachers) != 1 or not self.embedding_dim or self.embedding_dim < 1):
            raise ShardFormatError("embedding shards need exactly one teacher and embedding_dim >= 1")

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.teachers)

    def teacher(self, name: str) -> TeacherInfo:
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(f"no teacher {name!r}; shards hold {self.teacher_names}")

    def to_json(self) -> str:
        d = asdict(self)
        d["format"] = FORMAT
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> "ShardMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardFormatError(f"{where}: metadata {META_KEY.decode()} is not JSON ({e})") from None
        if d.get("format") != FORMAT:
            raise ShardFormatError(f"{where}: metadata format {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") != SCHEMA_VERSION:
            raise ShardVersionError(
                f"{where}: shard schema version {d.get('version')!r}, this code reads version {SCHEMA_VERSION}"
            )
        d.pop("format")
        try:
            d["teachers"] = tuple(TeacherInfo(**t) for t in d["teachers"])
            return cls(**d)
        except (TypeError, KeyError) as e:
            raise ShardFormatError(f"{where}: malformed shard metadata ({e})") from None

    def check_catalog(self, num_items: int | None, item_fingerprint: str | None, where: str) -> None:
        """Refuse shards built on another item-id space."""
        if item_fingerprint is not None and item_fingerprint != self.item_fingerprint:
            raise FingerprintMismatchError(
                f"{where}: item fingerprint {self.item_fingerprint}, expected {item_fingerprint} "
                "(the shards' item ids refer to a different item mapping)"
            )
        if num_items is not None and int(num_items) != self.num_items:
            raise FingerprintMismatchError(f"{where}: num_items {self.num_items}, expected {num_items}")


def example_schema(meta: ShardMeta) -> pa.Schema:
    """Arrow schema of an example shard; teacher columns follow ``meta.teachers`` order."""
    fields = [
        pa.field("example_key", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("domain_id", pa.int32(), nullable=False),
        pa.field("history", pa.list_(pa.int64()), nullable=False),
        pa.field("target", pa.int64(), nullable=False),
    ]
    for t in meta.teachers:
        fields.append(pa.field(t.ids_column, pa.list_(pa.int64()), nullable=False))
        fields.append(pa.field(t.scores_column, pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields, metadata={META_KEY: meta.to_json().encode()})


def embedding_schema(meta: ShardMeta) -> pa.Schema:
    """Arrow schema of a teacher item-embedding shard."""
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), int(meta.embedding_dim)), nullable=False),
        ],
        metadata={META_KEY: meta.to_json().encode()},
    )


def schema_for(meta: ShardMeta) -> pa.Schema:
    return example_schema(meta) if meta.kind == "examples" else embedding_schema(meta)


# ---- row checks (the one place that defines a bad row) ----------------------------------------------
def _rows_of_positions(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Row index of flat value positions (offsets are absolute into the values buffer)."""
    return np.searchsorted(offsets, positions, side="right") - 1


def _any_outside(v: np.ndarray, num_items: int) -> bool:
    """Any value outside [0, num_items)? For int64 one pass: negatives wrap to >= 2**63 as uint64."""
    if v.dtype == np.int64:
        return int(v.view(np.uint64).max()) >= num_items
    return bool(v.min() < 0 or v.max() >= num_items)


def check_id_lists(
    offsets: np.ndarray,
    ids: np.ndarray,
    num_items: int,
    scores: np.ndarray | None = None,
    k: int | None = None,
    check_sorted: bool = True,
    check_duplicates: bool = True,
) -> dict[str, np.ndarray]:
    """Vectorised checks of one list column (plus its scores): returns {problem: bool mask [n_rows]}
    only for problems that occur. ``offsets`` [n+1] are absolute positions into ``ids``; ``scores``
    holds the same lists' scores flat, starting at the first row (length offsets[-1] - offsets[0])."""
    n = len(offsets) - 1
    lo, hi = int(offsets[0]), int(offsets[-1])
    v = ids[lo:hi]
    found: dict[str, np.ndarray] = {}

    def rows_mask(value_mask: np.ndarray) -> np.ndarray:
        m = np.zeros(n, dtype=bool)
        m[_rows_of_positions(offsets, np.flatnonzero(value_mask) + lo)] = True
        return m

    if len(v) and _any_outside(v, num_items):
        found[f"item id outside [0, {num_items})"] = rows_mask((v < 0) | (v >= num_items))
    lengths = np.diff(offsets)
    if k is not None and n and lengths.max() > k:
        found[f"more than the declared K={k} entries"] = lengths > k
    if scores is not None:
        s = scores
        # a float64 sum is finite iff every value is (float32 values cannot overflow it): one pass,
        # no temporary; the exact mask only when something is off (a float64 sum may overflow)
        if len(s) and not np.isfinite(s.sum(dtype=np.float64)):
            finite = np.isfinite(s)
            if not finite.all():
                found["score is NaN or infinite"] = rows_mask(~finite)
        if check_sorted and len(s) > 1:
            # a violation is an increase between two neighbours of the same list; the pair that
            # straddles two lists (index = next list's start - 1) is not one
            up = s[1:] > s[:-1]
            cut = offsets[1:-1] - (lo + 1)
            up[cut[(cut >= 0) & (cut < len(up))]] = False
            if up.any():
                found["scores not sorted descending"] = rows_mask(np.concatenate([[False], up]))
    if check_duplicates and len(v) > 1:
        row = np.repeat(np.arange(n, dtype=np.int64), lengths)
        order = np.lexsort((v, row))
        sv, sr = v[order], row[order]
        dup = (sv[1:] == sv[:-1]) & (sr[1:] == sr[:-1])
        if dup.any():
            m = np.zeros(n, dtype=bool)
            m[sr[1:][dup]] = True
            found["duplicate item id in the list"] = m
    return found


def list_parts(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1] absolute into values, values) of a list column, zero-copy where Arrow allows."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()  # a row group: one chunk
    return np.asarray(arr.offsets), np.asarray(arr.values)


def check_example_table(
    table: pa.Table,
    meta: ShardMeta,
    *,
    check_sorted: bool = True,
    check_duplicates: bool = True,
    check_lists: bool = True,
) -> dict[tuple[str, str], np.ndarray]:
    """All row checks of an example table: {(column, problem): bool mask [n]} for problems present.
    ``check_lists=False`` leaves out the history and teacher lists (the loader's C++ window assembly
    checks those while it copies them)."""
    found: dict[tuple[str, str], np.ndarray] = {}
    for name in table.column_names:
        if table.column(name).null_count:
            found[(name, "null value")] = np.asarray(table.column(name).is_null().to_numpy(zero_copy_only=False))
    tgt = np.asarray(table.column("target"))
    bad_t = (tgt < PAD_ID) | (tgt >= meta.num_items)
    if bad_t.any():
        found[("target", f"target outside [-1, {meta.num_items})")] = bad_t
    if not check_lists:
        return found
    off, hv = list_parts(table.column("history"))
    for p, m in check_id_lists(off, hv, meta.num_items, check_duplicates=False).items():
        found[("history", p)] = m
    for t in meta.teachers:
        ioff, ids = list_parts(table.column(t.ids_column))
        soff, sc = list_parts(table.column(t.scores_column))
        if not np.array_equal(np.diff(ioff), np.diff(soff)):
            found[(t.scores_column, f"length differs from {t.ids_column}")] = np.diff(ioff) != np.diff(soff)
            continue
        sc = sc[int(soff[0]) : int(soff[-1])]
        for p, m in check_id_lists(ioff, ids, meta.num_items, sc, t.k, check_sorted, check_duplicates).items():
            col = t.scores_column if ("score" in p) else t.ids_column
            found[(col, p)] = m
    return found


def raise_first(found: Mapping[tuple[str, str], np.ndarray], file: str, row_offset: int = 0) -> None:
    """Raise BadRowError for the earliest bad row in ``found`` (no-op when empty)."""
    best = None
    for (col, problem), mask in found.items():
        r = int(np.flatnonzero(mask)[0])
        if best is None or r < best[0]:
            best = (r, col, problem)
    if best is not None:
        r, col, problem = best
        total = int(np.logical_or.reduce(list(found.values())).sum())
        raise BadRowError(file, col, row_offset + r, f"{problem} ({total} bad row(s) in this block)")


# ---- writing --------------------------------------------------------------------------------------
def _as_list_array(values, name: str, n: int, value_type: pa.DataType) -> pa.Array:
    """Accept (offsets, values), a dense [n, L] array (every row full) or a list of 1-D arrays; build
    an Arrow list array (no per-row Python work for the array forms)."""
    if isinstance(values, tuple) and len(values) == 2 and not isinstance(values[0], (list, tuple)):
        offsets = np.asarray(values[0], dtype=np.int64)
        flat = np.asarray(values[1])
    elif isinstance(values, np.ndarray) and values.ndim == 2:
        offsets = np.arange(values.shape[0] + 1, dtype=np.int64) * values.shape[1]
        flat = values.reshape(-1)
    else:
        seqs = list(values)
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate([np.asarray(s) for s in seqs]) if seqs else np.zeros(0)
    if len(offsets) != n + 1:
        raise ShardFormatError(f"{name}: {len(offsets) - 1} rows, expected {n}")
    if offsets[0] != 0 or offsets[-1] != len(flat) or np.any(np.diff(offsets) < 0):
        raise ShardFormatError(f"{name}: offsets must rise from 0 to len(values)={len(flat)}")
    otype = np.int32 if offsets[-1] < 2**31 else np.int64
    cls = pa.ListArray if otype == np.int32 else pa.LargeListArray
    arr = cls.from_arrays(pa.array(offsets.astype(otype)), pa.array(flat.astype(value_type.to_pandas_dtype(), copy=False), value_type))
    return arr if otype == np.int32 else arr.cast(pa.list_(value_type))


def _teacher_lists(name: str, ids, scores, n: int) -> tuple[pa.Array, pa.Array]:
    """Teacher (ids, scores) in dense [N,K] form (empty slots: id PAD_ID) or ragged form -> list arrays."""
    if isinstance(ids, np.ndarray) and ids.ndim == 2:
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != ids.shape:
            raise ShardFormatError(f"teacher {name!r}: ids shape {ids.shape} != scores shape {scores.shape}")
        keep = ids != PAD_ID  # empty slots are dropped, so a short list = missing slots
        lengths = keep.sum(axis=1)
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return (
            _as_list_array((offsets, ids[keep]), f"teacher {name!r} ids", n, pa.int64()),
            _as_list_array((offsets, scores[keep]), f"teacher {name!r} scores", n, pa.float32()),
        )
    return (
        _as_list_array(ids, f"teacher {name!r} ids", n, pa.int64()),
        _as_list_array(scores, f"teacher {name!r} scores", n, pa.float32()),
    )


class ShardWriter:
    """Streams Arrow tables of one schema into ``part-NNNNN.parquet`` files with exact row-group and
    file sizes, holding at most one row group in memory. Parts are written under a temporary name and
    renamed when complete; ``_manifest.json`` is written last, so an interrupted export is never
    mistaken for a finished one. Use as a context manager: an exception aborts (temporary files removed,
    no manifest)."""

    def __init__(
        self,
        out_dir: str,
        meta: ShardMeta,
        *,
        rows_per_row_group: int = 8192,
        rows_per_file: int = 1_048_576,
        compression: str = "snappy",
        overwrite: bool = False,
        validate: bool = True,
    ):
        if rows_per_row_group < 1 or rows_per_file < 1:
            raise ValueError("rows_per_row_group and rows_per_file must be >= 1")
        self.out_dir, self.meta = str(out_dir), meta
        self.schema = schema_for(meta)
        self.rows_per_row_group, self.rows_per_file = int(rows_per_row_group), int(rows_per_file)
        self.compression, self.validate = compression, validate
        os.makedirs(self.out_dir, exist_ok=True)
        existing = [f for f in os.listdir(self.out_dir) if f.startswith(("part-", ".part-")) or f == MANIFEST]
        if existing and not overwrite:
            raise FileExistsError(f"{self.out_dir}: already holds shards ({existing[0]}...); pass overwrite=True")
        # the manifest goes first, so a crash mid-cleanup leaves a dir that reads as incomplete
        for f in sorted(existing, key=lambda f: f != MANIFEST):
            os.remove(os.path.join(self.out_dir, f))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._file_row_groups = 0
        self._parts: list[dict] = []
        self._closed = False

    # -- internals --
    def _part_name(self) -> str:
        return f"part-{len(self._parts):05d}.parquet"

    def _tmp_path(self) -> str:
        return os.path.join(self.out_dir, "." + self._part_name() + ".tmp")

    def _write_row_group(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp_path(), self.schema, compression=self.compression)
        self._writer.write_table(table, row_group_size=len(table))
        self._file_rows += len(table)
        self._file_row_groups += 1
        if self._file_rows >= self.rows_per_file:
            self._finish_file()

    def _finish_file(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        name = self._part_name()
        os.replace(self._tmp_path(), os.path.join(self.out_dir, name))
        self._parts.append({"file": name, "rows": self._file_rows, "row_groups": self._file_row_groups})
        self._file_rows = self._file_row_groups = 0

    def _drain(self, final: bool) -> None:
        while self._pending_rows >= self.rows_per_row_group or (final and self._pending_rows):
            # a row group never crosses a file boundary
            size = min(self.rows_per_row_group, self.rows_per_file - self._file_rows, self._pending_rows)
            buf = pa.concat_tables(self._pending)
            self._write_row_group(buf.slice(0, size))
            rest = buf.slice(size)
            self._pending = [rest] if len(rest) else []
            self._pending_rows = len(rest)

    # -- public --
    def write_table(self, table: pa.Table) -> None:
        """Append rows given as an Arrow table with this dataset's columns (metadata not required)."""
        if self._closed:
            raise RuntimeError(f"{self.out_dir}: writer already closed")
        missing = [c for c in self.schema.names if c not in table.column_names]
        if missing:
            raise ShardFormatError(f"{self.out_dir}: rows to write lack column(s) {missing}")
        table = table.select(self.schema.names)
        if not table.schema.equals(self.schema, check_metadata=False):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise ShardFormatError(f"{self.out_dir}: rows to write do not fit the schema ({e})") from None
        table = table.replace_schema_metadata(self.schema.metadata)
        if self.validate and len(table) and self.meta.kind == "examples":
            raise_first(check_example_table(table, self.meta), f"{self.out_dir} (batch being written)")
        self._pending.append(table)
        self._pending_rows += len(table)
        self._drain(final=False)

    def close(self) -> dict:
        """Flush, finalise the last part and write the manifest; returns the manifest."""
        if self._closed:
            raise RuntimeError(f"{self.out_dir}: writer already closed")
        self._drain(final=True)
        self._finish_file()
        self._closed = True
        manifest = {
            "format": FORMAT,
            "version": SCHEMA_VERSION,
            "kind": self.meta.kind,
            "meta": json.loads(self.meta.to_json()),
            "num_rows": sum(p["rows"] for p in self._parts),
            "parts": self._parts,
        }
        write_json_atomic(os.path.join(self.out_dir, MANIFEST), manifest)
        return manifest

    def abort(self) -> None:
        """Drop the part being written; finished parts stay but no manifest is written."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if os.path.exists(self._tmp_path()):
            os.remove(self._tmp_path())
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class TeacherShardWriter(ShardWriter):
    """Writer of example shards with columnar appends (see ``write_batch``)."""

    def __init__(self, out_dir: str, meta: ShardMeta, **kwargs):
        if meta.kind != "examples":
            raise ShardFormatError("TeacherShardWriter writes kind='examples' shards")
        super().__init__(out_dir, meta, **kwargs)

    def write_batch(
        self,
        *,
        example_key: np.ndarray,
        user_id: np.ndarray,
        history,
        target: np.ndarray,
        teachers: Mapping[str, tuple],
        domain_id: np.ndarray | int = 0,
    ) -> None:
        """Append N examples. ``history``: (offsets [N+1], values) or a list of N 1-D arrays
        (chronological, no padding). ``teachers``: {name: (ids, scores)} for EVERY teacher of the
        metadata, each either dense [N, K'] arrays (K' <= K; id PAD_ID marks an empty slot) or ragged
        ((offsets, values) / list of arrays). Lists must be sorted by score, descending."""
        key = np.asarray(example_key, dtype=np.int64)
        n = len(key)
        if set(teachers) != set(self.meta.teacher_names):
            raise TeacherMismatchError(
                f"write_batch got teachers {sorted(teachers)}, the metadata declares {list(self.meta.teacher_names)}"
            )
        cols: dict[str, pa.Array] = {
            "example_key": pa.array(key),
            "user_id": pa.array(np.asarray(user_id, dtype=np.int64)),
            "domain_id": pa.array(np.broadcast_to(np.asarray(domain_id, dtype=np.int32), (n,)).copy()),
            "history": _as_list_array(history, "history", n, pa.int64()),
            "target": pa.array(np.asarray(target, dtype=np.int64)),
        }
        for name in ("user_id", "domain_id", "target"):
            if len(cols[name]) != n:
                raise ShardFormatError(f"{name}: {len(cols[name])} rows, expected {n} (len(example_key))")
        for t in self.meta.teachers:
            ids, scores = teachers[t.name]
            cols[t.ids_column], cols[t.scores_column] = _teacher_lists(t.name, ids, scores, n)
        self.write_table(pa.table(cols))


def write_teacher_embeddings(
    out_dir: str,
    meta: ShardMeta,
    item_id: np.ndarray,
    embedding: np.ndarray,
    **writer_kwargs,
) -> dict:
    """Write one teacher's item embeddings ([N] ids, [N, D] float32) as an embedding shard dataset."""
    emb = np.ascontiguousarray(embedding, dtype=np.float32)
    ids = np.asarray(item_id, dtype=np.int64)
    if emb.ndim != 2 or emb.shape[1] != meta.embedding_dim or len(ids) != len(emb):
        raise ShardFormatError(f"embeddings: expected [{len(ids)}, {meta.embedding_dim}], got {emb.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() >= meta.num_items):
        raise ShardFormatError(f"embeddings: item_id outside [0, {meta.num_items})")
    if not np.isfinite(emb).all():
        raise ShardFormatError("embeddings: NaN or infinite values")
    col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), meta.embedding_dim)
    with ShardWriter(out_dir, meta, **writer_kwargs) as w:
        w.write_table(pa.table({"item_id": pa.array(ids), "embedding": col}))
    with open(os.path.join(out_dir, MANIFEST)) as f:
        return json.load(f)


# ---- reading --------------------------------------------------------------------------------------
@dataclass
class ShardFile:
    path: str
    num_rows: int
    row_group_rows: list[int]

    @property
    def row_group_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.row_group_rows)[:-1]]).astype(np.int64)


@dataclass
class ShardSet:
    """A finished shard dataset, opened and checked from its manifest and file footers (no data read)."""

    root: str
    meta: ShardMeta
    files: list[ShardFile] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def num_row_groups(self) -> int:
        return sum(len(f.row_group_rows) for f in self.files)

    @classmethod
    def open(
        cls, root: str, *, num_items: int | None = None, item_fingerprint: str | None = None, kind: str = "examples"
    ) -> "ShardSet":
        root = str(root)
        mpath = os.path.join(root, MANIFEST)
        if not os.path.isdir(root):
            raise IncompleteShardError(f"{root}: no such shard directory")
        if not os.path.exists(mpath):
            raise IncompleteShardError(f"{root}: no {MANIFEST}; the export did not finish (or this is not a shard dir)")
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise IncompleteShardError(f"{mpath}: corrupt manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise ShardFormatError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("version") != SCHEMA_VERSION:
            raise ShardVersionError(f"{mpath}: schema version {manifest.get('version')!r}, expected {SCHEMA_VERSION}")
        meta = ShardMeta.from_json(json.dumps({**manifest["meta"], "format": FORMAT}), mpath)
        if meta.kind != kind:
            raise ShardFormatError(f"{mpath}: kind {meta.kind!r}, expected {kind!r}")
        meta.check_catalog(num_items, item_fingerprint, mpath)
        expected_schema = schema_for(meta)
        out = cls(root, meta)
        for part in manifest["parts"]:
            path = os.path.join(root, part["file"])
            if not os.path.exists(path):
                raise IncompleteShardError(f"{path}: listed in {MANIFEST} but missing")
            try:
                md = pq.ParquetFile(path).metadata
                schema = md.schema.to_arrow_schema()
            except (pa.ArrowException, OSError) as e:
                raise IncompleteShardError(f"{path}: truncated or corrupt Parquet file ({e})") from None
            raw = (schema.metadata or {}).get(META_KEY)
            if raw is None:
                raise ShardFormatError(f"{path}: no {META_KEY.decode()} metadata; not a prmkd-dist shard")
            fmeta = ShardMeta.from_json(raw, path)
            if fmeta.teacher_names != meta.teacher_names or fmeta.teachers != meta.teachers:
                raise TeacherMismatchError(
                    f"{path}: teachers {[asdict(t) for t in fmeta.teachers]} differ from the dataset's "
                    f"{[asdict(t) for t in meta.teachers]} ({MANIFEST})"
                )
            fmeta.check_catalog(meta.num_items, meta.item_fingerprint, path)
            if fmeta != meta:
                raise ShardFormatError(f"{path}: metadata differs from {MANIFEST}")
            if not schema.equals(expected_schema, check_metadata=False):
                raise ShardFormatError(f"{path}: schema\n{schema}\ndiffers from the contract\n{expected_schema}")
            rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            if md.num_rows != part["rows"]:
                raise IncompleteShardError(f"{path}: {md.num_rows} rows, {MANIFEST} says {part['rows']}")
            out.files.append(ShardFile(path, md.num_rows, rg_rows))
        return out

    def content_digest(self) -> str:
        """sha256 over the parts' names and bytes in manifest order: equal for two shard directories exactly when
        they hold the same files (a rebuilt teacher pipeline that drew other teachers gives another digest, even
        at the same path). Reads every byte once (about 1 s per GB)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(os.path.basename(f.path).encode() + b"\0")
            with open(f.path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        return h.hexdigest()

    def read_row_group(self, file_index: int, row_group: int, columns: Sequence[str] | None = None,
                       handle: pq.ParquetFile | None = None) -> pa.Table:
        """Read one row group, turning Arrow decode errors into IncompleteShardError naming the file."""
        f = self.files[file_index]
        try:
            pf = handle or pq.ParquetFile(f.path)
            return pf.read_row_group(row_group, columns=list(columns) if columns else None)
        except (pa.ArrowException, OSError) as e:
            raise IncompleteShardError(f"{f.path}: row group {row_group} is corrupt or truncated ({e})") from None

    def iter_row_groups(self, columns: Sequence[str] | None = None) -> Iterable[tuple[ShardFile, int, pa.Table]]:
        """(file, first row of the group within the file, table) for every row group in order."""
        for fi, f in enumerate(self.files):
            try:
                pf = pq.ParquetFile(f.path)
            except (pa.ArrowException, OSError) as e:
                raise IncompleteShardError(f"{f.path}: truncated or corrupt Parquet file ({e})") from None
            for g, start in enumerate(f.row_group_starts):
                yield f, int(start), self.read_row_group(fi, g, columns, handle=pf)


def read_teacher_embeddings(root: str, *, num_items: int | None = None,
                            item_fingerprint: str | None = None) -> tuple[ShardMeta, np.ndarray, np.ndarray]:
    """(meta, item_id [N], embedding [N, D] float32) of an embedding shard dataset."""
    ss = ShardSet.open(root, num_items=num_items, item_fingerprint=item_fingerprint, kind="embeddings")
    ids, embs = [], []
    for f, start, tab in ss.iter_row_groups():
        ids.append(np.asarray(tab.column("item_id")))
        col = tab.column("embedding").combine_chunks()
        embs.append(np.asarray(col.flatten()).reshape(len(col), ss.meta.embedding_dim))
    d = ss.meta.embedding_dim
    return ss.meta, (np.concatenate(ids) if ids else np.zeros(0, np.int64)), (np.concatenate(embs) if embs else np.zeros((0, d), np.float32))


def validate_shards(
    root: str,
    *,
    num_items: int | None = None,
    item_fingerprint: str | None = None,
) -> dict:
    """Full scan of an example shard dataset; raises the first problem (BadRowError names file, column,
    row) and returns a summary. Also checks example_key uniqueness (8 bytes per row held in memory)."""
    ss = ShardSet.open(root, num_items=num_items, item_fingerprint=item_fingerprint)
    keys = []
    for f, start, tab in ss.iter_row_groups():
        raise_first(check_example_table(tab, ss.meta), f.path, start)
        keys.append(np.asarray(tab.column("example_key")))
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    uniq, counts = np.unique(all_keys, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise ShardFormatError(f"{root}: {len(dup)} example_key value(s) occur more than once, e.g. {dup[:5].tolist()}")
    return {"root": root, "rows": ss.num_rows, "files": len(ss.files), "row_groups": ss.num_row_groups,
            "teachers": list(ss.meta.teacher_names)}
