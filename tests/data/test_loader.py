"""Streaming loader: content, rank x worker partitioning, lockstep, determinism, exact resume, bad input."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from shard_fixtures import FINGERPRINT, NUM_ITEMS, make_meta, replace_column, rewrite_part, write_examples  # noqa: E402

from prmkd_dist.data.loader import LoaderStateError, ShardLoader, TeacherShardDataset
from prmkd_dist.data.shards import BadRowError, FingerprintMismatchError, IncompleteShardError, TeacherMismatchError

N = 1003  # not a multiple of anything used below, so remainders are exercised


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    ex = write_examples(root, N, rows_per_row_group=50, rows_per_file=300)
    return str(root), ex


def _keys(batches) -> np.ndarray:
    return np.concatenate([b["example_key"].numpy() for b in batches]) if batches else np.zeros(0, np.int64)


def test_batches_hold_the_written_examples(shards):
    root, ex = shards
    ds = TeacherShardDataset(root, 64, max_len=6, shuffle=False)
    batches = list(ds)
    assert ds.teacher_names == ("sasrec", "llm") and len(batches) == ds.num_batches() == 16
    b = {k: torch.cat([x[k] for x in batches]).numpy() for k in batches[0] if k != "info"}
    np.testing.assert_array_equal(b["example_key"], ex["example_key"])
    np.testing.assert_array_equal(b["target"], ex["target"])
    np.testing.assert_array_equal(b["domain_id"], ex["domain_id"])
    off, vals = ex["history"]
    for i in (0, 1, 2, 500, N - 1):
        h = vals[off[i] : off[i + 1]][-6:]
        want = np.concatenate([np.full(6 - len(h), -1), h])
        np.testing.assert_array_equal(b["history"][i], want)
    assert b["teacher_ids"].shape == (N, 2, 8) and b["teacher_scores"].dtype == np.float32
    for t, name in enumerate(ds.teacher_names):
        ids, sc = ex["teachers"][name]
        k = ids.shape[1]
        np.testing.assert_array_equal(b["teacher_ids"][:, t, :k], ids)
        np.testing.assert_array_equal(b["teacher_scores"][:, t, :k], np.where(ids >= 0, sc, 0.0))
        assert (b["teacher_ids"][:, t, k:] == -1).all() and (b["teacher_scores"][:, t, k:] == 0).all()


def test_two_ranks_two_workers_read_every_example_once(shards):
    root, _ = shards
    seen, counts = [], []
    for rank in range(2):
        ds = TeacherShardDataset(root, 32, rank=rank, world_size=2, seed=3, shuffle_buffer_rows=120)
        loader = ShardLoader(ds, num_workers=2)
        batches = list(loader)
        counts.append(len(batches))
        seen.append(_keys(batches))
        acc = ds.epoch_accounting(num_workers=2)
        assert len(batches) == len(loader) == acc["batches_per_rank"] == sum(acc["batches_per_worker"])
        assert len(seen[-1]) == acc["rows_per_rank"] == N // 2
        assert acc["rows_unassigned"] == 1 and acc["rows_dropped_last_partial"] == 0
    assert counts[0] == counts[1]  # lockstep
    allk = np.concatenate(seen)
    assert len(np.unique(allk)) == len(allk) == N - 1
    # the one unassigned row is counted and changes with the epoch
    missing = [int(np.setdiff1d(np.arange(N), allk)[0])]
    ds = TeacherShardDataset(root, 32, rank=0, world_size=2, seed=3, shuffle_buffer_rows=120)
    ds1 = TeacherShardDataset(root, 32, rank=1, world_size=2, seed=3, shuffle_buffer_rows=120)
    for e in (1, 2, 3):
        ds.set_epoch(e)
        ds1.set_epoch(e)
        missing.append(int(np.setdiff1d(np.arange(N), np.concatenate([_keys(list(ds)), _keys(list(ds1))]))[0]))
    assert len(set(missing)) > 1


def test_drop_last_is_counted(shards):
    root, _ = shards
    ds = TeacherShardDataset(root, 100, drop_last=True, rank=1, world_size=3)
    batches = list(ds)
    acc = ds.epoch_accounting()
    assert len(batches) == 3 and all(len(b["example_key"]) == 100 for b in batches)
    assert acc["rows_unassigned"] == 1 and acc["rows_dropped_last_partial"] == 3 * 34


def test_order_depends_on_seed_and_epoch_only(shards):
    root, _ = shards
    a = TeacherShardDataset(root, 50, seed=7, shuffle_buffer_rows=200)
    b = TeacherShardDataset(root, 50, seed=7, shuffle_buffer_rows=200)
    e0 = _keys(list(a))
    np.testing.assert_array_equal(e0, _keys(list(b)))
    a.set_epoch(1)
    e1 = _keys(list(a))
    assert not np.array_equal(e0, e1) and np.array_equal(np.sort(e0), np.sort(e1))
    # rows are mixed across row groups (a shuffle window spans 4 row groups of 50 rows)
    assert len(np.unique(e0[:50] // 50)) > 1
    b.set_epoch(1)
    np.testing.assert_array_equal(e1, _keys(list(b)))
    c = TeacherShardDataset(root, 50, seed=8, shuffle_buffer_rows=200)
    assert not np.array_equal(e0, _keys(list(c)))


@pytest.mark.parametrize("stop_after", [0, 3, 7, 20])
def test_resume_without_workers_reproduces_the_rest_exactly(shards, stop_after):
    root, _ = shards
    kw = dict(seed=1, shuffle_buffer_rows=130, rank=1, world_size=2)
    ds = TeacherShardDataset(root, 24, **kw)
    ds.set_epoch(2)
    full = list(ds)
    ds.set_epoch(2)
    it = iter(ds)
    head = [next(it) for _ in range(stop_after)]
    state = ds.state_dict()
    it.close()
    fresh = TeacherShardDataset(root, 24, **kw)
    fresh.load_state_dict(state)
    rest = list(fresh)
    np.testing.assert_array_equal(_keys(head + rest), _keys(full))
    for x, y in zip(rest, full[stop_after:]):
        assert torch.equal(x["teacher_scores"], y["teacher_scores"]) and torch.equal(x["history"], y["history"])


def test_resume_with_workers_reproduces_the_rest_exactly(shards):
    root, _ = shards
    kw = dict(seed=5, shuffle_buffer_rows=100)
    loader = ShardLoader(TeacherShardDataset(root, 40, **kw), num_workers=2)
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1)
    it = iter(loader)
    head = [next(it) for _ in range(5)]  # the workers have prefetched further; that must not matter
    state = loader.state_dict()
    del it
    assert state["batches_done"] == 5 and state["epoch"] == 1
    again = ShardLoader(TeacherShardDataset(root, 40, **kw), num_workers=2)
    again.load_state_dict(state)
    rest = list(again)
    np.testing.assert_array_equal(_keys(head + rest), _keys(full))
    # a state is tied to its worker layout
    other = ShardLoader(TeacherShardDataset(root, 40, **kw), num_workers=0)
    other.load_state_dict(state)
    with pytest.raises(LoaderStateError, match="worker stream"):
        list(other)
    with pytest.raises(LoaderStateError, match="batch_size"):
        TeacherShardDataset(root, 41, **kw).load_state_dict(state)


def _copy(root, dst) -> str:
    shutil.copytree(root, dst)
    return str(dst)


@pytest.mark.parametrize("assembly", ["cpp", "numpy"])
def test_bad_input_raises_naming_file_column_row(shards, tmp_path, assembly):
    root, _ = shards
    with pytest.raises(FingerprintMismatchError):
        TeacherShardDataset(root, 8, item_fingerprint="deadbeefdeadbeef")
    with pytest.raises(FingerprintMismatchError):
        TeacherShardDataset(root, 8, num_items=NUM_ITEMS - 1)
    assert TeacherShardDataset(root, 8, item_fingerprint=FINGERPRINT, num_items=NUM_ITEMS).num_rows == N

    cases = {
        "ids": ("teacher.sasrec.ids", lambda v: [NUM_ITEMS + 1] + v[1:], r"item id outside"),
        "nan": ("teacher.sasrec.scores", lambda v: [float("nan")] + v[1:], r"NaN or infinite"),
        "wide": ("teacher.llm.ids", lambda v: v + [0] * 6, r"more than the declared K=5"),
        "negative": ("teacher.llm.ids", lambda v: v[:-1] + [-3], r"item id outside"),
        "unsorted": ("teacher.sasrec.scores", lambda v: [v[1], v[0]] + v[2:] if v[1] < v[0] else [v[0], v[0] + 1.0] + v[2:],
                     r"not sorted descending"),
        "inf": ("teacher.llm.scores", lambda v: v[:-1] + [float("-inf")], r"NaN or infinite"),
        "history": ("history", lambda v: v[:-1] + [NUM_ITEMS], r"item id outside"),
    }
    for name, (col, edit, msg) in cases.items():
        bad = _copy(root, tmp_path / name)
        part = os.path.join(bad, "part-00002.parquet")

        def mutate(tab, col=col, edit=edit):
            vals = tab.column(col).to_pylist()
            r = next(i for i in range(77, len(vals)) if vals[i])
            vals[r] = edit(vals[r])
            if name == "wide":  # keep scores the same length as ids so only K is violated
                sc = tab.column("teacher.llm.scores").to_pylist()
                sc[r] = sc[r] + [-99.0] * 6
                tab = replace_column(tab, "teacher.llm.scores", sc)
            mutate.row = r
            return replace_column(tab, col, vals)

        rewrite_part(part, mutate)
        with pytest.raises(BadRowError) as info:
            list(TeacherShardDataset(bad, 64, shuffle=False, assembly=assembly))
        assert (info.value.file, info.value.column, info.value.row) == (part, col, mutate.row), name
        assert info.match(msg)
        # skip mode: the bad row is dropped from its batch, counted, and the batch count is unchanged
        ds = TeacherShardDataset(bad, 64, shuffle=False, on_bad_rows="skip", assembly=assembly)
        batches = list(ds)
        assert len(batches) == ds.num_batches() and ds.counters["bad_rows_skipped"] == 1
        assert len(_keys(batches)) == N - 1 and 600 + mutate.row not in set(_keys(batches).tolist())

    # teachers differing between files
    mixed = _copy(root, tmp_path / "mixed")
    other = tmp_path / "other"
    write_examples(other, 400, make_meta((("sasrec", 8, "logit"), ("llm", 5, "log_prob"))), rows_per_row_group=50, rows_per_file=300)
    shutil.copy(other / "part-00001.parquet", os.path.join(mixed, "part-00003.parquet"))
    with pytest.raises(TeacherMismatchError, match="part-00003.parquet"):
        TeacherShardDataset(mixed, 8)

    # a corrupt row group inside an otherwise intact file
    corrupt = _copy(root, tmp_path / "corrupt")
    path = os.path.join(corrupt, "part-00001.parquet")
    data = bytearray(open(path, "rb").read())
    data[200:6000] = os.urandom(5800)
    open(path, "wb").write(bytes(data))
    with pytest.raises(IncompleteShardError, match="part-00001.parquet"):
        list(TeacherShardDataset(corrupt, 64, shuffle=False))


def test_skip_mode_counts_through_workers(shards, tmp_path):
    root, _ = shards
    bad = _copy(root, tmp_path / "bad")
    rewrite_part(os.path.join(bad, "part-00000.parquet"),
                 lambda t: replace_column(t, "target", np.where(np.arange(len(t)) % 100 == 5, NUM_ITEMS, t.column("target").to_numpy())))
    loader = ShardLoader(TeacherShardDataset(bad, 50, on_bad_rows="skip"), num_workers=2)
    assert len(_keys(list(loader))) == N - 3 and loader.counters["bad_rows_skipped"] == 3
    assert loader.state_dict()["counters"]["bad_rows_skipped"] == 3


def _dist_worker(rank: int, world: int, root: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = TeacherShardDataset(root, 30, seed=11, shuffle_buffer_rows=90)  # rank/world from torch.distributed
        assert (ds.rank, ds.world_size) == (rank, world)
        keys = _keys(list(ShardLoader(ds, num_workers=1)))
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([ds.num_batches()]))
        gathered = [None] * world
        dist.all_gather_object(gathered, keys.tolist())
        if rank == 0:
            np.save(out, np.array([c.item() for c in counts]))
            np.save(out + ".keys.npy", np.concatenate([np.asarray(g) for g in gathered]))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_real_processes_lockstep(shards, tmp_path):
    root, _ = shards
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "counts.npy")
    # fork: the children inherit the imported modules instead of re-importing torch (seconds each)
    mp.start_processes(_dist_worker, args=(2, root, port, out), nprocs=2, join=True, start_method="fork")
    counts = np.load(out)
    keys = np.load(out + ".keys.npy")
    assert counts[0] == counts[1] == -(-(N // 2) // 30)
    assert len(keys) == len(np.unique(keys)) == 2 * (N // 2)


def _check_content(batches, ex, max_len: int) -> np.ndarray:
    """Every row of every batch holds exactly the written example of its key; returns the keys."""
    keys = _keys(batches)
    b = {k: torch.cat([x[k] for x in batches]).numpy() for k in ("target", "history", "teacher_ids", "teacher_scores")}
    np.testing.assert_array_equal(b["target"], ex["target"][keys])
    off, vals = ex["history"]
    want = np.full((len(keys), max_len), -1)
    for r, key in enumerate(keys):  # test-side reference: a plain per-row loop
        h = vals[off[key] : off[key + 1]][-max_len:]
        want[r, max_len - len(h):] = h
    np.testing.assert_array_equal(b["history"], want)
    for t, (ids, sc) in enumerate(ex["teachers"].values()):
        k = ids.shape[1]
        np.testing.assert_array_equal(b["teacher_ids"][:, t, :k], ids[keys])
        np.testing.assert_array_equal(b["teacher_scores"][:, t, :k], np.where(ids[keys] >= 0, sc[keys], 0.0))
        assert (b["teacher_ids"][:, t, k:] == -1).all() and (b["teacher_scores"][:, t, k:] == 0).all()
    return keys


def _count_window_allocations(monkeypatch) -> list:
    from prmkd_dist.data import loader as loader_mod

    calls = []
    original = loader_mod._WindowPool._new

    def counted(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(loader_mod._WindowPool, "_new", counted)
    return calls


@pytest.mark.parametrize("max_len", [6, 20])  # truncated histories, and the in-place (no truncation) path
def test_window_memory_is_reused_only_once_batches_are_gone(shards, monkeypatch, max_len):
    root, ex = shards
    calls = _count_window_allocations(monkeypatch)
    kw = dict(max_len=max_len, seed=2, shuffle_buffer_rows=48)  # 21 windows of 48 rows
    ds = TeacherShardDataset(root, 16, **kw)
    copies = [{k: v.clone() for k, v in b.items() if k != "info"} for b in ds]  # batches dropped at once
    assert len(calls) <= ds.prefetch_windows + 3  # the buffers went round
    del calls[:]
    held = list(TeacherShardDataset(root, 16, **kw))  # every batch kept: no buffer may be overwritten
    assert len(calls) >= 21
    assert len(np.unique(_check_content(held, ex, max_len))) == N
    for x, y in zip(held, copies):
        for k in y:
            assert torch.equal(x[k], y[k]), k
    # a single live view (one tensor of a one-batch window) must keep its buffer out of reuse too
    one = [b["teacher_ids"] for b in TeacherShardDataset(root, 48, **kw)]
    want = [b["teacher_ids"].clone() for b in TeacherShardDataset(root, 48, **kw)]
    assert len(one) == 21 and all(torch.equal(x, y) for x, y in zip(one, want))


def test_workers_reuse_shared_windows_exactly(shards, monkeypatch):
    """Workers recycle their shared windows as ShardLoader releases batches; content, exact-once over
    2 ranks x 2 workers, and resume stay exact while the buffers go round many times."""
    root, ex = shards
    kw = dict(max_len=20, seed=4, shuffle_buffer_rows=40)
    seen = []
    for rank in range(2):
        loader = ShardLoader(TeacherShardDataset(root, 20, rank=rank, world_size=2, **kw), num_workers=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.append(_check_content(batches, ex, 20))
    allk = np.concatenate(seen)
    assert len(allk) == len(np.unique(allk)) == N - 1
    loader = ShardLoader(TeacherShardDataset(root, 20, **kw), num_workers=2)
    full = list(loader)
    it = iter(loader)
    head = [next(it) for _ in range(9)]
    state = loader.state_dict()
    del it
    again = ShardLoader(TeacherShardDataset(root, 20, **kw), num_workers=2)
    again.load_state_dict(state)
    rest = list(again)
    assert len(head) + len(rest) == len(full)
    for x, y in zip(head + rest, full):
        for k in y:
            assert torch.equal(x[k], y[k]), k


def test_worker_batches_are_views_released_once_dropped(shards):
    """With workers, ShardLoader hands batches out as views of the workers' shared windows (no copy):
    a consumer that drops each batch lets the workers recycle a few windows; one that keeps every batch
    (or one tensor derived from it) gets intact batches, the workers taking fresh windows instead of
    overwriting held ones (and never waiting for a release that cannot come)."""
    root, ex = shards
    kw = dict(max_len=20, seed=8, shuffle_buffer_rows=40)  # 2 batches per window; 13 windows per stream
    dropping = ShardLoader(TeacherShardDataset(root, 20, **kw), num_workers=2)
    copies = [{k: v.clone() for k, v in b.items()} for b in dropping]  # each batch dropped after its copy
    ds = dropping.dataset
    assert dropping.stats["batches_own_memory"] == 0  # every batch came as a view of a pooled window
    assert 2 <= dropping.stats["windows_mapped"] <= 2 * (ds.prefetch_windows + 3) < 26  # windows went round
    keeping = ShardLoader(TeacherShardDataset(root, 20, **kw), num_workers=2)
    held = [(b["teacher_ids"][:, 0], b["history"][1:]) for b in keeping]  # derived views keep windows too
    assert keeping.stats["batches_own_memory"] > 0  # fresh unpooled windows once the pool was held
    assert len(np.unique(_check_content(copies, ex, 20))) == N  # every example once, content exact
    assert len(held) == len(copies)
    for y, z in zip(copies, held):
        assert torch.equal(z[0], y["teacher_ids"][:, 0]) and torch.equal(z[1], y["history"][1:])


def test_scatter_right_aligned_matches_pad_ragged():
    from prmkd_dist.data.dataset import pad_ragged
    from prmkd_dist.data.loader import _scatter_right_aligned

    rng = np.random.default_rng(0)
    for max_list in (5, 9):  # with width 7: no list truncated, then some truncated
        lengths = rng.integers(0, max_list + 1, 300)
        lengths[:3] = 0  # empty lists, also at the start
        offsets = np.concatenate([[0], np.cumsum(lengths)]) + 4  # absolute offsets into a larger buffer
        values = rng.integers(0, 1000, int(offsets[-1]) + 3)
        rows = rng.permutation(400)[:300]
        out = np.full((400, 7), -1, dtype=np.int64)
        _scatter_right_aligned(out, rows, offsets, values, {})
        want = np.full((400, 7), -1, dtype=np.int64)
        want[rows] = pad_ragged(offsets, values, 7, -1, np.int64, "last")
        np.testing.assert_array_equal(out, want)


def test_worker_windows_without_the_packed_channel(shards):
    """A plain DataLoader (no release channel: fresh shared windows) and ShardLoader(pin_memory=True)
    (release channel, batches as tensor views, copied out unless pinned) deliver the same content."""
    from torch.utils.data import DataLoader

    root, ex = shards
    kw = dict(max_len=20, seed=6, shuffle_buffer_rows=40)
    plain = [{k: v for k, v in b.items() if k != "info"}
             for b in DataLoader(TeacherShardDataset(root, 20, **kw), batch_size=None, num_workers=2)]
    assert len(np.unique(_check_content(plain, ex, 20))) == N
    with pytest.warns(UserWarning):  # no accelerator here: the DataLoader pins nothing
        pinned = list(ShardLoader(TeacherShardDataset(root, 20, **kw), num_workers=2, pin_memory=True))
    assert len(pinned) == len(plain)
    for x, y in zip(pinned, plain):
        for k in y:
            assert torch.equal(x[k], y[k]), k
