"""Synthetic teacher-score shards for the shard/loader/merge tests (real Parquet files, small sizes)."""
from __future__ import annotations

import numpy as np

from prmkd_dist.data.shards import ShardMeta, TeacherInfo, TeacherShardWriter

NUM_ITEMS = 500
FINGERPRINT = "f00dfeedf00dfeed"


def make_meta(teachers=(("sasrec", 8, "logit"), ("llm", 5, "similarity")), num_items=NUM_ITEMS,
              fingerprint=FINGERPRINT) -> ShardMeta:
    return ShardMeta(num_items=num_items, item_fingerprint=fingerprint,
                     teachers=tuple(TeacherInfo(n, k, sem, producer="tests") for n, k, sem in teachers),
                     producer="tests/data/shard_fixtures.py")


def make_examples(n: int, meta: ShardMeta, seed: int = 0, key_offset: int = 0, max_hist: int = 12) -> dict:
    """Columnar examples with ragged histories and teacher lists (some shorter than K, some empty)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_hist + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    example = {
        "example_key": np.arange(n, dtype=np.int64) + key_offset,
        "user_id": rng.integers(0, 50, n),
        "domain_id": rng.integers(0, 3, n).astype(np.int32),
        "history": (offsets, rng.integers(0, meta.num_items, int(offsets[-1]))),
        "target": np.where(rng.random(n) < 0.1, -1, rng.integers(0, meta.num_items, n)),
    }
    teachers = {}
    for t in meta.teachers:
        # teacher columns use their own stream: the example columns must not depend on the teachers
        rng = np.random.default_rng([seed, sum(map(ord, t.name))])
        ids = np.full((n, t.k), -1, dtype=np.int64)
        scores = np.zeros((n, t.k), dtype=np.float32)
        fill = rng.integers(0, t.k + 1, n)
        fill[: max(1, n // 2)] = t.k  # most rows full
        for_rows = rng.permuted(np.tile(np.arange(meta.num_items), (n, 1)), axis=1)[:, : t.k]
        mask = np.arange(t.k)[None, :] < fill[:, None]
        ids[mask] = for_rows[mask]
        s = -np.sort(-rng.normal(size=(n, t.k)).astype(np.float32), axis=1)
        scores[mask] = s[mask]
        teachers[t.name] = (ids, scores)
    return {**example, "teachers": teachers}


def take_rows(ex: dict, rows: np.ndarray) -> dict:
    """The examples at ``rows`` (history as a list of arrays; test-side helper, per-row loop is fine)."""
    off, vals = ex["history"]
    return {
        **{k: ex[k][rows] for k in ("example_key", "user_id", "domain_id", "target")},
        "history": [vals[off[i] : off[i + 1]] for i in rows],
        "teachers": {k: (i[rows], s[rows]) for k, (i, s) in ex["teachers"].items()},
    }


def write_examples(out_dir, n: int, meta: ShardMeta | None = None, *, seed: int = 0, chunks: int = 3,
                   rows_per_row_group: int = 64, rows_per_file: int = 256, key_offset: int = 0,
                   rows: np.ndarray | None = None) -> dict:
    """Write n synthetic examples (or the subset ``rows`` of them) in ``chunks`` write_batch calls;
    returns all n generated examples."""
    meta = meta or make_meta()
    ex = make_examples(n, meta, seed, key_offset)
    sel = take_rows(ex, np.arange(n) if rows is None else np.asarray(rows))
    m = len(sel["example_key"])
    bounds = np.linspace(0, m, chunks + 1).astype(int)
    with TeacherShardWriter(str(out_dir), meta, rows_per_row_group=rows_per_row_group, rows_per_file=rows_per_file) as w:
        for a, b in zip(bounds[:-1], bounds[1:]):
            w.write_batch(
                example_key=sel["example_key"][a:b], user_id=sel["user_id"][a:b], domain_id=sel["domain_id"][a:b],
                history=sel["history"][a:b], target=sel["target"][a:b],
                teachers={k: (i[a:b], s[a:b]) for k, (i, s) in sel["teachers"].items()},
            )
    return ex


def rewrite_part(path, fn) -> None:
    """Replace a part's table by fn(table), keeping its schema metadata (to inject bad rows past the
    writer's own checks, as a foreign exporter could)."""
    import pyarrow.parquet as pq

    tab = pq.read_table(path)
    new = fn(tab)
    pq.write_table(new.replace_schema_metadata(tab.schema.metadata) if new.schema.metadata is None else new, path,
                   row_group_size=64)


def replace_column(tab, name: str, array):
    import pyarrow as pa

    i = tab.schema.get_field_index(name)
    return tab.set_column(i, tab.schema.field(i), pa.array(array, tab.schema.field(i).type))
