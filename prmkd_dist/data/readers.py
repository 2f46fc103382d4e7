"""One generic reader: any interactions table (+ optional item-text tables) -> canonical InteractionData.

A dataset is described by a :class:`ReaderConfig` (YAML, see docs/data.md and
``prmkd_dist/configs/data/*.yaml``); the shared datasets are nothing but configurations of this reader.

Canonical-form rules (the reader is the one place that implements them):

- Items that have at least one (kept) interaction form the catalog; each gets a contiguous id 0..C-1 in
  the order of its raw id: numeric order when every raw id is an integer literal (ties between spellings
  such as ``"01"``/``"1"`` broken by the string), else the code-point order of the strings. Users
  likewise get 0..U-1. The mapping is therefore a pure function of the set of kept raw ids.
- Each user's sequence is ordered by timestamp; ties keep the original file row order (stable). Without
  a timestamp column the file order is the chronology and the stored timestamp is the 0-based data-row
  number in the file.
- Optional ``min_rating`` keeps rows with ``rating >= min_rating``; then optional k-core filtering
  repeats "drop every row whose user or item has fewer than k rows" until nothing changes.
- Repeated (user, item) rows are kept: re-consumption is part of a sequence.
- Item text: every configured text source contributes one part per catalog item (several rows for
  the same item are joined); parts are joined with ``item_text.separator``. Catalog items without any
  text get ``None``; text rows for items outside the catalog are counted in the report, not used.

Malformed input raises :class:`InputDataError` (a ValueError) naming the file and the line (text
files) or row (Parquet) and what was expected; a bad configuration raises :class:`ReaderConfigError`
naming the file and the key.
"""
from __future__ import annotations

import dataclasses
import io
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from prmkd_dist.data.dataset import InteractionData
from prmkd_dist.data.paths import shared_data_root

Column = Union[str, int]  # a column name, or a 0-based column position (header-less text files)

FORMATS = ("auto", "csv", "tsv", "whitespace", "parquet")
_EXTENSION_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_INT_PATTERN = r"^[+-]?[0-9]+$"


class ReaderConfigError(ValueError):
    """A reader configuration is invalid (message names the file and the key)."""


class InputDataError(ValueError):
    """An input table is malformed (message names the file, the line or row, and what was expected)."""


# ================================================================================================
# Configuration
# ================================================================================================
@dataclass(frozen=True, kw_only=True)
class TableConfig:
    """Where and how to read one table.

    ``format``: ``csv`` | ``tsv`` | ``whitespace`` (fields separated by runs of spaces/tabs) |
    ``parquet`` | ``auto`` (from the extension: .csv, .tsv/.tab, .parquet/.pq).
    ``header``: text files only; without a header, columns are given by 0-based position.
    ``delimiter``: csv only, one character (default ``,``).
    """

    path: str
    format: str = "auto"
    header: bool = True
    delimiter: str | None = None

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return _EXTENSION_FORMATS.get(Path(self.path).suffix.lower(), "")


@dataclass(frozen=True, kw_only=True)
class InteractionsConfig(TableConfig):
    """The interactions table: one row per (user, item[, timestamp][, rating]) event."""

    user: Column
    item: Column
    timestamp: Column | None = None  # integer; None: file order is the chronology
    rating: Column | None = None
    min_rating: float | None = None  # keep rows with rating >= min_rating


@dataclass(frozen=True, kw_only=True)
class TextSourceConfig(TableConfig):
    """A table contributing item text.

    Each row's ``columns`` (after ``replace``: per column, substring -> replacement, applied in order,
    then whitespace-trimmed) are joined with ``join``; the rows of one item are joined with
    ``aggregate`` (file order; ``unique`` drops repeated values); ``prefix`` precedes the item's part.
    """

    item: Column
    columns: list[Column]
    replace: dict[str, dict[str, str]] = field(default_factory=dict)
    join: str = " "
    aggregate: str = ", "
    unique: bool = False
    prefix: str = ""


@dataclass(frozen=True, kw_only=True)
class ItemTextConfig:
    """Item text = the parts of ``sources`` (in order, empty parts skipped) joined with ``separator``."""

    sources: list[TextSourceConfig]
    separator: str = ". "


