"""The canonical prepared dataset: one in-memory form, one on-disk form (documented in docs/data.md).

On disk, a prepared dataset is a directory:

    meta.json          {"format": "prmkd-dist/dataset", "version": 1, "name", "num_users", "num_items",
                        "num_interactions", "pad_id": -1, "item_fingerprint", "kcore", "source"}
    items.parquet      item_id int64 (0..C-1, row i has id i), raw_item_id string, text string (nullable)
    users.parquet      user_id int64 (0..U-1, row u has id u), raw_user_id string,
                       items list<int64> (chronological), timestamps list<int64>

In memory, sequences are CSR (``offsets`` [U+1], ``items`` [nnz]) so that tens of millions of users cost
two flat arrays, never a Python object per user.

Split: leave-one-out on each user's chronological sequence: last item = test target, second to last =
validation target, the rest = training prefix. Users with fewer than 3 interactions keep everything in
training and have no validation/test target (PAD_ID). The split is a pure function of the sequences, so
it is not stored separately.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.domains import Domain, check_domains

FORMAT = "prmkd-dist/dataset"
VERSION = 1


class DatasetFormatError(ValueError):
    """A prepared-dataset directory does not follow the documented form."""


def item_fingerprint(item_raw_ids) -> str:
    """Fingerprint of an item-id space: the raw ids in id order. Shards, teachers and checkpoints
    carry it so that artefacts built on a different id mapping are refused instead of mis-read."""
    h = hashlib.sha256()
    for raw in item_raw_ids:
        h.update(str(raw).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    """CSR -> Arrow list column (large_list only when 32-bit offsets would overflow)."""
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int64()))
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, pa.int64()))


def read_meta(directory: str) -> dict:
    """The meta.json of a prepared dataset (num_items, item_fingerprint, ...) without reading the data."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.exists(meta_path):
        raise DatasetFormatError(f"{directory}: not a prepared dataset (no meta.json); run `prmkd-dist data prepare`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DatasetFormatError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} version {VERSION}"
        )
    return meta


