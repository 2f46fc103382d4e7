"""The loader's C++ window assembly (csrc/shard_rows.cpp) against its numpy reference (the numpy path of
prmkd_dist.data.loader and the checks of data/shards.py): same windows, same problems, same errors."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (loads libtorch before the extension)

sys.path.insert(0, str(Path(__file__).parent))
from shard_fixtures import NUM_ITEMS, make_meta, replace_column, rewrite_part, write_examples  # noqa: E402

from prmkd_dist import _C
from prmkd_dist.data.dataset import pad_ragged
from prmkd_dist.data.loader import ShardLoader, TeacherShardDataset
from prmkd_dist.data.shards import check_id_lists


def _ragged(rng, n: int, k: int, num_items: int, offset_dtype):
    """n random lists of 0..k+2 entries (some longer than k), sorted descending scores, offsets absolute
    into buffers with a few leading entries that belong to no row."""
    lengths = rng.integers(0, k + 3, n)
    lengths[: n // 2] = k
    lead = 3
    offsets = (np.concatenate([[0], np.cumsum(lengths)]) + lead).astype(offset_dtype)
    total = int(offsets[-1])
    ids = rng.integers(0, num_items, total)
    scores = -np.sort(-rng.normal(size=total).astype(np.float32))  # descending within every list too
    return offsets, ids, scores


@pytest.mark.parametrize("offset_dtype", [np.int32, np.int64])
def test_teacher_rows_match_the_numpy_reference(offset_dtype):
    rng = np.random.default_rng(0)
    n, S, T, K, C = 300, 420, 3, 9, 1000
    ks = [9, 4, 7]
    lists, want_bad = [], []
    for t, k in enumerate(ks):
        off, ids, sc = _ragged(rng, n, k, C, offset_dtype)
        rows = rng.choice(n, 12, replace=False)  # plant every problem, a few rows each
        for j, r in enumerate(rows):
            a, b = int(off[r]), int(off[r + 1])
            if b == a:
                continue
            kind = j % 4
            if kind == 0:
                ids[a] = C + j if j % 8 else -1 - j
            elif kind == 1:
                sc[b - 1] = [np.nan, np.inf, -np.inf][j % 3]
            elif kind == 2 and b - a > 1:
                sc[a + 1] = sc[a] + 1.0
        found = check_id_lists(off, ids, C, sc[int(off[0]) : int(off[-1])], k, check_sorted=True, check_duplicates=False)
        want_bad.append(found)
        lists.append((off, ids, off.copy(), sc, k))
    dest = rng.permutation(S)[:n]
    win_ids = np.full((S, T, K), 77, np.int64)  # sentinels: slots beyond a teacher's k must stay untouched
    win_sc = np.full((S, T, K), 7.0, np.float32)
    bits = _C.teacher_rows_into(win_ids, win_sc, dest, lists, C, True)
    assert bits.shape == (n, T) and bits.dtype == np.uint8
    names = {1: "item id outside [0, 1000)", 4: "score is NaN or infinite", 8: "scores not sorted descending"}
    for t, (off, ids, _, sc, k) in enumerate(lists):
        np.testing.assert_array_equal(win_ids[dest, t, :k], pad_ragged(off, ids, k, -1, np.int64, "first"))
        np.testing.assert_array_equal(win_sc[dest, t, :k], pad_ragged(off, sc, k, 0.0, np.float32, "first"))
        assert (win_ids[dest, t, k:] == 77).all() and (win_sc[dest, t, k:] == 7.0).all()
        got = {p: (bits[:, t] & bit) != 0 for bit, p in names.items()}
        got[f"more than the declared K={k} entries"] = (bits[:, t] & 2) != 0
        for p, m in got.items():
            np.testing.assert_array_equal(m, want_bad[t].get(p, np.zeros(n, bool)), err_msg=f"teacher {t}: {p}")
        assert all(got[p].any() for p in want_bad[t])  # each planted problem was found
    other = np.setdiff1d(np.arange(S), dest)
    assert (win_ids[other] == 77).all() and (win_sc[other] == 7.0).all()  # rows not in dest untouched


def test_history_rows_match_the_numpy_reference():
    rng = np.random.default_rng(1)
    n, S, L, C = 250, 300, 6, 50
    off, vals, _ = _ragged(rng, n, 8, C, np.int32)  # lists up to 10 long: some keep their last 6 only
    vals[int(off[7])] = C  # an id outside, at a row's first item: dropped by truncation when long, still found
    dest = rng.permutation(S)[:n]
    out = np.full((S, L), 9, np.int64)
    bits = _C.history_rows_into(out, dest, off, vals, C)
    np.testing.assert_array_equal(out[dest], pad_ragged(off, vals, L, -1, np.int64, "last"))
    want = check_id_lists(off, vals, C, check_duplicates=False)[f"item id outside [0, {C})"]
    np.testing.assert_array_equal(bits != 0, want)
    assert bits[7] == 1


def test_malformed_buffers_raise_instead_of_reading_out_of_bounds():
    out = np.zeros((4, 3), np.int64)
    vals = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match="not rising offsets into 5 values"):
        _C.history_rows_into(out, np.array([0, 1]), np.array([0, 3, 9], np.int32), vals, 10)
    with pytest.raises(ValueError, match="dest row 4 outside the window of 4 rows"):
        _C.history_rows_into(out, np.array([0, 4]), np.array([0, 2, 5], np.int32), vals, 10)
    with pytest.raises(ValueError, match="expected 8-byte integers"):
        _C.history_rows_into(out, np.array([0, 1]), np.array([0, 2, 5], np.int32), vals.astype(np.float64), 10)
    ids, sc = np.zeros((4, 1, 3), np.int64), np.zeros((4, 1, 3), np.float32)
    lists = [(np.array([0, 2], np.int32), vals, np.array([0, 2], np.int32), np.zeros(5, np.float32), 5)]
    with pytest.raises(ValueError, match="k=5, the window K=3"):
        _C.teacher_rows_into(ids, sc, np.array([1]), lists, 10, True)


def test_both_assemblies_give_the_same_batches_and_counts(tmp_path):
    """Whole loader, shuffled windows across row groups, ragged teachers, bad rows in skip mode: the C++
    assembly and the numpy reference yield identical batches and identical skip counts."""
    meta = make_meta((("a", 8, "logit"), ("b", 3, "logit"), ("c", 5, "logit")))
    write_examples(tmp_path, 611, meta, rows_per_row_group=40, rows_per_file=200)
    part = str(tmp_path / "part-00001.parquet")

    def plant(tab):
        ids = tab.column("teacher.b.ids").to_pylist()
        hist = tab.column("history").to_pylist()
        for r in (3, 50, 51):
            if ids[r]:
                ids[r][0] = NUM_ITEMS
        for r in (10, 120):
            hist[r] = hist[r] + [-5]
        return replace_column(replace_column(tab, "teacher.b.ids", ids), "history", hist)

    rewrite_part(part, plant)
    runs = {}
    for assembly in ("cpp", "numpy"):
        ds = TeacherShardDataset(str(tmp_path), 32, max_len=7, seed=3, shuffle_buffer_rows=100, on_bad_rows="skip",
                                 assembly=assembly)
        runs[assembly] = ([{k: v for k, v in b.items() if k != "info"} for b in ds], ds.counters["bad_rows_skipped"])
    (cpp, n_cpp), (ref, n_ref) = runs["cpp"], runs["numpy"]
    assert n_cpp == n_ref >= 4 and len(cpp) == len(ref)
    for x, y in zip(cpp, ref):
        for k in y:
            assert torch.equal(x[k], y[k]), k
    # and through workers (views of shared windows)
    loader = ShardLoader(TeacherShardDataset(str(tmp_path), 32, max_len=7, seed=3, shuffle_buffer_rows=100,
                                             on_bad_rows="skip"), num_workers=2)
    keys = np.concatenate([b["example_key"].numpy() for b in loader])
    assert len(keys) == len(np.unique(keys)) == 611 - n_cpp