@dataclass(frozen=True, kw_only=True)
class ReaderConfig:
    """A dataset description for :func:`read_dataset` (YAML keys = field names; see docs/data.md).

    ``relative_to``: relative paths are resolved against the YAML file's directory (``config``; the
    working directory for configs built in code) or against the shared data root (``shared``).
    """

    name: str
    interactions: InteractionsConfig
    item_text: ItemTextConfig | None = None
    kcore: int = 0
    relative_to: str = "config"
    description: str = ""

    # ---- checks beyond types ------------------------------------------------------------------
    def validate(self, where: str = "<ReaderConfig>") -> None:
        """Semantic checks; ``where`` (the YAML file) prefixes every message."""

        def fail(key: str, msg: str) -> typing.NoReturn:
            raise ReaderConfigError(f"{where}: key '{key}': {msg}")

        if not self.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            fail("name", f"{self.name!r} must be a non-empty name of letters, digits, '.', '_', '-' (it names a directory)")
        if self.kcore < 0:
            fail("kcore", f"must be >= 0, got {self.kcore}")
        if self.relative_to not in ("config", "shared"):
            fail("relative_to", f"must be 'config' or 'shared', got {self.relative_to!r}")
        inter = self.interactions
        _validate_table(inter, "interactions", [("user", inter.user), ("item", inter.item),
                                                ("timestamp", inter.timestamp), ("rating", inter.rating)], fail)
        if inter.min_rating is not None and inter.rating is None:
            fail("interactions.min_rating", "needs interactions.rating (the column to compare)")
        if self.item_text is not None:
            if not self.item_text.sources:
                fail("item_text.sources", "must list at least one text table")
            for k, src in enumerate(self.item_text.sources):
                key = f"item_text.sources[{k}]"
                if not src.columns:
                    fail(f"{key}.columns", "must list at least one text column")
                cols = [("item", src.item)] + [(f"columns[{j}]", c) for j, c in enumerate(src.columns)]
                _validate_table(src, key, cols, fail)
                names = {str(c) for c in src.columns}
                for col in src.replace:
                    if col not in names:
                        fail(f"{key}.replace.{col}", f"is not one of the text columns {sorted(names)}")

    def with_paths_resolved(self, config_dir: Path | None = None) -> "ReaderConfig":
        """Copy with every table path absolute (see ``relative_to``)."""
        def fix(tab):
            p = Path(tab.path).expanduser()
            if p.is_absolute():
                return tab  # nothing to resolve: never require the shared root for absolute paths
            base = shared_data_root() if self.relative_to == "shared" else (config_dir or Path.cwd())
            return dataclasses.replace(tab, path=str((base / p).resolve()))

        text = self.item_text
        if text is not None:
            text = dataclasses.replace(text, sources=[fix(s) for s in text.sources])
        return dataclasses.replace(self, interactions=fix(self.interactions), item_text=text)

    def to_dict(self) -> dict:
        """Plain-data form (YAML/JSON serialisable; round-trips through :func:`reader_config_from_dict`)."""
        return dataclasses.asdict(self)


