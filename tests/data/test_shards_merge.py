"""Merging independent per-teacher exports into training shards (out-of-core bucketed join)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from shard_fixtures import make_meta, replace_column, rewrite_part, write_examples  # noqa: E402

from prmkd_dist.cli import main as cli_main
from prmkd_dist.data.merge import ExampleConflictError, MissingRowsError, merge_teacher_shards
from prmkd_dist.data.shards import FingerprintMismatchError, ShardSet, TeacherMismatchError, validate_shards

N = 600
TEACHERS = {"sasrec": (8, "logit"), "gru": (6, "log_prob"), "llm": (5, "similarity")}


def _meta(*names, **kw):
    return make_meta(tuple((n, *TEACHERS[n]) for n in names), **kw)


def _export(tmp_path, name, rows=None, **kw) -> str:
    out = tmp_path / name
    write_examples(out, N, _meta(name), seed=4, rows=rows, rows_per_row_group=40, rows_per_file=200, **kw)
    return str(out)


def _table(root) -> pa.Table:
    ss = ShardSet.open(root)
    return pa.concat_tables([pq.read_table(f.path) for f in ss.files]).sort_by("example_key")


def test_merge_three_exports_equals_a_joint_export(tmp_path):
    rng = np.random.default_rng(0)
    # exports made independently: different row orders and file layouts
    ins = [_export(tmp_path, n, rows=rng.permutation(N)) for n in TEACHERS]
    rep = merge_teacher_shards(ins, str(tmp_path / "out"), num_buckets=4, rows_per_row_group=64)
    assert rep.rows_out == N and rep.rows_missing == 0 and rep.teachers == list(TEACHERS)
    ss = ShardSet.open(str(tmp_path / "out"))
    assert ss.meta.teacher_names == tuple(TEACHERS) and ss.num_rows == N
    assert validate_shards(str(tmp_path / "out"))["rows"] == N
    joint = tmp_path / "joint"
    write_examples(joint, N, _meta(*TEACHERS), seed=4)
    got, want = _table(str(tmp_path / "out")), _table(str(joint))
    assert got.to_pydict() == want.to_pydict()


def test_missing_rows_fail_or_are_dropped_and_counted(tmp_path):
    a = _export(tmp_path, "sasrec")
    b = _export(tmp_path, "gru", rows=np.setdiff1d(np.arange(N), [5, 77, 300]))
    c = _export(tmp_path, "llm", rows=np.setdiff1d(np.arange(N), [77, 599]))
    with pytest.raises(MissingRowsError, match=r"4 example key\(s\).*gru: 3 absent.*llm: 2 absent") as info:
        merge_teacher_shards([a, b, c], str(tmp_path / "out"), num_buckets=3)
    assert all(str(k) in str(info.value) for k in (5, 77, 300, 599))
    assert not (tmp_path / "out" / "_manifest.json").exists()
    rep = merge_teacher_shards([a, b, c], str(tmp_path / "out"), num_buckets=3, allow_missing=True)
    assert rep.rows_missing == 4 and rep.rows_out == N - 4 and sorted(rep.sample_missing_keys) == [5, 77, 300, 599]
    keys = _table(str(tmp_path / "out")).column("example_key").to_numpy()
    np.testing.assert_array_equal(keys, np.setdiff1d(np.arange(N), [5, 77, 300, 599]))


@pytest.mark.parametrize("column", ["history", "target", "user_id"])
def test_disagreeing_example_columns_name_key_and_files(tmp_path, column):
    a = _export(tmp_path, "sasrec")
    b = _export(tmp_path, "gru")
    part = Path(b) / "part-00001.parquet"  # rows 200..399 of b, in key order

    def edit(tab):
        vals = tab.column(column).to_pylist()
        vals[17] = vals[17] + [1] if column == "history" else (vals[17] + 1) % 100
        return replace_column(tab, column, vals)

    rewrite_part(part, edit)
    with pytest.raises(ExampleConflictError, match=rf"example_key 217: column '{column}' differs") as info:
        merge_teacher_shards([a, b], str(tmp_path / "out"), num_buckets=2)
    assert f"{part} row 17" in str(info.value) and "sasrec/part-00001.parquet row 17" in str(info.value)


def test_inputs_must_share_the_item_space_and_not_repeat_teachers_or_keys(tmp_path):
    a = _export(tmp_path, "sasrec")
    other = tmp_path / "other"
    write_examples(other, N, _meta("gru", fingerprint="0123456789abcdef"), seed=4)
    with pytest.raises(FingerprintMismatchError, match="other"):
        merge_teacher_shards([a, str(other)], str(tmp_path / "out"))
    again = tmp_path / "again"
    write_examples(again, N, _meta("sasrec"), seed=4)
    with pytest.raises(TeacherMismatchError, match="'sasrec' is in both"):
        merge_teacher_shards([a, str(again)], str(tmp_path / "out"))
    dup = tmp_path / "dup"
    write_examples(dup, N, _meta("gru"), seed=4, rows_per_row_group=40, rows_per_file=200)
    rewrite_part(dup / "part-00002.parquet",
                 lambda t: replace_column(t, "example_key", np.r_[3, t.column("example_key").to_numpy()[1:]]))
    with pytest.raises(ExampleConflictError, match=r"example_key 3 occurs 2 times.*part-00000.parquet row 3.*part-00002.parquet row 0"):
        merge_teacher_shards([a, str(dup)], str(tmp_path / "out"), num_buckets=1)


def test_cli_merge(tmp_path, capsys):
    a = _export(tmp_path, "sasrec")
    b = _export(tmp_path, "llm", rows=np.arange(N - 10))
    out = str(tmp_path / "out")
    assert cli_main(["shards", "merge", a, b, "--out", out]) == 1
    assert "10 example key(s)" in capsys.readouterr().err
    assert cli_main(["shards", "merge", a, b, "--out", out, "--allow-missing", "--num-buckets", "3"]) == 0
    assert "dropped 10 example key(s)" in capsys.readouterr().out
    manifest = json.loads((Path(out) / "_manifest.json").read_text())
    assert manifest["num_rows"] == N - 10 and [t["name"] for t in manifest["meta"]["teachers"]] == ["sasrec", "llm"]
