"""`prmkd-dist export` (from a training checkpoint) and `prmkd-dist recommend` (files in, files out)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prmkd_dist.cli import main
from prmkd_dist.serve.artifact import ServingArtifact
from prmkd_dist.serve.recommend import RecommendInputError, recommend_file


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def raw_rows(ml_small_split):
    data = ml_small_split.data
    users = ml_small_split.eval_users("test")[:40]
    return [{"user": str(data.user_raw_ids[u]),
             "history": [str(data.item_raw_ids[i]) for i in ml_small_split.history(int(u), "test")]} for u in users]


def test_cli_export_from_checkpoint_then_recommend(trained_students, ml_small, ml_small_split, raw_rows, tmp_path, capsys):
    from prmkd_dist.train.config import config_from_dict
    from prmkd_dist.train.trainer import save_checkpoint

    from .conftest import STUDENTS, TRAIN_LEN

    ml_small.save(str(tmp_path / "data"))
    cfg = config_from_dict({"data": {"dataset": str(tmp_path / "data"), "max_len": TRAIN_LEN},
                            "model": {"name": "gru4rec", "hparams": STUDENTS["gru4rec"]}})
    save_checkpoint(tmp_path / "ckpt", trained_students["gru4rec"], cfg, ml_small_split, 1, {"NDCG@10": 0.0})
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "art")]) == 0
    assert "exported gru4rec" in capsys.readouterr().out
    art = ServingArtifact.load(tmp_path / "art")
    assert json.loads((tmp_path / "art" / "config.json").read_text())["training_config"]["model"]["name"] == "gru4rec"
    # exporting over it again is refused without --overwrite
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "art")]) == 2
    assert "not empty" in capsys.readouterr().err

    write_jsonl(tmp_path / "in.jsonl", raw_rows)
    assert main(["recommend", "--artifact", str(tmp_path / "art"), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.parquet"), "--k", "7", "--raw-ids", "--batch-size", "16",
                 "--no-progress"]) == 0
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["user"] for r in out] == [r["user"] for r in raw_rows]
    ids, scores = art.recommend([r["history"] for r in raw_rows], k=7, raw_ids=True)
    assert [r["items"] for r in out] == ids.tolist()
    np.testing.assert_allclose([r["scores"] for r in out], scores.numpy(), rtol=0, atol=1e-6)
    # recommendations are never items of the history
    assert all(not set(r["items"]) & set(h["history"]) for r, h in zip(out, raw_rows))


def test_recommend_file_internal_ids_parquet_to_jsonl(artifacts, ml_small_split, tmp_path):
    users = ml_small_split.eval_users("valid")[:25]
    hist = [ml_small_split.history(int(u), "valid").tolist() for u in users]
    pq.write_table(pa.table({"uid": users.tolist(), "seq": hist}), tmp_path / "in.parquet")
    stats = recommend_file(artifacts["caser"], tmp_path / "in.parquet", tmp_path / "out.jsonl", k=5,
                           approximate=True, user_col="uid", history_col="seq", batch_size=8, progress=False)
    assert stats.rows == 25
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["uid"] for r in rows] == users.tolist()
    for r, h in zip(rows, hist):
        assert len(r["items"]) == 5 == len(set(r["items"])) and not set(r["items"]) & set(h)
        assert all(isinstance(i, int) for i in r["items"])


def test_unknown_raw_ids(artifacts, raw_rows, tmp_path):
    rows = [dict(r) for r in raw_rows[:5]]
    rows[3] = {"user": "x", "history": ["1", "not-a-movie", "also-not"]}
    write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(RecommendInputError, match=r"in\.jsonl: line 4: raw item id 'not-a-movie'"):
        recommend_file(artifacts["sasrec"], tmp_path / "in.jsonl", tmp_path / "out.jsonl", raw_ids=True, progress=False)
    assert not (tmp_path / "out.jsonl").exists()
    stats = recommend_file(artifacts["sasrec"], tmp_path / "in.jsonl", tmp_path / "out.jsonl", raw_ids=True,
                           skip_unknown=True, progress=False)
    assert (stats.unknown_ids_skipped, stats.rows_with_unknown_ids, stats.rows) == (2, 1, 5)
    art = ServingArtifact.load(artifacts["sasrec"])
    row4 = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[3])
    assert row4["items"] == art.recommend([["1"]], k=10, raw_ids=True)[0][0].tolist()


@pytest.mark.parametrize("content, message", [
    ('{"user": 1}\n', r"line 1: expected an object with keys 'user' and 'history'"),
    ('{"user": 1, "history": [1, 2]}\nnot json\n', r"line 2: not valid JSON"),
    ('{"user": 1, "history": "1 2"}\n', r"line 1: 'history' must be a list"),
    ('{"user": 1, "history": [1, 99999999]}\n', r"line 1: item id 99999999 is not in 0\.\.9723"),
    ('{"user": 1, "history": ["1"]}\n', r"line 1: internal item ids must be integers, got '1'"),
])
def test_bad_input_rows(artifacts, tmp_path, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(RecommendInputError, match=message):
        recommend_file(artifacts["sasrec"], tmp_path / "in.jsonl", tmp_path / "out.parquet", progress=False)


def test_bad_files(artifacts, tmp_path, capsys):
    pq.write_table(pa.table({"user": [1], "items": [[1]]}), tmp_path / "in.parquet")
    with pytest.raises(RecommendInputError, match=r"in\.parquet: no column 'history'"):
        recommend_file(artifacts["sasrec"], tmp_path / "in.parquet", tmp_path / "out.parquet", progress=False)
    with pytest.raises(RecommendInputError, match=r"out\.csv: the output must end in one of"):
        recommend_file(artifacts["sasrec"], tmp_path / "in.parquet", tmp_path / "out.csv", progress=False)
    # the CLI turns these into one line on stderr and exit code 2
    assert main(["recommend", "--artifact", str(tmp_path / "none"), "--input", str(tmp_path / "in.parquet"),
                 "--output", str(tmp_path / "o.parquet")]) == 2
    assert "none: not a directory" in capsys.readouterr().err
