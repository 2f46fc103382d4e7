"""The canonical dataset contract (prmkd_dist/data/dataset.py): split, save/load, load-time errors."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import (
    DatasetFormatError,
    InteractionData,
    LeaveOneOutSplit,
    item_fingerprint,
    left_pad,
)


def make(sequences: list[list[int]], num_items: int, text: list | None = None) -> InteractionData:
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sequences], out=offsets[1:])
    items = np.array([i for s in sequences for i in s], dtype=np.int64)
    return InteractionData(
        "hand", len(sequences), num_items, offsets, items, 100 + np.arange(len(items), dtype=np.int64),
        np.array([f"item{i}" for i in range(num_items)], dtype=object),
        np.array([f"user{u}" for u in range(len(sequences))], dtype=object), item_text=text,
    )


# ---- leave-one-out split ---------------------------------------------------------------------------
def test_split_last_is_test_second_to_last_is_valid():
    data = make([[0, 1, 2, 3], [4, 2, 1], [3, 4], [2], []], 5)
    split = LeaveOneOutSplit.of(data)
    assert split.test_target.tolist() == [3, 1, PAD_ID, PAD_ID, PAD_ID]
    assert split.valid_target.tolist() == [2, 2, PAD_ID, PAD_ID, PAD_ID]
    # users with < 3 interactions keep everything for training
    assert [split.train_sequence(u).tolist() for u in range(5)] == [[0, 1], [4], [3, 4], [2], []]
    assert split.train_offsets.tolist() == [0, 2, 3, 5, 6, 6]
    assert split.eval_users("valid").tolist() == split.eval_users("test").tolist() == [0, 1]


def test_split_histories_never_contain_their_target():
    data = make([[0, 1, 2, 3], [4, 2, 1]], 5)
    split = LeaveOneOutSplit.of(data)
    assert split.history(0, "valid").tolist() == [0, 1]
    assert split.history(0, "test").tolist() == [0, 1, 2]  # train prefix + validation item
    assert split.history(1, "test").tolist() == [4, 2]
    assert np.array_equal(split.target("test"), split.test_target)
    with pytest.raises(ValueError, match="stage must be 'valid' or 'test'"):
        split.history(0, "train")


def test_left_pad_keeps_most_recent_at_the_right():
    out = left_pad([np.array([1, 2, 3, 4]), np.array([5]), np.array([], dtype=np.int64)], 3)
    assert out.dtype == np.int64
    assert out.tolist() == [[2, 3, 4], [PAD_ID, PAD_ID, 5], [PAD_ID] * 3]


def test_fingerprint_depends_on_raw_ids_in_id_order():
    assert item_fingerprint(["a", "b"]) == item_fingerprint(np.array(["a", "b"], dtype=object))
    assert item_fingerprint(["a", "b"]) != item_fingerprint(["b", "a"])
    assert make([[0, 1]], 2).fingerprint == item_fingerprint(["item0", "item1"])


# ---- in-memory validation ------------------------------------------------------------------------
def test_validation_rejects_inconsistent_arrays():
    good = make([[0, 1]], 2)
    with pytest.raises(DatasetFormatError, match="item id 5, expected 0..1"):
        InteractionData("bad", 1, 2, good.offsets, np.array([0, 5]), good.timestamps, good.item_raw_ids, good.user_raw_ids)
    with pytest.raises(DatasetFormatError, match="offsets must have num_users"):
        InteractionData("bad", 1, 2, np.array([0, 1]), good.items, good.timestamps, good.item_raw_ids, good.user_raw_ids)
    with pytest.raises(DatasetFormatError, match="1 timestamps for 2 items"):
        InteractionData("bad", 1, 2, good.offsets, good.items, good.timestamps[:1], good.item_raw_ids, good.user_raw_ids)


# ---- on-disk form ------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    data = make([[0, 1, 2], [2, 2], []], 3, text=["first", None, "third"])
    data.save(str(tmp_path / "d"))
    back = InteractionData.load(str(tmp_path / "d"))
    for f in ("offsets", "items", "timestamps"):
        assert np.array_equal(getattr(back, f), getattr(data, f)), f
    assert back.item_raw_ids.tolist() == data.item_raw_ids.tolist()
    assert back.user_raw_ids.tolist() == data.user_raw_ids.tolist()
    assert back.item_text == ["first", None, "third"] and back.fingerprint == data.fingerprint
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["pad_id"] == PAD_ID and meta["num_interactions"] == 5
    # the split is a pure function of the sequences: identical after the round trip
    a, b = LeaveOneOutSplit.of(data), LeaveOneOutSplit.of(back)
    assert np.array_equal(a.train_items, b.train_items) and np.array_equal(a.test_target, b.test_target)


def test_ml_small_round_trip(ml_small, tmp_path):
    ml_small.save(str(tmp_path / "ml"))
    back = InteractionData.load(str(tmp_path / "ml"))
    assert np.array_equal(back.items, ml_small.items) and back.item_text == ml_small.item_text
    assert back.stats() == ml_small.stats()


@pytest.fixture
def saved(tmp_path):
    make([[0, 1, 2], [1]], 3).save(str(tmp_path / "d"))
    return tmp_path / "d"


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_load_errors(saved, tmp_path):
    with pytest.raises(DatasetFormatError, match="no meta.json"):
        InteractionData.load(str(tmp_path))
    _edit_meta(saved, version=99)
    with pytest.raises(DatasetFormatError, match="version 99, expected 'prmkd-dist/dataset' version 1"):
        InteractionData.load(str(saved))
    _edit_meta(saved, version=1, item_fingerprint="0" * 16)
    with pytest.raises(DatasetFormatError, match="item_fingerprint does not match"):
        InteractionData.load(str(saved))


def test_load_rejects_edited_tables(saved):
    meta = json.loads((saved / "meta.json").read_text())
    _edit_meta(saved, num_interactions=meta["num_interactions"] + 1)
    with pytest.raises(DatasetFormatError, match="num_interactions 5 != 4"):
        InteractionData.load(str(saved))
    items = pq.read_table(saved / "items.parquet")
    shuffled = items.set_column(0, "item_id", pa.array([0, 2, 1], pa.int64()))
    pq.write_table(shuffled, saved / "items.parquet")
    with pytest.raises(DatasetFormatError, match=r"items\.parquet: column item_id must be 0\.\.2 in row order"):
        InteractionData.load(str(saved))
