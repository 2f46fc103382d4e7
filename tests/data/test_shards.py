"""Shard contract: schema/metadata, writer (row-group sizes, atomic finalisation), validation, CLI."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from shard_fixtures import FINGERPRINT, NUM_ITEMS, make_examples, make_meta, replace_column, rewrite_part, write_examples  # noqa: E402

from prmkd_dist.cli import main as cli_main
from prmkd_dist.data.dataset import InteractionData
from prmkd_dist.data.shards import (
    MANIFEST,
    META_KEY,
    BadRowError,
    FingerprintMismatchError,
    IncompleteShardError,
    ShardFormatError,
    ShardMeta,
    ShardSet,
    ShardVersionError,
    TeacherInfo,
    TeacherMismatchError,
    TeacherShardWriter,
    read_teacher_embeddings,
    validate_shards,
    write_teacher_embeddings,
)


def _read_all(root) -> pa.Table:
    ss = ShardSet.open(str(root))
    return pa.concat_tables([pq.read_table(f.path) for f in ss.files])


def test_roundtrip_row_groups_files_and_manifest(tmp_path):
    ex = write_examples(tmp_path, 700, rows_per_row_group=64, rows_per_file=256, chunks=7)
    ss = ShardSet.open(str(tmp_path))
    assert [f.num_rows for f in ss.files] == [256, 256, 188]
    assert ss.files[0].row_group_rows == [64] * 4 and ss.files[2].row_group_rows == [64, 64, 60]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["num_rows"] == 700
    assert [p["file"] for p in manifest["parts"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(os.listdir(tmp_path)) == sorted([MANIFEST] + [p["file"] for p in manifest["parts"]])
    tab = _read_all(tmp_path)
    meta = ShardMeta.from_json(pq.read_schema(ss.files[1].path).metadata[META_KEY], "x")
    assert meta == make_meta() and meta.teacher("llm").score_semantics == "similarity"
    np.testing.assert_array_equal(tab.column("example_key").to_numpy(), ex["example_key"])
    off, vals = ex["history"]
    assert tab.column("history")[5].as_py() == vals[off[5] : off[6]].tolist()
    # dense [N, K] teacher input: PAD_ID slots are dropped, so short rows stay short
    ids, scores = ex["teachers"]["llm"]
    row = int(np.flatnonzero((ids == -1).any(axis=1) & (ids != -1).any(axis=1))[0])
    got = tab.column("teacher.llm.ids")[row].as_py()
    assert got == ids[row][ids[row] >= 0].tolist() and len(got) < 5
    np.testing.assert_allclose(tab.column("teacher.llm.scores")[row].as_py(), scores[row][ids[row] >= 0])
    assert validate_shards(str(tmp_path))["rows"] == 700


def test_crashed_export_leaves_no_complete_looking_output(tmp_path):
    meta = make_meta()
    ex = make_examples(600, meta)
    with pytest.raises(RuntimeError, match="crash"):
        with TeacherShardWriter(str(tmp_path), meta, rows_per_row_group=50, rows_per_file=200) as w:
            w.write_batch(example_key=ex["example_key"][:300], user_id=ex["user_id"][:300],
                          history=[np.arange(3)] * 300, target=ex["target"][:300],
                          teachers={k: (i[:300], s[:300]) for k, (i, s) in ex["teachers"].items()})
            # the finished first part exists under its final name, the second is still a hidden temp file
            assert os.path.exists(tmp_path / "part-00000.parquet")
            assert os.path.exists(tmp_path / ".part-00001.parquet.tmp")
            with pytest.raises(IncompleteShardError, match="did not finish"):
                ShardSet.open(str(tmp_path))
            raise RuntimeError("crash")
    assert not (tmp_path / MANIFEST).exists() and not (tmp_path / ".part-00001.parquet.tmp").exists()
    with pytest.raises(IncompleteShardError):
        ShardSet.open(str(tmp_path))
    with pytest.raises(FileExistsError):  # a rerun must opt in to replacing leftovers
        TeacherShardWriter(str(tmp_path), meta)
    TeacherShardWriter(str(tmp_path), meta, overwrite=True).close()
    assert ShardSet.open(str(tmp_path)).num_rows == 0


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ids, sc: ids.__setitem__((3, 0), NUM_ITEMS), r"row 3: item id outside \[0, 500\)"),
        (lambda ids, sc: sc.__setitem__((4, 1), np.nan), r"row 4: score is NaN or infinite"),
        (lambda ids, sc: sc.__setitem__((5, 1), 100.0), r"row 5: scores not sorted descending"),
        (lambda ids, sc: ids.__setitem__((6, 1), ids[6, 0]), r"row 6: duplicate item id in the list"),
    ],
)
def test_writer_rejects_bad_rows(tmp_path, mutate, match):
    meta = make_meta()
    ex = make_examples(20, meta)
    ids, sc = (a.copy() for a in ex["teachers"]["sasrec"])
    mutate(ids, sc)
    with pytest.raises(BadRowError, match=match) as info:
        with TeacherShardWriter(str(tmp_path), meta) as w:
            w.write_batch(example_key=ex["example_key"], user_id=ex["user_id"], history=ex["history"],
                          target=ex["target"], teachers={"sasrec": (ids, sc), "llm": ex["teachers"]["llm"]})
    assert info.value.column.startswith("teacher.sasrec.")
    assert not (tmp_path / MANIFEST).exists()


def test_writer_rejects_wide_lists_and_wrong_teachers(tmp_path):
    meta = make_meta()
    ex = make_examples(10, meta)
    with TeacherShardWriter(str(tmp_path / "a"), meta) as w:
        with pytest.raises(TeacherMismatchError, match="declares"):
            w.write_batch(example_key=ex["example_key"], user_id=ex["user_id"], history=ex["history"],
                          target=ex["target"], teachers={"sasrec": ex["teachers"]["sasrec"]})
        wide = (np.tile(np.arange(9), (10, 1)), -np.tile(np.arange(9, dtype=np.float32), (10, 1)))
        with pytest.raises(BadRowError, match="teacher.sasrec.ids.*row 0: more than the declared K=8"):
            w.write_batch(example_key=ex["example_key"], user_id=ex["user_id"], history=ex["history"],
                          target=ex["target"], teachers={"sasrec": wide, "llm": ex["teachers"]["llm"]})
    with pytest.raises(ShardFormatError, match="score_semantics"):
        TeacherInfo("x", 3, "probability")


def _two_datasets(tmp_path):
    write_examples(tmp_path / "a", 300)
    return tmp_path / "a"


def test_validate_finds_bad_rows_written_by_a_foreign_exporter(tmp_path):
    root = _two_datasets(tmp_path)
    part = root / "part-00001.parquet"

    bad_row = {}

    def inf_score(tab):
        scores = tab.column("teacher.llm.scores").to_pylist()
        bad_row["r"] = r = next(i for i in range(20, len(scores)) if scores[i])
        scores[r][0] = float("inf")
        return replace_column(tab, "teacher.llm.scores", scores)

    rewrite_part(part, inf_score)
    with pytest.raises(BadRowError) as info:
        validate_shards(str(root))
    assert (info.value.file, info.value.column, info.value.row) == (str(part), "teacher.llm.scores", bad_row["r"])
    assert cli_main(["shards", "validate", str(root)]) == 1


def test_validate_duplicate_keys_and_history_ids(tmp_path):
    root = _two_datasets(tmp_path)
    rewrite_part(root / "part-00000.parquet", lambda t: replace_column(t, "example_key", np.zeros(len(t), np.int64)))
    with pytest.raises(ShardFormatError, match="example_key value"):
        validate_shards(str(root))
    root2 = tmp_path / "b"
    write_examples(root2, 100)
    rewrite_part(root2 / "part-00000.parquet",
                 lambda t: replace_column(t, "history", [[1, 2, NUM_ITEMS + 7]] + t.column("history").to_pylist()[1:]))
    with pytest.raises(BadRowError, match=r"column 'history', row 0: item id outside"):
        validate_shards(str(root2))


def test_version_fingerprint_teacher_and_truncation_errors(tmp_path):
    root = _two_datasets(tmp_path)
    with pytest.raises(FingerprintMismatchError, match="item fingerprint"):
        ShardSet.open(str(root), item_fingerprint="0" * 16)
    with pytest.raises(FingerprintMismatchError, match="num_items"):
        ShardSet.open(str(root), num_items=NUM_ITEMS + 1)
    # a part whose metadata claims another schema version
    v2 = tmp_path / "v2"
    shutil.copytree(root, v2)
    meta = json.loads(pq.read_schema(v2 / "part-00000.parquet").metadata[META_KEY])
    meta["version"] = 2
    rewrite_part(v2 / "part-00000.parquet", lambda t: t.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}))
    with pytest.raises(ShardVersionError, match=r"part-00000.parquet: shard schema version 2"):
        ShardSet.open(str(v2))
    # a column of another type than the contract's
    f64 = tmp_path / "f64"
    shutil.copytree(root, f64)
    rewrite_part(f64 / "part-00000.parquet", lambda t: t.set_column(
        t.schema.get_field_index("teacher.llm.scores"), "teacher.llm.scores",
        t.column("teacher.llm.scores").cast(pa.list_(pa.float64()))))
    with pytest.raises(ShardFormatError, match=r"part-00000.parquet: schema(.|\n)*differs from the contract"):
        ShardSet.open(str(f64))
    # teachers differing between files: a part from an export whose K differs
    other = tmp_path / "other"
    write_examples(other, 300, make_meta((("sasrec", 9, "logit"), ("llm", 5, "similarity"))))
    mixed = tmp_path / "mixed"
    shutil.copytree(root, mixed)
    shutil.copy(other / "part-00001.parquet", mixed / "part-00001.parquet")
    with pytest.raises(TeacherMismatchError, match="part-00001.parquet: teachers"):
        ShardSet.open(str(mixed))
    # a truncated file (half of it)
    cut = tmp_path / "cut"
    shutil.copytree(root, cut)
    data = (cut / "part-00001.parquet").read_bytes()
    (cut / "part-00001.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(IncompleteShardError, match=r"part-00001.parquet: truncated or corrupt"):
        ShardSet.open(str(cut))
    assert cli_main(["shards", "inspect", str(cut)]) == 1


def test_embedding_shards_roundtrip(tmp_path):
    meta = ShardMeta(NUM_ITEMS, FINGERPRINT, (TeacherInfo("llm", 1, "similarity"),), kind="embeddings", embedding_dim=6)
    emb = np.random.default_rng(0).normal(size=(NUM_ITEMS, 6)).astype(np.float32)
    write_teacher_embeddings(str(tmp_path), meta, np.arange(NUM_ITEMS), emb, rows_per_row_group=128)
    got_meta, ids, got = read_teacher_embeddings(str(tmp_path), item_fingerprint=FINGERPRINT)
    assert got_meta == meta and ShardSet.open(str(tmp_path), kind="embeddings").num_row_groups == 4
    np.testing.assert_array_equal(ids, np.arange(NUM_ITEMS))
    np.testing.assert_array_equal(got, emb)
    with pytest.raises(FingerprintMismatchError):
        read_teacher_embeddings(str(tmp_path), item_fingerprint="x")
    with pytest.raises(ShardFormatError, match="kind 'embeddings', expected 'examples'"):
        ShardSet.open(str(tmp_path))


def test_cli_inspect_stats_validate_with_catalog(tmp_path, capsys):
    n_items = 40
    data = InteractionData(
        name="tiny", num_users=3, num_items=n_items, offsets=np.array([0, 2, 5, 6]),
        items=np.array([1, 2, 3, 4, 5, 6]), timestamps=np.arange(6),
        item_raw_ids=np.array([f"i{j}" for j in range(n_items)], dtype=object),
        user_raw_ids=np.array(["a", "b", "c"], dtype=object),
    )
    data.save(str(tmp_path / "ds"))
    meta = make_meta((("t1", 4, "logit"), ("t2", 3, "log_prob")), num_items=n_items, fingerprint=data.fingerprint)
    write_examples(tmp_path / "sh", 120, meta)
    assert cli_main(["shards", "inspect", str(tmp_path / "sh"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 120 and [(t["name"], t["k"]) for t in info["teachers"]] == [("t1", 4), ("t2", 3)]
    assert cli_main(["shards", "validate", str(tmp_path / "sh"), "--catalog", str(tmp_path / "ds")]) == 0
    assert "catalog" in capsys.readouterr().out
    assert cli_main(["shards", "stats", str(tmp_path / "sh"), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    t1 = st["teachers"]["t1"]
    assert 0 < t1["catalog_coverage"] <= 1 and t1["score_min"] <= t1["score_max"]
    assert 0 <= t1["overlap_with"]["t2"] <= 1
    # shards for another item mapping are refused
    other = make_meta(num_items=n_items)
    write_examples(tmp_path / "sh2", 50, other)
    assert cli_main(["shards", "validate", str(tmp_path / "sh2"), "--catalog", str(tmp_path / "ds")]) == 1
    assert "fingerprint" in capsys.readouterr().err


def test_content_digest_follows_the_bytes_not_the_path(tmp_path):
    """Two writes of the same examples give one digest wherever they lie; one changed score gives another (what
    benchmarks/quality.py checks before it resumes a report over a rebuilt teacher pipeline)."""
    write_examples(tmp_path / "a", 300, seed=3)
    write_examples(tmp_path / "b", 300, seed=3)
    a, b = ShardSet.open(str(tmp_path / "a")), ShardSet.open(str(tmp_path / "b"))
    assert a.content_digest() == b.content_digest() and len(a.content_digest()) == 64
    write_examples(tmp_path / "c", 300, seed=4)
    assert ShardSet.open(str(tmp_path / "c")).content_digest() != a.content_digest()
    # one score of one row in the last part: both copies rewritten the same way, one with the score changed
    def bump(t):
        col = t.column("teacher.sasrec.scores").to_pylist()
        row = next(i for i, v in enumerate(col) if v)
        col[row] = [col[row][0] + 1.0, *col[row][1:]]
        return replace_column(t, "teacher.sasrec.scores", col)

    rewrite_part(a.files[-1].path, lambda t: t)
    rewrite_part(b.files[-1].path, lambda t: t)
    assert a.content_digest() == b.content_digest()
    rewrite_part(b.files[-1].path, bump)
    assert a.content_digest() != b.content_digest()
