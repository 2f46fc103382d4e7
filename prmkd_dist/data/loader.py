"""Streaming loader of teacher-score shards: ``TeacherShardDataset`` (a torch IterableDataset that yields
ready, collated batches) and ``ShardLoader`` (a DataLoader wrapper that tracks what was consumed so a
run resumes mid-epoch exactly). Depends on numpy/pyarrow/torch only; see docs/shards.md "Loader".

Epoch plan (a pure function of the shard footers, seed, epoch, rank/world, workers and batch size):
1. The row groups of all files are permuted by (seed, epoch) and concatenated into one global row
   sequence of N rows.
2. Rank r reads rows [r*n, (r+1)*n) of it with n = N // world: every rank gets the same number of
   rows, hence the same number of batches (lockstep). The N % world rows left over are not read this
   epoch; they are counted (``epoch_accounting()["rows_unassigned"]``) and, as the order changes each
   epoch, different rows are left over each time. Row groups on a range boundary are read by both ranks.
3. A rank's rows are cut into contiguous blocks of whole batches (ceil(n / B) batches, or floor with
   drop_last, the partial rows then counted), one block ("stream") per DataLoader worker; the
   DataLoader's round robin makes rank batch j = stream j % W's batch j // W, so a resume state is a
   single number: the batches consumed in the epoch.
4. A worker shuffles its rows within windows of ``shuffle_buffer_rows`` consecutive rows (spanning
   several row groups), permuted by (seed, epoch, window start), and cuts batches of B rows.
A background thread reads and decodes the next windows while batches are consumed.
"""
from __future__ import annotations

import collections
import math
import queue
import sys
import threading
import time
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import pad_ragged
from prmkd_dist.data.shards import (
    EXAMPLE_COLUMNS,
    IncompleteShardError,
    ShardSet,
    check_example_table,
    list_parts,
    raise_first,
)

try:  # the C++ window assembly (csrc/shard_rows.cpp); the numpy path below is its reference
    from prmkd_dist import _C as _shard_rows
except ImportError:  # the loader stays usable without the extension, on the numpy path
    _shard_rows = None

STATE_FORMAT = "prmkd-dist/loader-state"
STATE_VERSION = 1
BAD_ROW_POLICIES = ("raise", "skip")
TENSOR_KEYS = ("example_key", "user_id", "domain_id", "history", "target", "teacher_ids", "teacher_scores")


class LoaderStateError(ValueError):
    """A loader state does not fit this dataset/configuration."""


def _cat(parts: list):
    return torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)


def _as_rows(a: np.ndarray) -> np.ndarray:
    """[m, k] array with a contiguous last axis -> [m] of k-item opaque records: a fancy-indexed row
    copy then moves one record per row instead of running numpy's inner loop over k items."""
    return a.view(np.dtype((np.void, a.shape[1] * a.itemsize)))[:, 0]