@dataclass
class InteractionData:
    name: str
    num_users: int
    num_items: int
    offsets: np.ndarray  # int64 [U+1]
    items: np.ndarray  # int64 [nnz], per user chronological
    timestamps: np.ndarray  # int64 [nnz]
    item_raw_ids: np.ndarray  # object/str [C]
    user_raw_ids: np.ndarray  # object/str [U]
    item_text: list | None = None  # [C] str or None
    kcore: int = 0
    source: str = ""
    fingerprint: str = field(default="")
    # multi-domain datasets (prmkd_dist.data.domains): each domain's block of item and user ids; None = one domain
    domains: list | None = None

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = item_fingerprint(self.item_raw_ids)
        self.validate()

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], num_items: int, name: str = "sequences") -> "InteractionData":
        """A dataset from explicit per-user item-id lists, already chronological (timestamps = positions;
        raw ids "i<id>" / "u<user>"): hand-made cases for tests and examples."""
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sequences], out=offsets[1:])
        items = (np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if sequences
                 else np.zeros(0, dtype=np.int64))
        return cls(name, len(sequences), num_items, offsets, items, np.arange(len(items), dtype=np.int64),
                   np.array([f"i{i}" for i in range(num_items)], dtype=object),
                   np.array([f"u{u}" for u in range(len(sequences))], dtype=object))

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        off, it = self.offsets, self.items
        if off.shape != (self.num_users + 1,) or off[0] != 0 or off[-1] != len(it):
            raise DatasetFormatError(
                f"{self.name}: offsets must have num_users+1={self.num_users + 1} entries from 0 to "
                f"len(items)={len(it)}; got shape {off.shape}, first {off[:1]}, last {off[-1:]}"
            )
        if np.any(np.diff(off) < 0):
            raise DatasetFormatError(f"{self.name}: offsets must be non-decreasing")
        if len(self.timestamps) != len(it):
            raise DatasetFormatError(f"{self.name}: {len(self.timestamps)} timestamps for {len(it)} items")
        if len(it) and (it.min() < 0 or it.max() >= self.num_items):
            bad = int(np.flatnonzero((it < 0) | (it >= self.num_items))[0])
            raise DatasetFormatError(
                f"{self.name}: interaction {bad} has item id {int(it[bad])}, expected 0..{self.num_items - 1}"
            )
        if len(self.item_raw_ids) != self.num_items or len(self.user_raw_ids) != self.num_users:
            raise DatasetFormatError(f"{self.name}: raw-id tables do not match num_items/num_users")
        if self.domains is not None:
            why = check_domains(self.domains, self.num_users, self.num_items, off, it, self.name)
            if why:
                raise DatasetFormatError(why)

    # ---- access -------------------------------------------------------------------------------
    @property
    def num_interactions(self) -> int:
        return int(len(self.items))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def item_popularity(self, items: np.ndarray | None = None) -> np.ndarray:
        """Interaction count per item (over ``items``, default all interactions)."""
        return np.bincount(self.items if items is None else items, minlength=self.num_items).astype(np.int64)

    def stats(self) -> dict:
        lens = self.lengths()
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "density": self.num_interactions / max(1, self.num_users * self.num_items),
            "seq_len_mean": float(lens.mean()) if len(lens) else 0.0,
            "seq_len_median": float(np.median(lens)) if len(lens) else 0.0,
            "seq_len_max": int(lens.max()) if len(lens) else 0,
            "kcore": self.kcore,
            "item_fingerprint": self.fingerprint,
        }

    # ---- on-disk form -------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        items_tab = pa.table(
            {
                "item_id": pa.array(np.arange(self.num_items, dtype=np.int64)),
                "raw_item_id": pa.array([str(x) for x in self.item_raw_ids], pa.string()),
                "text": pa.array(self.item_text if self.item_text is not None else [None] * self.num_items, pa.string()),
            }
        )
        users_tab = pa.table(
            {
                "user_id": pa.array(np.arange(self.num_users, dtype=np.int64)),
                "raw_user_id": pa.array([str(x) for x in self.user_raw_ids], pa.string()),
                "items": _list_array(self.offsets, self.items),
                "timestamps": _list_array(self.offsets, self.timestamps),
            }
        )
        pq.write_table(items_tab, os.path.join(directory, "items.parquet"))
        pq.write_table(users_tab, os.path.join(directory, "users.parquet"))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "num_users": self.num_users,
            "num_items": self.num_items,
            "num_interactions": self.num_interactions,
            "pad_id": PAD_ID,
            "item_fingerprint": self.fingerprint,
            "kcore": self.kcore,
            "source": self.source,
        }
        if self.domains is not None:
            meta["domains"] = [d.to_dict() for d in self.domains]
        with open(os.path.join(directory, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "InteractionData":
        meta_path = os.path.join(directory, "meta.json")
        meta = read_meta(directory)
        items_tab = pq.read_table(os.path.join(directory, "items.parquet"))
        users_tab = pq.read_table(os.path.join(directory, "users.parquet"))
        for tab, col, path in ((items_tab, "item_id", "items.parquet"), (users_tab, "user_id", "users.parquet")):
            ids = tab.column(col).to_numpy()
            if not np.array_equal(ids, np.arange(len(ids))):
                raise DatasetFormatError(f"{os.path.join(directory, path)}: column {col} must be 0..{len(ids) - 1} in row order")
        seq = users_tab.column("items").combine_chunks()
        ts = users_tab.column("timestamps").combine_chunks()
        text = items_tab.column("text").to_pylist()
        data = cls(
            name=meta["name"],
            num_users=int(meta["num_users"]),
            num_items=int(meta["num_items"]),
            offsets=seq.offsets.to_numpy().astype(np.int64),
            items=seq.values.to_numpy().astype(np.int64),
            timestamps=ts.values.to_numpy().astype(np.int64),
            item_raw_ids=np.asarray(items_tab.column("raw_item_id").to_pylist(), dtype=object),
            user_raw_ids=np.asarray(users_tab.column("raw_user_id").to_pylist(), dtype=object),
            item_text=text if any(t is not None for t in text) else None,
            kcore=int(meta.get("kcore", 0)),
            source=meta.get("source", ""),
            domains=_domains_from_meta(meta, meta_path),
        )
        if data.fingerprint != meta["item_fingerprint"]:
            raise DatasetFormatError(f"{meta_path}: item_fingerprint does not match items.parquet (file edited?)")
        if data.num_interactions != meta["num_interactions"]:
            raise DatasetFormatError(f"{meta_path}: num_interactions {meta['num_interactions']} != {data.num_interactions} in users.parquet")
        return data


def _domains_from_meta(meta: dict, meta_path: str) -> list | None:
    if "domains" not in meta:
        return None
    try:
        return [Domain.from_dict(d) for d in meta["domains"]]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DatasetFormatError(f"{meta_path}: 'domains' must be a list of {{name, items: [lo, hi], users: [lo, hi]}}, "
                                 f"got {meta['domains']!r} ({e})") from None


@dataclass
class LeaveOneOutSplit:
    """Leave-one-out split of an InteractionData (see module docstring).

    ``train_offsets``/``train_items``: CSR of each user's training prefix.
    ``valid_target``/``test_target``: [U] int64, PAD_ID for users with < 3 interactions.
    Validation input = training prefix; test input = training prefix + validation item.
    """

    data: InteractionData
    train_offsets: np.ndarray
    train_items: np.ndarray
    valid_target: np.ndarray
    test_target: np.ndarray

    @classmethod
    def of(cls, data: InteractionData) -> "LeaveOneOutSplit":
        lens = data.lengths()
        held = np.where(lens >= 3, 2, 0)  # items held out per user
        train_lens = lens - held
        train_offsets = np.zeros(data.num_users + 1, dtype=np.int64)
        np.cumsum(train_lens, out=train_offsets[1:])
        # positions kept: for each user, offsets[u] .. offsets[u] + train_lens[u]
        keep = np.ones(len(data.items), dtype=bool)
        ends = data.offsets[1:]
        has = held > 0
        keep[ends[has] - 1] = False
        keep[ends[has] - 2] = False
        valid = np.full(data.num_users, PAD_ID, dtype=np.int64)
        test = np.full(data.num_users, PAD_ID, dtype=np.int64)
        valid[has] = data.items[ends[has] - 2]
        test[has] = data.items[ends[has] - 1]
        return cls(data, train_offsets, data.items[keep], valid, test)

    def train_sequence(self, user: int) -> np.ndarray:
        return self.train_items[self.train_offsets[user] : self.train_offsets[user + 1]]

    def history(self, user: int, stage: str) -> np.ndarray:
        """Input history for ``stage`` in {"valid", "test"} (what the model may see)."""
        tr = self.train_sequence(user)
        if stage == "valid":
            return tr
        if stage == "test":
            v = self.valid_target[user]
            return tr if v == PAD_ID else np.append(tr, v)
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")

    def target(self, stage: str) -> np.ndarray:
        if stage == "valid":
            return self.valid_target
        if stage == "test":
            return self.test_target
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")

    def eval_users(self, stage: str) -> np.ndarray:
        return np.flatnonzero(self.target(stage) != PAD_ID)


def pad_ragged(offsets: np.ndarray, values: np.ndarray, width: int, fill, dtype, keep: str) -> np.ndarray:
    """Ragged lists (absolute ``offsets`` into ``values``) -> dense [n, width] without a per-row loop.

    keep="last": left-pad, keeping the last ``width`` items (histories, most recent at the right end);
    keep="first": right-pad, keeping the first ``width`` items (top-K lists). The one padding routine of
    the project: the loader, the trainers and the evaluation all use it."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    if n and keep == "first" and (lengths == width).all():  # the common full top-K case: a reshape
        return values[offsets[0] : offsets[-1]].reshape(n, width).astype(dtype, copy=False)
    if n == 0 or offsets[-1] == offsets[0]:
        return np.full((n, width), fill, dtype=dtype)
    # one dense gather of n x width candidate positions, masked where a row has no item there
    if keep == "last":
        idx = offsets[1:, None].astype(np.int64) - width + np.arange(width)
        valid = idx >= offsets[:-1, None]
    elif keep == "first":
        idx = offsets[:-1, None].astype(np.int64) + np.arange(width)
        valid = idx < offsets[1:, None]
    else:
        raise ValueError(f"keep must be 'last' or 'first', got {keep!r}")
    np.clip(idx, offsets[0], offsets[-1] - 1, out=idx)
    return np.where(valid, values[idx], np.asarray(fill, dtype=dtype)).astype(dtype, copy=False)


def left_pad(seqs: list[np.ndarray], max_len: int, trim: bool = False) -> np.ndarray:
    """Stack sequences into [B, max_len] int64, keeping the most recent ``max_len`` items at the right
    end and filling the left with PAD_ID (the layout every sequential model here expects).

    ``trim``: only as wide as the longest sequence (at most ``max_len``, at least 1): the columns it drops
    would be PAD in every row, and the models encode a left-padded history the same whatever padding precedes
    it (right-aligned positions; tests/models ``test_padding_invariance``), so this only saves their work."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if trim:
        max_len = max(1, min(max_len, int(lengths.max()) if len(seqs) else 1))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if len(seqs) else np.zeros(0, np.int64)
    return pad_ragged(offsets, values, max_len, PAD_ID, np.int64, keep="last")