def _validate_table(tab: TableConfig, key: str, columns: list[tuple[str, Column | None]], fail) -> None:
    fmt = tab.resolved_format()
    if tab.format not in FORMATS:
        fail(f"{key}.format", f"must be one of {', '.join(FORMATS)}, got {tab.format!r}")
    if not fmt:
        fail(f"{key}.format", f"'auto' cannot tell the format of {tab.path!r} from its extension; set csv, tsv, whitespace or parquet")
    if tab.delimiter is not None and (fmt != "csv" or len(tab.delimiter) != 1):
        fail(f"{key}.delimiter", f"only applies to format csv and must be one character, got {tab.delimiter!r} for format {fmt}")
    for name, col in columns:
        if isinstance(col, int) and col < 0:
            fail(f"{key}.{name}", f"a column position must be >= 0, got {col}")
        if isinstance(col, str) and fmt != "parquet" and not tab.header:
            fail(f"{key}.{name}", f"header is false, so columns are 0-based positions, got name {col!r}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if typing.get_origin(tp) is list:
        return "a list"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return {type(None): "null", str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    """Check ``value`` against the type hint ``tp`` (recursively building dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ReaderConfigError:
                pass
        raise ReaderConfigError(f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
    if origin is list:
        if not isinstance(value, list):
            raise ReaderConfigError(f"{where}: key '{key}': expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ReaderConfigError(f"{where}: key '{key}': expected a mapping, got {value!r}")
        _, varg = typing.get_args(tp)
        return {str(k): _coerce(v, varg, f"{key}.{k}", where) for k, v in value.items()}
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported config type {tp}")
    if not ok:
        raise ReaderConfigError(f"{where}: key '{key}': expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls, raw: Any, key: str, where: str):
    prefix = f"{key}." if key else ""
    if not isinstance(raw, dict):
        raise ReaderConfigError(f"{where}: key '{key or '<top>'}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        raise ReaderConfigError(f"{where}: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ReaderConfigError(f"{where}: missing required key '{prefix}{name}'")
            continue
        kwargs[name] = _coerce(raw[name], hints[name], prefix + name, where)
    return cls(**kwargs)


def reader_config_from_dict(raw: dict, where: str = "<dict>") -> ReaderConfig:
    """Build and validate a :class:`ReaderConfig` from plain data (``where`` names it in errors)."""
    cfg = _build(ReaderConfig, raw, "", where)
    cfg.validate(where)
    return cfg


def load_reader_config(path: str | Path) -> ReaderConfig:
    """Load a YAML reader config; table paths come back absolute (see ``ReaderConfig.relative_to``)."""
    path = Path(path)
    if not path.is_file():
        raise ReaderConfigError(f"{path}: reader config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ReaderConfigError(f"{path}: not valid YAML: {e}") from e
    return reader_config_from_dict(raw, str(path)).with_paths_resolved(path.resolve().parent)


# ================================================================================================
# Reading tables
# ================================================================================================
@dataclass
class _Table:
    """Requested columns of one input table, plus what is needed to point at a line in errors."""

    path: Path
    fmt: str
    header: bool
    columns: dict[Column, pa.Array]  # requested column spec -> values (strings for text formats)
    names: dict[Column, str]  # requested column spec -> column name in the file
    num_rows: int

    def where(self, row: int) -> str:
        """'file:line N' (text) or 'file: row N' (Parquet, 0-based) of 0-based data row ``row``."""
        if self.fmt == "parquet":
            return f"{self.path}: row {row}"
        return f"{self.path}:{_line_of_record(self.path, self.fmt, row + 1 + int(self.header))}"

    def column_label(self, spec: Column) -> str:
        return f"column {self.names[spec]!r}" if self.fmt == "parquet" or self.header else f"field {spec} (0-based)"


def _is_blank(line: bytes, fmt: str) -> bool:
    # Mirrors pyarrow's ignore_empty_lines (after our whitespace normalisation for that format).
    return not (line.strip() if fmt == "whitespace" else line.rstrip(b"\r\n"))


def _line_of_record(path: Path, fmt: str, record: int) -> int:
    """1-based physical line of the ``record``-th (1-based) non-blank line: only used to report errors."""
    seen = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not _is_blank(line, fmt):
                seen += 1
                if seen == record:
                    return lineno
    return -1


_WS_RUNS = re.compile(rb"[ \t]+")
_WS_EDGES = re.compile(rb"(?m)^[ \t]+|[ \t]+(?=\r?$)")


def _text_source(path: Path, fmt: str) -> str | bytes:
    """What pyarrow reads: the file's path, or (whitespace format) the file's bytes with every run of
    spaces/tabs turned into one space and none at line edges, so that a one-char delimiter parses it.
    Line numbers are unchanged by this."""
    if fmt != "whitespace":
        return str(path)
    return _WS_RUNS.sub(b" ", _WS_EDGES.sub(b"", path.read_bytes()))


def _resolve_columns(path: Path, file_names: list[str], specs: list[Column], what: str) -> dict[Column, str]:
    """Column spec (name or 0-based position) -> the file's column name; ``what`` describes the header."""
    names = {}
    for spec in specs:
        if isinstance(spec, int):
            if spec >= len(file_names):
                raise InputDataError(f"{path}: column position {spec} requested but {what} has {len(file_names)} columns")
            names[spec] = file_names[spec]
        elif spec not in file_names:
            raise InputDataError(f"{path}: no column {spec!r} in {what} (columns: {', '.join(file_names)})")
        else:
            names[spec] = spec
    return names


def _read_text_table(path: Path, fmt: str, header: bool, delimiter: str | None, specs: list[Column]) -> _Table:
    delim = {"csv": delimiter or ",", "tsv": "\t", "whitespace": " "}[fmt]
    quote = '"' if fmt == "csv" else False
    source = _text_source(path, fmt)

    def parser_input():
        return source if isinstance(source, str) else io.BytesIO(source)

    # Values never span lines (newlines_in_values=False), so a data row maps to one physical line.
    # This first pass only learns the column names; bad rows are reported with their line by the full read.
    probe = pacsv.ParseOptions(delimiter=delim, quote_char=quote, invalid_row_handler=lambda row: "skip")
    try:
        with pacsv.open_csv(parser_input(), read_options=pacsv.ReadOptions(autogenerate_column_names=not header),
                            parse_options=probe) as reader:
            file_names = reader.schema.names
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise InputDataError(f"{path}: file is empty, expected {'a header line and ' if header else ''}data rows") from e
        raise InputDataError(f"{path}: cannot parse as {fmt}: {e}") from e
    names = _resolve_columns(path, file_names, specs, "the header" if header else "line 1")
    wanted = list(dict.fromkeys(names.values()))
    bad_rows: list = []

    def on_invalid(row) -> str:
        bad_rows.append(row)
        return "error"

    def read_all(use_threads: bool) -> pa.Table:
        return pacsv.read_csv(
            parser_input(),
            read_options=pacsv.ReadOptions(autogenerate_column_names=not header, use_threads=use_threads),
            parse_options=pacsv.ParseOptions(delimiter=delim, quote_char=quote, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(include_columns=wanted, column_types={n: pa.string() for n in wanted}),
        )

    try:
        table = read_all(use_threads=True)
    except pa.ArrowInvalid as e:
        if not bad_rows:
            raise InputDataError(f"{path}: cannot parse as {fmt}: {e}") from e
        if bad_rows[0].number is None:  # threaded parsing does not number rows: redo it serially
            bad_rows.clear()
            try:
                read_all(use_threads=False)
            except pa.ArrowInvalid:
                pass
        row = bad_rows[0]
        line = _line_of_record(path, fmt, row.number) if row.number is not None else "?"
        raise InputDataError(
            f"{path}:{line}: expected {row.expected_columns} fields, got {row.actual_columns}: {row.text!r}"
        ) from e
    if table.num_rows == 0:
        raise InputDataError(f"{path}: no data rows (expected at least one {'after the header' if header else 'line'})")
    cols = {spec: table.column(names[spec]).combine_chunks() for spec in specs}
    return _Table(path, fmt, header, cols, names, table.num_rows)


def _read_parquet_table(path: Path, specs: list[Column]) -> _Table:
    try:
        file_names = pq.read_schema(path).names
    except (pa.ArrowInvalid, OSError) as e:
        raise InputDataError(f"{path}: not a readable Parquet file: {e}") from e
    names = _resolve_columns(path, file_names, specs, "the schema")
    table = pq.read_table(path, columns=list(dict.fromkeys(names.values())))
    if table.num_rows == 0:
        raise InputDataError(f"{path}: no rows (expected at least one)")
    cols = {spec: table.column(names[spec]).combine_chunks() for spec in specs}
    return _Table(path, "parquet", True, cols, names, table.num_rows)


def _read_table(tab: TableConfig, specs: list[Column]) -> _Table:
    path = Path(tab.path)
    if not path.is_file():
        raise InputDataError(f"{path}: input file not found")
    fmt = tab.resolved_format()
    if fmt == "parquet":
        return _read_parquet_table(path, specs)
    return _read_text_table(path, fmt, tab.header, tab.delimiter, specs)


# ---- typed column extraction (errors point at the first offending row) ------------------------
def _first_false(mask: pa.Array) -> int | None:
    bad = np.flatnonzero(~np.asarray(mask.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool))
    return int(bad[0]) if len(bad) else None


def _id_column(t: _Table, spec: Column, what: str) -> pa.Array:
    """Raw ids as strings; integer or string typed columns only, no empty value."""
    col = t.columns[spec]
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_integer(col.type):
        col = pc.cast(col, pa.string())
    elif pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    elif not pa.types.is_string(col.type):
        raise InputDataError(f"{t.path}: {t.column_label(spec)} ({what} id) has type {col.type}, expected integer or string ids")
    bad = _first_false(pc.and_(pc.is_valid(col), pc.not_equal(pc.utf8_length(col), 0)))
    if bad is not None:
        raise InputDataError(f"{t.where(bad)}: {t.column_label(spec)} ({what} id) is empty, expected a {what} id")
    return col


def _int_column(t: _Table, spec: Column, what: str) -> np.ndarray:
    col = t.columns[spec]
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        # Parquet stores no second unit (pyarrow writes ms): normalise to whole seconds since the epoch.
        col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
    if pa.types.is_integer(col.type):
        bad = _first_false(pc.is_valid(col))
        if bad is not None:
            raise InputDataError(f"{t.where(bad)}: {t.column_label(spec)} ({what}) is null, expected an integer")
        return pc.cast(col, pa.int64()).to_numpy().astype(np.int64, copy=False)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputDataError(f"{t.path}: {t.column_label(spec)} ({what}) has type {col.type}, expected integers")
    bad = _first_false(pc.match_substring_regex(col, _INT_PATTERN))
    if bad is not None:
        raise InputDataError(f"{t.where(bad)}: {t.column_label(spec)} ({what}) is {col[bad].as_py()!r}, expected an integer")
    try:
        return pc.cast(col, pa.int64()).to_numpy().astype(np.int64, copy=False)
    except pa.ArrowInvalid as e:
        raise InputDataError(f"{t.path}: {t.column_label(spec)} ({what}): {e} (expected 64-bit integers)") from e


def _float_column(t: _Table, spec: Column, what: str) -> np.ndarray:
    col = t.columns[spec]
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type):
        bad = _first_false(pc.is_valid(col))
        if bad is None:
            return pc.cast(col, pa.float64()).to_numpy()
        raise InputDataError(f"{t.where(bad)}: {t.column_label(spec)} ({what}) is null, expected a number")
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise InputDataError(f"{t.path}: {t.column_label(spec)} ({what}) has type {col.type}, expected numbers")
    try:
        return pc.cast(col, pa.float64()).to_numpy()
    except pa.ArrowInvalid:
        for row, v in enumerate(col.to_pylist()):  # error path only: find the first offending row
            try:
                float(v)
            except (TypeError, ValueError):
                raise InputDataError(f"{t.where(row)}: {t.column_label(spec)} ({what}) is {v!r}, expected a number") from None
        raise


def _text_column(t: _Table, spec: Column) -> pa.Array:
    col = t.columns[spec]
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    return pc.cast(col.fill_null(""), pa.string())


# ================================================================================================
# Canonical ids, filtering, ordering
# ================================================================================================
def canonical_id_order(raw_ids: np.ndarray) -> np.ndarray:
    """Permutation putting distinct raw ids (strings) in canonical order: numeric when all are integer
    literals (ties between spellings broken by the string), else code-point order of the strings."""
    arr = pa.array(raw_ids, pa.string())
    if len(arr) and pc.all(pc.match_substring_regex(arr, _INT_PATTERN)).as_py():
        try:
            keys = pa.table({"n": pc.cast(arr, pa.int64()), "s": arr})
            return pc.sort_indices(keys, sort_keys=[("n", "ascending"), ("s", "ascending")]).to_numpy()
        except pa.ArrowInvalid:  # beyond int64: no sensible numeric order, use the strings
            pass
    return pc.sort_indices(arr).to_numpy()


def _encode(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (codes [n] int64 in first-appearance order, distinct values [m] object)."""
    enc = pc.dictionary_encode(col)
    return enc.indices.to_numpy().astype(np.int64), enc.dictionary.to_numpy(zero_copy_only=False)


def _canonical_ids(codes: np.ndarray, uniques: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-number the codes still in use to 0..n-1 in canonical raw-id order.

    Returns (new id per code, -1 for codes no longer used; raw ids in new-id order)."""
    present = np.flatnonzero(np.bincount(codes, minlength=len(uniques)) > 0)
    order = canonical_id_order(uniques[present])
    new_id = np.full(len(uniques), -1, dtype=np.int64)
    new_id[present[order]] = np.arange(len(present), dtype=np.int64)
    return new_id, uniques[present[order]]


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Rows kept by k-core filtering (every kept user and item has >= k kept rows), and the number of
    passes it took. ``users``/``items`` are non-negative int codes."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep, 0
    passes = 0
    while True:
        passes += 1
        u_count = np.bincount(users[keep], minlength=int(users.max()) + 1 if len(users) else 0)
        i_count = np.bincount(items[keep], minlength=int(items.max()) + 1 if len(items) else 0)
        new_keep = keep & (u_count[users] >= k) & (i_count[items] >= k)
        if new_keep.sum() == keep.sum():
            return keep, passes
        keep = new_keep


@dataclass
class ReadReport:
    """What the reader did with the input rows: nothing is dropped without being counted here."""

    rows_read: int = 0
    rows_below_min_rating: int = 0
    rows_removed_by_kcore: int = 0
    kcore_passes: int = 0
    text_rows_read: int = 0
    text_rows_outside_catalog: int = 0  # text rows whose item has no kept interaction
    items_with_text: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _item_text(cfg: ItemTextConfig, catalog_raw: np.ndarray, report: ReadReport) -> list[str | None]:
    catalog = pa.array(catalog_raw, pa.string())
    parts: list[list[str]] = [[] for _ in range(len(catalog_raw))]
    for src in cfg.sources:
        t = _read_table(src, [src.item, *src.columns])
        report.text_rows_read += t.num_rows
        item_ids = pc.index_in(_id_column(t, src.item, "item"), value_set=catalog).fill_null(-1).to_numpy()
        report.text_rows_outside_catalog += int((item_ids < 0).sum())
        fields = []
        for spec in src.columns:
            col = _text_column(t, spec)
            for old, new in src.replace.get(str(spec), {}).items():
                col = pc.replace_substring(col, old, new)
            col = pc.utf8_trim_whitespace(col)
            fields.append(pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col))
        row_text = pc.binary_join_element_wise(*fields, src.join, null_handling="skip").fill_null("")
        row_text = np.asarray(row_text.to_numpy(zero_copy_only=False), dtype=object)
        use = np.flatnonzero((item_ids >= 0) & (row_text != ""))
        use = use[np.argsort(item_ids[use], kind="stable")]  # group by item, file order within an item
        ids, texts = item_ids[use], row_text[use]
        bounds = np.flatnonzero(np.diff(ids)) + 1
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(ids)]):  # per item with text: cheap
            if start == end:
                continue
            values = texts[start:end].tolist()
            if src.unique:
                values = list(dict.fromkeys(values))
            parts[ids[start]].append(src.prefix + src.aggregate.join(values))
    text = [cfg.separator.join(p) if p else None for p in parts]
    report.items_with_text = sum(t is not None for t in text)
    return text


