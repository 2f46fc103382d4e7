"""What the non-sequential students share: data binding, item attributes, and the feature-interaction base.

**Data-bound students.** DeepFM, DCN-v2 and LightGCN need more than ``num_items``: user ids, item
attributes, the training graph. A data-bound student class sets ``needs_users = True`` and implements
``data_hparams(split, **hparams)`` (hyper-parameters derived from the data, e.g. ``num_users``; stored in
the checkpoint's meta.json so ``load_checkpoint`` rebuilds the same shapes) and ``bind_data(split)`` (fills
data buffers such as the item-attribute lists or graph edges; they are persistent buffers, so a checkpoint is
self-contained). ``prmkd_dist.train.trainer.build_model`` does both. Scoring takes the user ids too:
``score(history, users)``; ``evaluate`` passes them to any scorer with ``needs_users``.

**Item attributes** (``item_attributes``): ml-latest-small's genres (movies.csv) and tags (tags.csv, lower-cased,
distinct), joined to the catalog by raw movie id; datasets without attribute files have none (Amazon Games).

**Feature-interaction students** (:class:`FeatureInteractionStudent`, DeepFM and DCN-v2 subclass it) score a
(user, item) pair from field embeddings held in TorchRec ``EmbeddingBagCollection`` tables (sharded by the
planner like the sequential students' tables):

- user side (``user_ebc``, one bag per row): ``user`` (the user id) and ``history`` (mean of the recent
  history items, its own table: the item side is looked up at another batch stride, one bag per candidate);
- item side (``item_ebc``, one bag per candidate): ``item`` (the item id) and, when the data has them,
  ``attr`` (mean of the item's genre/tag embeddings).

Scoring the whole catalog (evaluation): no factorisation into two towers exists for a DNN or cross network
over both sides, so scores are exact and chunked: the item side of every catalog item is looked up once, the
first (linear) layer of the interaction network is split into its user and item parts (``W [x_u; x_i] =
W_u x_u + W_i x_i``: each computed once per user / per item), and only the layers after it run per pair, in
chunks of at most ``PAIR_CHUNK`` pairs. First-order weights are plain bias vectors, not tables: FBGEMM tables
need a width that is a multiple of 4 (as for Caser's output bias).
"""
from __future__ import annotations

import abc
import csv
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from prmkd_dist.constants import PAD_ID

USER_TABLE, HIST_TABLE, ITEM_TABLE, ATTR_TABLE = "fi_user", "fi_history", "fi_item", "fi_attr"
ATTRIBUTE_SOURCES = ("auto", "none")
# (user, item) pairs scored at once when ranking the whole catalog. Small enough that a chunk's [pairs, width]
# intermediates (the DNN/cross activations, 4 MB at 2^14 x 64 fp32) stay in cache: at 2^18 they went to memory
# and full-catalog evaluation of DCN-v2 / DeepFM ran ~4x slower (2-core Xeon, 1,024 users x 1,024 items, 1 thread).
PAIR_CHUNK = 1 << 14


class DataBindingError(ValueError):
    """A data-bound student was built without its data, or with data of another shape."""


@dataclass
class ItemAttributes:
    """Attribute ids of every item as CSR: item i has ``values[offsets[i]:offsets[i + 1]]``."""

    offsets: np.ndarray  # int64 [C + 1]
    values: np.ndarray  # int64 [nnz]
    names: list[str]  # attribute vocabulary ("genre:Comedy", "tag:funny", ...)


def _ml_root(data) -> "object | None":
    from prmkd_dist.data.paths import shared_data_root

    root = shared_data_root() / "ml-latest-small"
    return root if (root / "movies.csv").exists() else None