class _WindowPool:
    """Memory for shuffle windows, reused from window to window. A fresh window of tens of MB costs
    a page fault per 4 KiB page (the kernel zero-fills each one) and, in a DataLoader worker, new
    shared memory as well: that cost was about as large as copying the data in. A buffer is reused
    only once nothing points into it any more:
    - in-process, batches are numpy/torch views of the buffer, so its CPython reference count says
      whether a batch (or any view of one) is still alive;
    - in a worker, batches cross into the main process as views of the window (see ``_pack``), and
      ShardLoader tells through ``release`` (a shared counter per stream) how many of the stream's
      batches its consumer has dropped. A worker that finds every pooled window still held waits up
      to ``grace_s`` for a release, then takes a fresh, unpooled window (a consumer may keep batches).
      Without that channel (a plain DataLoader) every window gets new shared memory.
    """

    def __init__(self, layout: dict, rows: int, max_buffers: int, shared: bool,
                 release: torch.Tensor | None, stream: int):
        self.layout, self.rows, self.max_buffers = layout, rows, max_buffers
        self.shared, self.release, self.stream = shared, release, stream
        self.stop = threading.Event()  # replaced by the reading thread's own
        self.pool: list[dict] = []
        self.pooled_storages: set[int] = set()  # data_ptr of the pooled shared blocks
        self.sent: set[int] = set()  # pooled blocks already handed to the main process once
        self.allocated = 0  # buffers allocated (for tests and diagnostics)
        # how long a worker waits for the main process to release a pooled buffer before it takes a
        # fresh one instead (so a consumer that keeps batches can never deadlock the worker)
        self.grace_s = 0.1

    def _allocate(self) -> dict:
        offsets, total = {}, 0
        for key, (shape, dtype, _) in self.layout.items():
            offsets[key] = total
            nbytes = self.rows * math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            total += -(-nbytes // 64) * 64  # 64-byte aligned sub-arrays
        total = max(total, 64)
        if self.shared:  # one shared-memory block, carved into typed tensors
            storage = torch.UntypedStorage._new_shared(total)  # (share_memory_() would copy garbage)
            block = torch.empty(0, dtype=torch.uint8).set_(storage)
            tensors = {}
            for key, (shape, dtype, _) in self.layout.items():
                item = torch.empty(0, dtype=dtype).element_size()
                tensors[key] = torch.empty(0, dtype=dtype).set_(storage, offsets[key] // item, (self.rows, *shape))
            arrays = {k: t.numpy() for k, t in tensors.items()}
            base = block
        else:  # one block; every view of a carved array has ``base`` as its numpy base
            base = np.empty(total, np.uint8)
            arrays = {}
            for key, (shape, dtype, _) in self.layout.items():
                npdt = torch.empty(0, dtype=dtype).numpy().dtype
                nbytes = self.rows * math.prod(shape) * npdt.itemsize
                arrays[key] = base[offsets[key] : offsets[key] + nbytes].view(npdt).reshape(self.rows, *shape)
            tensors = None
        self.allocated += 1
        return {"arrays": arrays, "tensors": tensors, "base": base, "release_at": 0}

    def _new(self) -> dict:
        buf = self._allocate()
        # the pool's own references (the carved arrays) are the baseline of "nothing else points here";
        # measured here, where no local variable of _allocate holds the block any more
        buf["base_refs"] = self._refs(buf)
        return buf

    @staticmethod
    def _refs(buf: dict) -> int:
        return sys.getrefcount(buf["base"])

    def _is_free(self, buf: dict) -> bool:
        if self.release is not None:
            return int(self.release[self.stream]) >= buf["release_at"]
        return self._refs(buf) <= buf["base_refs"]

    def acquire(self, n: int, release_at: int) -> tuple[dict, dict] | None:
        """(numpy arrays [n, ...] to fill, what the window yields: the same memory, as tensors in a
        worker), or None once ``stop`` is set. ``release_at``: the stream's count of released
        batches from which the buffer may be reused (release channel only)."""
        waited_since = time.perf_counter()
        while True:
            buf = next((b for b in self.pool if self._is_free(b)), None)
            if buf is None and len(self.pool) < self.max_buffers:
                buf = self._new()
                self.pool.append(buf)
                if buf["tensors"] is not None:
                    self.pooled_storages.add(buf["base"].untyped_storage().data_ptr())
            if buf is None and (self.release is None or time.perf_counter() - waited_since > self.grace_s):
                # every pooled buffer still holds live batches (the consumer keeps them, or releases
                # them later than ``grace_s``): one more buffer, not pooled, freed with its batches
                buf = self._new()
            if buf is not None:
                break
            if self.stop.is_set():
                return None
            time.sleep(0.0005)  # the main process releases batches once the consumer has dropped them
        buf["release_at"] = release_at
        arrays = {k: v[:n] for k, v in buf["arrays"].items()}
        out = {k: v[:n] for k, v in buf["tensors"].items()} if buf["tensors"] is not None else dict(arrays)
        for key, (_, _, fill) in self.layout.items():
            if fill is not None:
                arrays[key].fill(fill)
        arrays["bad"] = out["bad"] = np.empty(n, bool)
        return arrays, out


def _row_problems(info, num_items: int) -> tuple:
    """(bit, column, problem) of the C++ assembly's problem bits (csrc/shard_rows.cpp), named as the
    numpy checks name them (data/shards.py check_id_lists); a length mismatch first, as there."""
    return ((16, info.scores_column, f"length differs from {info.ids_column}"),
            (1, info.ids_column, f"item id outside [0, {num_items})"),
            (2, info.ids_column, f"more than the declared K={info.k} entries"),
            (4, info.scores_column, "score is NaN or infinite"),
            (8, info.scores_column, "scores not sorted descending"))


def _pack(out: dict, pool: _WindowPool) -> dict:
    """A worker's batch whose tensors are all views of one pooled shared window, sent as offsets into
    that window: each tensor would otherwise pass its own file descriptor (a connection to the
    worker's resource sharer) and be mapped anew by the main process. The window itself goes along
    only the first time; ShardLoader keeps it mapped (``_unpack``)."""
    ptr = out["teacher_ids"].untyped_storage().data_ptr()
    if ptr not in pool.pooled_storages or any(v.untyped_storage().data_ptr() != ptr for v in out.values()):
        return out  # a batch stitched from two windows, or with bad rows removed: its own memory
    block = None
    if ptr not in pool.sent:
        block = torch.empty(0, dtype=torch.uint8).set_(out["teacher_ids"].untyped_storage())
        pool.sent.add(ptr)
    views = {k: (v.dtype, v.storage_offset(), tuple(v.shape)) for k, v in out.items()}
    return {"_packed": {"window": ptr, "block": block, "views": views}}


class _MappedWindow:
    """A worker's pooled shared window as mapped in the main process. Batches are handed out as views
    of it (no copy); each view holds a reference to ``array`` (torch.from_numpy keeps its array, numpy
    views keep their base), so its CPython reference count says whether any batch, or any tensor
    derived from one without a copy, still points into the window."""

    def __init__(self, storage: torch.UntypedStorage):
        self.storage = storage
        self.array = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        self.baseline = sys.getrefcount(self.array)

    def view(self, dtype: torch.dtype, offset: int, shape: tuple) -> torch.Tensor:
        npdt = torch.empty(0, dtype=dtype).numpy().dtype
        start = offset * npdt.itemsize
        flat = self.array[start : start + math.prod(shape) * npdt.itemsize]
        return torch.from_numpy(flat.view(npdt).reshape(shape))

    def in_use(self) -> bool:
        return sys.getrefcount(self.array) > self.baseline


def _unpack(packed: dict, stream: int, windows: dict) -> tuple[dict, tuple]:
    """(the packed batch's tensors as views of the worker's window, the window's key in ``windows``).
    The window is mapped once, when its block first comes along."""
    key = (stream, packed["window"])
    if packed["block"] is not None:
        windows[key] = _MappedWindow(packed["block"].untyped_storage())
    win = windows[key]
    return {k: win.view(dt, off, shape) for k, (dt, off, shape) in packed["views"].items()}, key


def _scatter_right_aligned(out: np.ndarray, rows: np.ndarray, offsets: np.ndarray, values: np.ndarray,
                           scratch: dict) -> None:
    """Write ragged lists (``offsets`` [m+1] absolute into ``values``) into rows ``rows`` of ``out``
    [n, L] (already PAD-filled), right-aligned, keeping each list's last L items. One flat scatter
    straight into the window: no padded [m, L] intermediate and no per-row loop."""
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return
    L = out.shape[1]
    lengths = np.diff(offsets)
    ends = offsets[1:].astype(np.int64)
    vals = values[lo:hi]
    if lengths.max() > L:  # longer lists keep their last L items
        # value at flat position p of a list ending at e lands in column L - (e - p) of its row
        dest = np.repeat(rows * L + L - ends, lengths)
        dest += np.arange(lo, hi)
        keep = dest >= np.repeat(rows * L, lengths)
        out.reshape(-1)[dest[keep]] = vals[keep]
        return
    # dest[p] = p + shift[row of p]: steps of 1 inside a list, a jump at each list start, summed in
    # place in a reused buffer (np.repeat would allocate, and page-fault, a new array every call)
    nz = lengths > 0
    shift = (rows * L + L - ends)[nz]
    first = (offsets[:-1] - lo)[nz]
    if len(scratch.get("dest", ())) < hi - lo:
        scratch["dest"] = np.empty(int((hi - lo) * 1.25), np.int64)
    dest = scratch["dest"][: hi - lo]
    dest.fill(1)
    dest[first[1:]] += np.diff(shift)
    dest[0] = lo + shift[0]
    np.cumsum(dest, out=dest)
    out.reshape(-1)[dest] = vals


class TeacherShardDataset(IterableDataset):
    """Yields collated batches (dicts of tensors) from a shard directory; use with
    ``DataLoader(ds, batch_size=None)`` or, to resume mid-epoch with workers, ``ShardLoader``.

    Batch: example_key [B], user_id [B], domain_id [B], history [B, max_len] (left-padded with PAD_ID,
    most recent item right), target [B] (PAD_ID = none), teacher_ids [B, T, K] (PAD_ID on empty slots),
    teacher_scores [B, T, K] float32 (0.0 on empty slots), and ``info`` = {rank_batch (index in the rank's
    epoch), stream, epoch, skipped_bad_rows} (plain ints; ShardLoader pops it). T follows ``teacher_names``; K is the
    largest declared K.

    assembly: "auto" (C++ window assembly of prmkd_dist._C when built and check_duplicates is off, else
    numpy), "cpp" or "numpy" (the reference): how rows are checked and copied into shuffle windows.

    on_bad_rows: "raise" (default) raises BadRowError naming file/column/row; "skip" drops bad rows
    from their batch (which may then hold fewer than B rows, keeping the batch count in lockstep) and
    counts them in ``counters["bad_rows_skipped"]`` and in each batch's info.
    """

    def __init__(
        self,
        root: str,
        batch_size: int,
        *,
        max_len: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer_rows: int = 16384,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_items: int | None = None,
        item_fingerprint: str | None = None,
        on_bad_rows: str = "raise",
        prefetch_windows: int = 2,
        check_sorted: bool = True,
        check_duplicates: bool = False,
        assembly: str = "auto",
    ):
        super().__init__()
        if batch_size < 1 or max_len < 1 or shuffle_buffer_rows < 1 or prefetch_windows < 1:
            raise ValueError("batch_size, max_len, shuffle_buffer_rows and prefetch_windows must be >= 1")
        if on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"on_bad_rows={on_bad_rows!r}, expected one of {BAD_ROW_POLICIES}")
        self.shards = ShardSet.open(root, num_items=num_items, item_fingerprint=item_fingerprint)
        self.meta = self.shards.meta
        self.teacher_names: tuple[str, ...] = self.meta.teacher_names
        self.k = max((t.k for t in self.meta.teachers), default=0)
        self.batch_size, self.max_len = int(batch_size), int(max_len)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.shuffle_buffer_rows, self.prefetch_windows = int(shuffle_buffer_rows), int(prefetch_windows)
        self.on_bad_rows, self.check_sorted, self.check_duplicates = on_bad_rows, check_sorted, check_duplicates
        if assembly not in ("auto", "cpp", "numpy"):
            raise ValueError(f"assembly={assembly!r}, expected 'auto', 'cpp' or 'numpy'")
        if assembly == "cpp" and (_shard_rows is None or check_duplicates):
            raise ValueError("assembly='cpp' needs the built extension prmkd_dist._C and check_duplicates=False"
                             + ("" if _shard_rows is not None else " (the extension is not built: run `make install`)"))
        # the C++ path checks and copies the lists in one pass; duplicate checks exist on the numpy path only
        self.assembly = "cpp" if assembly == "cpp" or (assembly == "auto" and _shard_rows is not None
                                                        and not check_duplicates) else "numpy"
        if world_size is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist and rank is None else (rank or 0)
            world_size = torch.distributed.get_world_size() if dist and world_size is None else (world_size or 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.columns = list(EXAMPLE_COLUMNS)
        for t in self.meta.teachers:
            self.columns += [t.ids_column, t.scores_column]
        # row groups: (file index, row group index, rows, first row within the file)
        self._groups = [(fi, g, n, int(s)) for fi, f in enumerate(self.shards.files)
                        for g, (n, s) in enumerate(zip(f.row_group_rows, f.row_group_starts))]
        self.epoch = 0
        self._resume: dict | None = None  # {"num_workers", "batches_done"} applied by the next __iter__
        self._done = 0  # in-process iteration: this rank's batches yielded in the epoch
        self.counters = {"bad_rows_skipped": 0}
        self._release: torch.Tensor | None = None  # set by ShardLoader for its workers (see _WindowPool)
        self._packed = False  # ShardLoader unpacks batches sent as views of the pooled windows (_pack)

    # ---- plan -------------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.shards.num_rows

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (drops any pending resume)."""
        self.epoch, self._resume, self._done = int(epoch), None, 0

    def _group_order(self, epoch: int) -> np.ndarray:
        idx = np.arange(len(self._groups))
        if self.shuffle:
            idx = np.random.default_rng([self.seed, epoch]).permutation(idx)
        return idx

    def num_batches(self) -> int:
        """Batches every rank yields per epoch (the same on all ranks, whatever the worker count)."""
        n = self.num_rows // self.world_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _worker_batches(self, num_workers: int) -> list[int]:
        nb, w = self.num_batches(), max(1, num_workers)
        return [nb // w + (i < nb % w) for i in range(w)]

    def epoch_accounting(self, num_workers: int = 0) -> dict:
        """What an epoch reads and leaves out (identical every epoch; the rows concerned change)."""
        n = self.num_rows // self.world_size
        nb = self.num_batches()
        used = min(n, nb * self.batch_size)
        return {
            "rows_total": self.num_rows,
            "rows_per_rank": used,
            "rows_unassigned": self.num_rows - n * self.world_size,  # N % world, not read by any rank
            "rows_dropped_last_partial": (n - used) * self.world_size,  # drop_last, over all ranks
            "batches_per_rank": nb,
            "batches_per_worker": self._worker_batches(num_workers),
        }

    def _worker_rows(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(first global row, end row, batches) of this rank's worker in the permuted row sequence."""
        n = self.num_rows // self.world_size
        per = self._worker_batches(num_workers)
        b0 = sum(per[:worker])
        base = self.rank * n
        used = min(n, self.num_batches() * self.batch_size)
        lo = base + min(b0 * self.batch_size, used)
        hi = base + min((b0 + per[worker]) * self.batch_size, used)
        return lo, hi, per[worker]

    # ---- decoding ---------------------------------------------------------------------------------
    def _decode(self, table, path: str, first_row: int) -> dict:
        """Check one row group and turn it into numpy arrays. Teacher lists that are all full stay
        zero-copy [n, K_t] views of the Arrow buffers; the window assembly copies everything once. On
        the C++ path the lists stay raw (offsets, values) and are checked as they are copied."""
        cpp = self.assembly == "cpp"
        found = check_example_table(table, self.meta, check_sorted=self.check_sorted,
                                    check_duplicates=self.check_duplicates, check_lists=not cpp)
        n = len(table)
        bad = np.zeros(n, dtype=bool)
        if found:
            if self.on_bad_rows == "raise":
                raise_first(found, path, first_row)
            for m in found.values():
                bad |= m
        ids, scores = [], []
        for t in self.meta.teachers:
            ioff, iv = list_parts(table.column(t.ids_column))
            soff, sv = list_parts(table.column(t.scores_column))
            if cpp:  # the raw lists: checked while they are copied into the window (_assemble_cpp)
                ids.append((ioff, iv))
                scores.append((soff, sv))
            else:
                ids.append(pad_ragged(ioff, iv, t.k, PAD_ID, np.int64, "first"))
                scores.append(pad_ragged(soff, sv, t.k, 0.0, np.float32, "first"))
        return {
            "example_key": np.asarray(table.column("example_key")),
            "user_id": np.asarray(table.column("user_id")),
            "domain_id": np.asarray(table.column("domain_id")),
            "history": list_parts(table.column("history")),  # (offsets, values): scattered into the window
            "target": np.asarray(table.column("target")),
            "teacher_ids": ids,
            "teacher_scores": scores,
            "bad": bad,
        }

    def _layout(self) -> dict:
        """Window columns: {key: (shape of one row, dtype, fill before use or None)}."""
        T, K = len(self.meta.teachers), self.k
        ragged = any(t.k < K for t in self.meta.teachers)  # narrower teachers leave empty slots
        return {
            "example_key": ((), torch.int64, None),
            "user_id": ((), torch.int64, None),
            "domain_id": ((), torch.int64, None),
            # lists are scattered in right-aligned (the C++ path writes the padding itself)
            "history": ((self.max_len,), torch.int64, None if self.assembly == "cpp" else PAD_ID),
            "target": ((), torch.int64, None),
            "teacher_ids": ((T, K), torch.int64, PAD_ID if ragged else None),
            "teacher_scores": ((T, K), torch.float32, 0.0 if ragged else None),
        }

    def _windows(self, epoch: int, lo: int, hi: int, start_row: int, pool: _WindowPool,
                 stop: threading.Event) -> Iterator[dict]:
        """Decoded, shuffled windows covering rows [start_row, hi) of the stream's range [lo, hi)."""
        order = self._group_order(epoch)
        sizes = np.array([self._groups[i][2] for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        cache: tuple[int, dict] | None = None  # the last decoded row group (shared by two windows)
        S = self.shuffle_buffer_rows
        w0 = lo + ((start_row - lo) // S) * S
        first_j = int(np.searchsorted(starts, w0, side="right")) - 1
        last_j = int(np.searchsorted(starts, hi, side="left"))  # exclusive
        pool.stop = stop
        scratch: dict = {}
        # reading (pyarrow, GIL released) runs one thread ahead of decoding (numpy)
        tables = self._prefetched(lambda stop: self._read_groups(order, range(first_j, last_j), stop), depth=2)
        for a in range(w0, hi, S):
            if stop.is_set():
                return
            b = min(a + S, hi)
            got = pool.acquire(b - a, release_at=-(-(b - lo) // self.batch_size))
            if got is None:
                return
            win, window_out = got
            ids_rows = [_as_rows(win["teacher_ids"][:, t, : info.k]) for t, info in enumerate(self.meta.teachers)]
            scores_rows = [_as_rows(win["teacher_scores"][:, t, : info.k]) for t, info in enumerate(self.meta.teachers)]
            # window row r lands at output row dest[r]: one scatter per row group, no extra copy
            dest = np.arange(b - a)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, a]).permutation(b - a)
                dest[perm] = np.arange(b - a)
            for j in range(int(np.searchsorted(starts, a, side="right")) - 1, len(order)):
                if starts[j] >= b:
                    break
                fi, g, _, first = self._groups[order[j]]
                if cache is None or cache[0] != order[j]:
                    jj, tab = next(tables)
                    assert jj == j, (jj, j)  # row groups are consumed strictly in plan order
                    cache = (order[j], self._decode(tab, self.shards.files[fi].path, first))
                s0, s1 = max(a, starts[j]) - starts[j], min(b, starts[j + 1]) - starts[j]
                d = dest[starts[j] + s0 - a : starts[j] + s1 - a]
                part = cache[1]
                for key in ("example_key", "user_id", "domain_id", "target", "bad"):
                    win[key][d] = part[key][s0:s1]
                if self.assembly == "cpp":
                    self._assemble_cpp(win, d, part, s0, s1, self.shards.files[fi].path, first)
                    continue
                hoff, hvals = part["history"]
                _scatter_right_aligned(win["history"], d, hoff[s0 : s1 + 1], hvals, scratch)
                for t in range(len(self.meta.teachers)):
                    ids_rows[t][d] = _as_rows(part["teacher_ids"][t][s0:s1])
                    scores_rows[t][d] = _as_rows(part["teacher_scores"][t][s0:s1])
            yield window_out

    def _assemble_cpp(self, win: dict, d: np.ndarray, part: dict, s0: int, s1: int, path: str, first: int) -> None:
        """Rows [s0, s1) of a decoded row group into window rows ``d``, lists checked while copied (one
        pass over each value). Problems found here are the ones the numpy path finds in
        ``check_example_table``, with the same names; rows are raised or marked bad the same way."""
        C = self.meta.num_items
        found: dict[tuple[str, str], np.ndarray] = {}
        hoff, hvals = part["history"]
        bits = _shard_rows.history_rows_into(win["history"], d, hoff[s0 : s1 + 1], hvals, C)
        if bits.any():
            found[("history", f"item id outside [0, {C})")] = bits != 0
        lists = [(ioff[s0 : s1 + 1], iv, soff[s0 : s1 + 1], sv, info.k)
                 for (ioff, iv), (soff, sv), info in zip(part["teacher_ids"], part["teacher_scores"], self.meta.teachers)]
        bits = _shard_rows.teacher_rows_into(win["teacher_ids"], win["teacher_scores"], d, lists, C, self.check_sorted)
        if bits.any():
            for t, info in enumerate(self.meta.teachers):
                for bit, col, problem in _row_problems(info, C):
                    m = (bits[:, t] & bit) != 0
                    if m.any():
                        found[(col, problem)] = m
        if found:
            if self.on_bad_rows == "raise":
                raise_first(found, path, first + s0)
            for m in found.values():
                win["bad"][d[m]] = True

    def _read_groups(self, order: np.ndarray, js: range, stop: threading.Event) -> Iterator[tuple]:
        """(j, Arrow table) of the plan's row groups ``js``, read in order."""
        handles: dict[int, pq.ParquetFile] = {}
        for j in js:
            if stop.is_set():
                return
            fi, g, _, _ = self._groups[order[j]]
            if fi not in handles:
                path = self.shards.files[fi].path
                try:
                    handles[fi] = pq.ParquetFile(path)
                except Exception as e:
                    raise IncompleteShardError(f"{path}: truncated or corrupt Parquet file ({e})") from None
            yield j, self.shards.read_row_group(fi, g, self.columns, handle=handles[fi])

    def _prefetched(self, gen_fn, depth: int | None = None) -> Iterator:
        """Run ``gen_fn(stop)`` in a thread, ``depth`` (default prefetch_windows) items ahead."""
        q: queue.Queue = queue.Queue(maxsize=depth or self.prefetch_windows)
        stop = threading.Event()
        END = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def run():
            try:
                for item in gen_fn(stop):
                    if not put(item):
                        return
                put(END)
            except BaseException as e:  # handed to the consumer, which re-raises it
                put(e)

        th = threading.Thread(target=run, name="shard-prefetch", daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            th.join(timeout=5)

    # ---- iteration --------------------------------------------------------------------------------
    def _stream_of(self, worker: int, num_workers: int, consumed: int) -> tuple[int, int]:
        """(stream, its first local batch) for DataLoader worker ``worker`` when ``consumed`` batches of
        the rank's epoch are already consumed. Rank batch j is stream j % W's local batch j // W (the
        DataLoader's round robin); after a restart its worker 0 must take stream consumed % W."""
        stream = (worker + consumed) % num_workers
        return stream, max(0, -(-(consumed - stream) // num_workers))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, resume = self.epoch, self._resume
        self._resume = None
        consumed = 0
        if resume is not None:
            if resume["num_workers"] != num_workers:
                raise LoaderStateError(
                    f"state was saved with {resume['num_workers']} worker stream(s), iterating with {num_workers}"
                )
            consumed = int(resume["batches_done"])
        stream, start = self._stream_of(worker, num_workers, consumed)
        lo, hi, nb = self._worker_rows(stream, num_workers)
        B = self.batch_size
        self._done = consumed
        if start >= nb:
            return
        # in a DataLoader worker windows live in shared memory, reused only with ShardLoader's release
        # channel; in-process they are reused once no batch view of them is alive
        shared = info is not None
        release = self._release if shared else None
        pool = _WindowPool(self._layout(), min(self.shuffle_buffer_rows, hi - lo),
                           0 if shared and release is None else self.prefetch_windows + 3, shared, release, stream)
        windows = self._prefetched(lambda stop: self._windows(epoch, lo, hi, lo + start * B, pool, stop))
        # rows of the first window before the resume point were consumed before the restart
        skip = (lo + start * B - lo) % self.shuffle_buffer_rows
        pending: list[dict] = []
        pending_rows = 0
        batch_index = start
        for win in windows:
            if skip:
                win = {k: v[skip:] for k, v in win.items()}
                skip = 0
            pending.append(win)
            pending_rows += len(win["bad"])
            # rows of the range not yet read into `pending`; when none are left, a short batch may go
            unread = hi - (lo + batch_index * B + pending_rows)
            while pending_rows >= B or (pending_rows and unread == 0):
                take = min(B, pending_rows)
                # copy only a batch that straddles two windows; otherwise the batch is a view
                head, got = [], 0
                while got < take:
                    p = pending[0]
                    m = min(take - got, len(p["bad"]))
                    head.append({k: v[:m] for k, v in p.items()})
                    got += m
                    if m == len(p["bad"]):
                        pending.pop(0)
                    else:
                        pending[0] = {k: v[m:] for k, v in p.items()}
                batch = head[0] if len(head) == 1 else {k: _cat([h[k] for h in head]) for k in head[0]}
                pending_rows -= take
                yield self._emit(batch, stream, num_workers, batch_index, epoch, pool)
                batch_index += 1
                if batch_index >= nb:
                    return

    def _emit(self, batch: dict, stream: int, num_workers: int, batch_index: int, epoch: int,
              pool: _WindowPool) -> dict:
        bad = batch.pop("bad")
        skipped = int(bad.sum())
        if skipped:
            keep = ~bad
            batch = {k: v[torch.from_numpy(keep) if torch.is_tensor(v) else keep] for k, v in batch.items()}
            self.counters["bad_rows_skipped"] += skipped
        # window rows are contiguous, so a batch slice is already a contiguous view (no copy)
        out = {k: batch[k] if torch.is_tensor(batch[k]) else torch.from_numpy(np.ascontiguousarray(batch[k]))
               for k in TENSOR_KEYS}
        if self._packed and pool.release is not None:
            out = _pack(out, pool)
        rank_batch = batch_index * num_workers + stream
        out["info"] = {"rank_batch": rank_batch, "stream": stream, "epoch": epoch, "skipped_bad_rows": skipped}
        self._done = rank_batch + 1  # meaningful in-process (num_workers=0), where yield = consumed
        return out

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self, batches_done: int | None = None, num_workers: int = 0) -> dict:
        """Position to resume from: epoch, seed and the number of this rank's batches consumed in the
        epoch (all per-worker positions follow from it, see ``_stream_of``). Iterating the dataset
        directly (or DataLoader num_workers=0) it is tracked here; ShardLoader passes its own count."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": max(1, num_workers),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "shuffle_buffer_rows": self.shuffle_buffer_rows,
            "drop_last": self.drop_last,
            "num_rows": self.num_rows,
            "batches_done": int(self._done if batches_done is None else batches_done),
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues ``state``'s epoch exactly where it stopped."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise LoaderStateError(f"not a loader state of version {STATE_VERSION}: {state.get('format')!r} {state.get('version')!r}")
        for key in ("rank", "world_size", "batch_size", "shuffle", "shuffle_buffer_rows", "drop_last", "num_rows"):
            if state[key] != getattr(self, key):
                raise LoaderStateError(f"loader state has {key}={state[key]!r}, this dataset has {getattr(self, key)!r}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._done = int(state["batches_done"])
        self._resume = {"num_workers": int(state["num_workers"]), "batches_done": self._done}
        self.counters = dict(state.get("counters", self.counters))


class ShardLoader:
    """DataLoader(batch_size=None) over a TeacherShardDataset that counts the batches actually consumed
    (not those the workers prefetched), so ``state_dict()`` resumes exactly, in the same order, with
    or without workers. It relies on the DataLoader's in-order round robin over workers and checks it
    on every batch. Pops ``info`` from batches; skipped bad rows are summed in ``counters``."""

    def __init__(self, dataset: TeacherShardDataset, *, num_workers: int = 0, pin_memory: bool = False,
                 multiprocessing_context=None, prefetch_factor: int | None = None):
        self.dataset, self.num_workers = dataset, int(num_workers)
        self._dl_kwargs = {"num_workers": self.num_workers, "pin_memory": pin_memory,
                           "multiprocessing_context": multiprocessing_context}
        if self.num_workers and prefetch_factor:
            self._dl_kwargs["prefetch_factor"] = prefetch_factor
        self._consumed = 0
        self.counters = {"bad_rows_skipped": 0}
        # of the last iteration with workers: pooled windows mapped here, batches that came with memory
        # of their own (stitched from two windows, bad rows removed, or from an unpooled window)
        self.stats = {"windows_mapped": 0, "batches_own_memory": 0}

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return self.dataset.teacher_names

    def __len__(self) -> int:
        return self.dataset.num_batches()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._consumed = 0

    def __iter__(self) -> Iterator[dict]:
        resume = self.dataset._resume
        self._consumed = int(resume["batches_done"]) if resume else 0
        if resume and resume["num_workers"] != max(1, self.num_workers):
            raise LoaderStateError(f"state was saved with {resume['num_workers']} worker stream(s), "
                                   f"this loader has {max(1, self.num_workers)}")
        W = self.num_workers
        release = None
        if W:
            # the release channel (see _WindowPool): per stream, how many of its batches the consumer
            # here has dropped, so that the workers may overwrite (reuse) their shared windows
            release = torch.tensor([max(0, -(-(self._consumed - s) // W)) for s in range(W)],
                                   dtype=torch.int64).share_memory_()
            # packed batches would make the DataLoader's pin thread copy whole windows
            self.dataset._release, self.dataset._packed = release, not self._dl_kwargs["pin_memory"]
        try:
            it = iter(DataLoader(self.dataset, batch_size=None, **self._dl_kwargs))
        finally:
            self.dataset._release, self.dataset._packed = None, False  # the workers hold their copy
        windows: dict = {}  # (stream, window id) -> _MappedWindow, a worker's pooled window mapped here once
        # per stream, the batches handed out and not yet released: (stream-local index, window key or
        # None when the batch has memory of its own), oldest first
        held = [collections.deque() for _ in range(W)]
        received = [int(release[s]) for s in range(W)] if W else []
        if W:
            self.dataset._resume = None  # the workers hold their copy; later epochs start fresh
        self.stats = {"windows_mapped": 0, "batches_own_memory": 0}
        while True:
            if release is not None:
                self._release_dropped(held, received, windows, release)
            try:
                batch = next(it)
            except StopIteration:
                return
            info = batch.pop("info")
            if info["rank_batch"] != self._consumed:
                raise RuntimeError(f"batch {info['rank_batch']} arrived while {self._consumed} was expected: "
                                   "the DataLoader must deliver worker batches in order (in_order=True)")
            if release is not None:
                # a worker overwrites a pooled window once released. Packed batches are handed out as
                # views of the window (no copy) and released once the consumer has dropped them; pinned
                # ones are copies already; others (pin_memory without an accelerator) are copied here
                # (numpy: single-threaded, where torch's copy would wake the intra-op thread pool)
                key = None
                if "_packed" in batch:
                    if batch["_packed"]["block"] is not None:
                        self.stats["windows_mapped"] += 1
                    batch, key = _unpack(batch["_packed"], info["stream"], windows)
                elif self._dl_kwargs["pin_memory"]:  # (packed mode: an unpacked batch has its own memory)
                    batch = {k: v if v.is_pinned() else torch.from_numpy(v.numpy().copy()) for k, v in batch.items()}
                if key is None:
                    self.stats["batches_own_memory"] += 1
                s = info["stream"]
                held[s].append((info["rank_batch"] // W, key))
                received[s] = info["rank_batch"] // W + 1
            self._consumed += 1
            self.counters["bad_rows_skipped"] += int(info["skipped_bad_rows"])
            yield batch
            del batch  # this frame must not keep the batch's window in use

    @staticmethod
    def _release_dropped(held: list, received: list, windows: dict, release: torch.Tensor) -> None:
        """Tell each worker how many of its stream's batches it may overwrite: those before the oldest
        batch whose window still has a live view here (stream order, so a count suffices)."""
        for s, q in enumerate(held):
            while q and (q[0][1] is None or not windows[q[0][1]].in_use()):
                q.popleft()
            release[s] = q[0][0] if q else received[s]

    def state_dict(self) -> dict:
        sd = self.dataset.state_dict(self._consumed, self.num_workers)
        sd["counters"] = dict(self.counters)
        return sd

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._consumed = int(state["batches_done"])
        self.counters = dict(state.get("counters", self.counters))