def read_dataset(config: ReaderConfig, source: str = "") -> tuple[InteractionData, ReadReport]:
    """Read the tables described by ``config`` into the canonical :class:`InteractionData`.

    Relative paths in ``config`` are resolved per ``config.relative_to`` (working directory for
    ``config``). ``source`` is stored as ``InteractionData.source`` (provenance string).
    Raises InputDataError / ReaderConfigError on malformed input (file, line/row and expectation named).
    """
    config.validate()
    config = config.with_paths_resolved()
    inter = config.interactions
    specs = [inter.user, inter.item] + [c for c in (inter.timestamp, inter.rating) if c is not None]
    t = _read_table(inter, list(dict.fromkeys(specs)))
    report = ReadReport(rows_read=t.num_rows)
    user_codes, user_uniques = _encode(_id_column(t, inter.user, "user"))
    item_codes, item_uniques = _encode(_id_column(t, inter.item, "item"))
    if inter.timestamp is not None:
        timestamps = _int_column(t, inter.timestamp, "timestamp")
    else:
        timestamps = np.arange(t.num_rows, dtype=np.int64)  # file order is the chronology
    keep = np.ones(t.num_rows, dtype=bool)
    if inter.rating is not None:
        ratings = _float_column(t, inter.rating, "rating")
        if inter.min_rating is not None:
            keep &= ratings >= inter.min_rating
            report.rows_below_min_rating = int((~keep).sum())
    rows = np.flatnonzero(keep)
    core, report.kcore_passes = kcore_mask(user_codes[rows], item_codes[rows], config.kcore)
    report.rows_removed_by_kcore = int((~core).sum())
    rows = rows[core]
    if len(rows) == 0:
        raise InputDataError(
            f"{inter.path}: no interaction left after filtering ({report.rows_read} rows read, "
            f"{report.rows_below_min_rating} below min_rating, {report.rows_removed_by_kcore} removed by {config.kcore}-core)"
        )
    user_id, user_raw = _canonical_ids(user_codes[rows], user_uniques)
    item_id, item_raw = _canonical_ids(item_codes[rows], item_uniques)
    users, items, ts = user_id[user_codes[rows]], item_id[item_codes[rows]], timestamps[rows]
    order = np.lexsort((rows, ts, users))  # by user, then time, then file row: deterministic ties
    offsets = np.zeros(len(user_raw) + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=len(user_raw)), out=offsets[1:])
    text = _item_text(config.item_text, item_raw, report) if config.item_text is not None else None
    data = InteractionData(
        name=config.name,
        num_users=len(user_raw),
        num_items=len(item_raw),
        offsets=offsets,
        items=items[order],
        timestamps=ts[order],
        item_raw_ids=item_raw,
        user_raw_ids=user_raw,
        item_text=text,
        kcore=config.kcore,
        source=source,
    )
    return data, report