def item_attributes(data, source: str = "auto") -> ItemAttributes:
    """Attributes of ``data``'s items (module doc). ``source``: "auto" (genres + tags for an ml-latest-small
    dataset, including slices of it; none otherwise) or "none"."""
    if source not in ATTRIBUTE_SOURCES:
        raise ValueError(f"item_attributes: source must be one of {ATTRIBUTE_SOURCES}, got {source!r}")
    c = data.num_items
    empty = ItemAttributes(np.zeros(c + 1, np.int64), np.zeros(0, np.int64), [])
    root = _ml_root(data) if source == "auto" and data.name.startswith("ml-latest-small") else None
    if root is None:
        return empty
    index = {str(r): i for i, r in enumerate(data.item_raw_ids)}
    per_item: list[set[str]] = [set() for _ in range(c)]
    with open(root / "movies.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            i = index.get(row["movieId"])
            if i is not None and row["genres"] != "(no genres listed)":
                per_item[i].update(f"genre:{g}" for g in row["genres"].split("|"))
    with open(root / "tags.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            i = index.get(row["movieId"])
            tag = row["tag"].strip().lower()
            if i is not None and tag:
                per_item[i].add(f"tag:{tag}")
    names = sorted(set().union(*per_item))
    vocab = {n: k for k, n in enumerate(names)}
    lists = [sorted(vocab[n] for n in s) for s in per_item]
    offsets = np.zeros(c + 1, np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter((v for x in lists for v in x), np.int64, count=int(offsets[-1]))
    return ItemAttributes(offsets, values, names)


_attributes_of = item_attributes  # the students' hyper-parameter of the same name shadows it


def check_bound(model: nn.Module, what: str, expected: int, got: int) -> None:
    if expected != got:
        raise DataBindingError(f"{type(model).__name__}: built for {what}={expected}, the data has {got}; "
                               f"build it with the data it is bound to (build_model(cfg, num_items, split))")


def bag_kjt(keys: list[str], bags: list[tuple[Tensor, Tensor]]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor from one (values, lengths) pair per key (same number of bags per key)."""
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat([v for v, _ in bags]),
                                               lengths=torch.cat([l.to(torch.int32) for _, l in bags]))


def history_bag(history: Tensor) -> tuple[Tensor, Tensor]:
    """Values and lengths of the left-padded histories [B, L] as bags (padding is not looked up)."""
    mask = history != PAD_ID
    return history[mask], mask.sum(dim=1)


class FeatureInteractionStudent(nn.Module, abc.ABC):
    """Base of DeepFM and DCN-v2 (module doc). Subclasses implement ``user_part`` / ``pair_scores``.

    Fields (F = 3, or 4 with item attributes), each ``dim`` wide: user id, recent history (mean), item id,
    item attributes (mean). ``user_fields`` -> [B, 2, d]; ``item_fields`` -> [M, F_i, d]."""

    needs_users = True
    catalog_output = "none"  # no item table scores the catalog linearly: scored pairwise (score_items)

    def __init__(self, num_items: int, num_users: int, num_attributes: int, dim: int, max_len: int, device=None):
        super().__init__()
        if num_items <= 0 or num_users <= 0 or num_attributes < 0 or max_len <= 0:
            raise ValueError(f"{type(self).__name__}: num_items, num_users, max_len must be > 0 and num_attributes "
                             f">= 0, got {num_items}, {num_users}, {max_len}, {num_attributes}")
        if dim <= 0 or dim % 4:
            raise ValueError(f"{type(self).__name__}: dim must be a positive multiple of 4 (FBGEMM table widths), "
                             f"got {dim}")
        self.num_items, self.num_users, self.num_attributes = num_items, num_users, num_attributes
        self.dim, self.max_len = dim, max_len
        dev = torch.device(device) if device is not None else None

        def table(name, rows, feature, pooling):
            return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[feature],
                                      pooling=pooling)

        self.user_ebc = EmbeddingBagCollection(tables=[table(USER_TABLE, num_users, "user", PoolingType.SUM),
                                                       table(HIST_TABLE, num_items, "history", PoolingType.MEAN)],
                                               device=dev)
        item_tables = [table(ITEM_TABLE, num_items, "item", PoolingType.SUM)]
        if num_attributes:
            item_tables.append(table(ATTR_TABLE, num_attributes, "attr", PoolingType.MEAN))
        self.item_ebc = EmbeddingBagCollection(tables=item_tables, device=dev)
        with torch.no_grad():  # small init: the interaction terms are products of embeddings
            for ebc in (self.user_ebc, self.item_ebc):
                for t in ebc.embedding_bags.values():
                    nn.init.normal_(t.weight, std=0.05)
        self.num_fields = 3 + (num_attributes > 0)
        # first-order weights (module doc: plain parameters, not tables)
        self.bias = nn.Parameter(torch.zeros(1, device=dev))  # [1]: DeepSpeed refuses 0-d parameters
        self.user_bias = nn.Parameter(torch.zeros(num_users, device=dev))
        self.hist_bias = nn.Parameter(torch.zeros(num_items, device=dev))
        self.item_bias = nn.Parameter(torch.zeros(num_items, device=dev))
        self.attr_bias = nn.Parameter(torch.zeros(num_attributes, device=dev)) if num_attributes else None
        # item -> attribute lists (bind_data fills them; persistent: the checkpoint carries them)
        self.register_buffer("attr_offsets", torch.zeros(num_items + 1, dtype=torch.long, device=dev))
        self.register_buffer("attr_values", torch.zeros(0, dtype=torch.long, device=dev))

    # ---- data binding -------------------------------------------------------------------------------
    @classmethod
    def data_hparams(cls, split, item_attributes: str = "auto", **_) -> dict:
        attrs = _attributes_of(split.data, item_attributes)
        return {"num_users": int(split.data.num_users), "num_attributes": len(attrs.names)}

    def bind_data(self, split) -> None:
        check_bound(self, "num_users", self.num_users, split.data.num_users)
        attrs = item_attributes(split.data, self.hparams.get("item_attributes", "auto"))
        check_bound(self, "num_attributes", self.num_attributes, len(attrs.names))
        dev = self.attr_offsets.device
        self.attr_offsets = torch.as_tensor(attrs.offsets, dtype=torch.long, device=dev)
        self.attr_values = torch.as_tensor(attrs.values, dtype=torch.long, device=dev)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the attribute list length is data-dependent: take the stored one's shape before loading
        key = prefix + "attr_values"
        if key in state_dict:
            self.attr_values = torch.empty_like(state_dict[key], device=self.attr_values.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- fields -------------------------------------------------------------------------------------
    def _check_users(self, history: Tensor, users: Tensor | None) -> Tensor:
        if users is None:
            raise ValueError(f"{type(self).__name__} scores (user, item) pairs: pass users=[B] user ids")
        if history.dim() != 2 or users.shape != history.shape[:1]:
            raise ValueError(f"{type(self).__name__}: history must be [B, L] and users [B], got "
                             f"{tuple(history.shape)} and {tuple(users.shape)}")
        return users.to(history.device, torch.long)

    def user_fields(self, history: Tensor, users: Tensor) -> tuple[Tensor, Tensor]:
        """([B, 2, d] field embeddings, [B] first-order term) of the user side."""
        history = history[:, -self.max_len:]
        hv, hl = history_bag(history)
        out = self.user_ebc(bag_kjt(["user", "history"], [(users, torch.ones_like(users)), (hv, hl)]))
        fields = torch.stack([out["user"], out["history"]], dim=1)
        hist_b = torch.zeros(history.shape[0], device=history.device).index_add_(
            0, torch.repeat_interleave(torch.arange(history.shape[0], device=history.device), hl), self.hist_bias[hv])
        first = self.user_bias[users] + hist_b / hl.clamp(min=1)
        return fields, first

    def item_fields(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """([M, F_i, d] field embeddings, [M] first-order term) of the items ``items`` [M]."""
        items = items.reshape(-1)
        bags = [(items, torch.ones_like(items))]
        first = self.item_bias[items]
        if self.num_attributes:
            lo, hi = self.attr_offsets[items], self.attr_offsets[items + 1]
            lens = hi - lo
            rows = torch.repeat_interleave(torch.arange(len(items), device=items.device), lens)
            pos = torch.arange(int(lens.sum()), device=items.device) - torch.repeat_interleave(
                lens.cumsum(0) - lens, lens)
            vals = self.attr_values[lo[rows] + pos]
            bags.append((vals, lens))
            first = first + torch.zeros(len(items), device=items.device).index_add_(
                0, rows, self.attr_bias[vals]) / lens.clamp(min=1)
        out = self.item_ebc(bag_kjt(["item", "attr"][:len(bags)], bags))
        fields = torch.stack([out["item"]] + ([out["attr"]] if self.num_attributes else []), dim=1)
        return fields, first

    # ---- the interaction --------------------------------------------------------------------------
    @abc.abstractmethod
    def user_part(self, user_fields: Tensor, user_first: Tensor) -> dict:
        """Everything of the score that depends on the user side only (computed once per row)."""

    @abc.abstractmethod
    def item_part(self, item_fields: Tensor, item_first: Tensor) -> dict:
        """Everything that depends on the item side only (computed once per item)."""

    @abc.abstractmethod
    def pair_scores(self, u: dict, i: dict) -> Tensor:
        """Scores [B, M] from ``user_part`` entries [B, ...] and ``item_part`` entries [B or 1, M, ...]."""

    def forward(self, history: Tensor, users: Tensor, items: Tensor) -> Tensor:
        return self.score_items(history, users, items)

    def score_items(self, history: Tensor, users: Tensor, items: Tensor) -> Tensor:
        """Scores [B, M] of candidate ``items`` ([B, M] per row, or [M] shared by all rows)."""
        users = self._check_users(history, users)
        if items.dim() not in (1, 2) or (items.dim() == 2 and items.shape[0] != history.shape[0]):
            raise ValueError(f"score_items: items must be [M] or [B={history.shape[0]}, M], got {tuple(items.shape)}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= self.num_items):
            raise ValueError(f"score_items: item ids must be in 0..{self.num_items - 1}")
        u = self.user_part(*self.user_fields(history, users))
        shape = items.shape if items.dim() == 2 else (1, items.shape[0])
        f, b = self.item_fields(items)
        i = self.item_part(f.reshape(*shape, *f.shape[1:]), b.reshape(shape))
        if items.dim() == 2:
            return self.pair_scores(u, i)
        # shared candidates (the whole catalog, or a rank's range): chunk the pairs to bound memory
        step = max(1, PAIR_CHUNK // max(history.shape[0], 1))
        return torch.cat([self.pair_scores(u, {k: v[:, lo:lo + step] for k, v in i.items()})
                          for lo in range(0, shape[1], step)], dim=1)

    def score(self, history: Tensor, users: Tensor | None = None) -> Tensor:
        """[B, C] exact scores over the whole catalog (module doc: chunked, first layer split)."""
        return self.score_items(history, users, torch.arange(self.num_items, device=history.device))


def mlp(in_dim: int, widths: tuple[int, ...], dropout: float, device=None) -> tuple[nn.Module, int]:
    """ReLU MLP (dropout after each hidden layer) and its output width."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Linear(in_dim, w, device=device), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = w
    return nn.Sequential(*layers), in_dim


def check_widths(name: str, widths, what: str = "mlp") -> tuple[int, ...]:
    widths = tuple(widths)
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{name}: {what} must be a list of positive layer widths, got {list(widths)}")
    return widths


__all__ = ["FeatureInteractionStudent", "ItemAttributes", "item_attributes", "DataBindingError", "check_bound",
           "bag_kjt", "history_bag", "mlp", "check_widths", "PAIR_CHUNK", "ATTRIBUTE_SOURCES"]
