"""LightGCN (He et al., 2020) on the training interaction graph, as a student scored by dot products.

Graph: the bipartite user-item graph of the training prefixes (a repeated interaction is one edge),
symmetrically normalised, ``A_hat = D^-1/2 A D^-1/2``. Propagation: ``E^(k+1) = A_hat E^(k)`` from the free
user and item tables ``E^(0)``; the final embeddings are the mean of layers 0..K. Score(u, i) =
``s * <e_u, e_i>``: linear in the propagated item table, so the catalog loss is ``kd_loss_linear`` (through
``engine.linear_loss``) exactly like the sequential students'.

Departures from the paper: trained with full-softmax cross-entropy (plus distillation) over the catalog
instead of BPR, with a learnable logit scale ``s`` (the propagated embeddings are averages with small norms;
a softmax needs logits spread over a few units).

Transductive: a user is its id. ``user_embedding(history, users)`` is the propagated row of ``users``; the
history is not used (at test time the validation item is not in the graph: LightGCN's usual protocol).

Tables: the user and item tables are TorchRec ``EmbeddingCollection``s. Propagation needs every row, so it
looks all of them up through the collections (under sharding: TorchRec's all-to-all; the fused table
optimizer gets their gradients in that lookup's backward). Each training step must propagate once:
objectives run inside ``with model.propagation():``, which computes the propagated tables once and serves
``user_embedding`` and ``output_weight`` from them.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from prmkd_dist.models.base import item_embedding_collection
from prmkd_dist.models.features import check_bound

USER_TABLE, USER_FEATURE = "lgcn_user", "lgcn_user_ids"
ITEM_TABLE, ITEM_FEATURE = "lgcn_item", "lgcn_item_ids"


def training_edges(split) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs of the training prefixes, sorted by user then item."""
    users = np.repeat(np.arange(split.data.num_users), np.diff(split.train_offsets))
    pairs = np.unique(users * np.int64(split.data.num_items) + split.train_items)
    return pairs // split.data.num_items, pairs % split.data.num_items


def normalized_adjacency(edge_users: Tensor, edge_items: Tensor, num_users: int, num_items: int) -> Tensor:
    """The sparse (U + C) x (U + C) ``D^-1/2 A D^-1/2`` of the bipartite graph (items after the users)."""
    du = torch.bincount(edge_users, minlength=num_users).float()
    di = torch.bincount(edge_items, minlength=num_items).float()
    w = (du[edge_users] * di[edge_items]).rsqrt()  # 1 / sqrt(d_u d_i) per edge
    rows = torch.cat([edge_users, edge_items + num_users])
    cols = torch.cat([edge_items + num_users, edge_users])
    n = num_users + num_items
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.cat([w, w]), (n, n)).coalesce()


def propagate(user0: Tensor, item0: Tensor, adjacency: Tensor, num_layers: int) -> tuple[Tensor, Tensor]:
    """Mean over layers 0..K of ``A_hat^k E^(0)`` (``adjacency`` from ``normalized_adjacency``)."""
    e = torch.cat([user0, item0])
    total = e
    for _ in range(num_layers):
        e = torch.sparse.mm(adjacency, e)
        total = total + e
    total = total / (num_layers + 1)
    return total[:user0.shape[0]], total[user0.shape[0]:]


class LightGCN(nn.Module):
    """LightGCN student (module doc).

    Args:
        num_items: catalog size C.
        num_users: users U (data-derived).
        num_edges: distinct training (user, item) pairs (data-derived).
        dim: embedding width (multiple of 4: FBGEMM tables).
        max_len: kept for the shared student interface (the history is not used).
        num_layers: propagation layers K.
        init_scale: initial logit scale s.
        device: where the parameters are created.
    """

    registry_name = "lightgcn"
    needs_users = True
    catalog_output = "computed"  # output_weight() is computed from the tables (the engine slices it)

    def __init__(self, num_items: int, num_users: int = 1, num_edges: int = 0, dim: int = 64, max_len: int = 50,
                 num_layers: int = 2, init_scale: float = 10.0, device=None):
        super().__init__()
        if num_items <= 0 or num_users <= 0 or num_edges < 0 or max_len <= 0 or num_layers < 0:
            raise ValueError(f"LightGCN: need num_items, num_users, max_len > 0 and num_edges, num_layers >= 0, got "
                             f"{num_items}, {num_users}, {max_len}, {num_edges}, {num_layers}")
        if dim <= 0 or dim % 4:
            raise ValueError(f"LightGCN: dim must be a positive multiple of 4 (FBGEMM table widths), got {dim}")
        if not init_scale > 0:
            raise ValueError(f"LightGCN: init_scale must be > 0, got {init_scale}")
        self.num_items, self.num_users, self.dim, self.max_len = num_items, num_users, dim, max_len
        self.num_layers = num_layers
        self.hparams = dict(num_users=num_users, num_edges=num_edges, dim=dim, max_len=max_len,
                            num_layers=num_layers, init_scale=init_scale)
        self.user_ec = item_embedding_collection(num_users, dim, device, table=USER_TABLE, feature=USER_FEATURE)
        self.item_ec = item_embedding_collection(num_items, dim, device, table=ITEM_TABLE, feature=ITEM_FEATURE)
        with torch.no_grad():
            for ec, t in ((self.user_ec, USER_TABLE), (self.item_ec, ITEM_TABLE)):
                nn.init.normal_(ec.embeddings[t].weight, std=0.1)
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_scale), device=device))  # [1]: DeepSpeed refuses 0-d
        self.register_buffer("edge_users", torch.zeros(num_edges, dtype=torch.long, device=device))
        self.register_buffer("edge_items", torch.zeros(num_edges, dtype=torch.long, device=device))
        self._cached: tuple[Tensor, Tensor] | None = None
        self._adj = None  # (edge-set key, sparse adjacency)

    # ---- data binding -------------------------------------------------------------------------------
    @classmethod
    def data_hparams(cls, split, **_) -> dict:
        return {"num_users": int(split.data.num_users), "num_edges": len(training_edges(split)[0])}

    def bind_data(self, split) -> None:
        check_bound(self, "num_users", self.num_users, split.data.num_users)
        eu, ei = training_edges(split)
        check_bound(self, "num_edges", self.hparams["num_edges"], len(eu))
        self.edge_users.copy_(torch.from_numpy(eu))
        self.edge_items.copy_(torch.from_numpy(ei))
        self._adj = None

    # ---- propagation --------------------------------------------------------------------------------
    def _all_rows(self, ec: nn.Module, feature: str, n: int) -> Tensor:
        dev = self.logit_scale.device
        ids = torch.arange(n, device=dev)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[feature], values=ids,
                                                  lengths=torch.ones(n, dtype=torch.int32, device=dev))
        return ec(kjt)[feature].values()

    def propagated(self) -> tuple[Tensor, Tensor]:
        """(users [U, d], items [C, d]) after propagation (cached inside ``propagation()``)."""
        if self._cached is not None:
            return self._cached
        user0 = self._all_rows(self.user_ec, USER_FEATURE, self.num_users)
        item0 = self._all_rows(self.item_ec, ITEM_FEATURE, self.num_items)
        return propagate(user0, item0, self.adjacency(), self.num_layers)

    def adjacency(self) -> Tensor:
        """The normalised adjacency of the bound edges (built once per edge set and device)."""
        key = (self.edge_users.data_ptr(), self.edge_users.device, int(self.edge_users.sum()) if self.edge_users.numel() else 0)
        if self._adj is None or self._adj[0] != key:
            self._adj = (key, normalized_adjacency(self.edge_users, self.edge_items, self.num_users, self.num_items))
        return self._adj[1]

    @contextlib.contextmanager
    def propagation(self):
        """Propagate once and serve every ``user_embedding`` / ``output_weight`` call inside from it
        (re-entrant: an inner context reuses the outer one's tables)."""
        if self._cached is not None:
            yield self._cached
            return
        self._cached = self.propagated()
        try:
            yield self._cached
        finally:
            self._cached = None

    # ---- the student interface ----------------------------------------------------------------------
    def user_embedding(self, history: Tensor | None = None, users: Tensor | None = None) -> Tensor:
        """[B, d] scaled propagated user rows (``score = user_embedding @ output_weight().T``)."""
        if users is None:
            raise ValueError("LightGCN is transductive: pass users=[B] user ids")
        users = users.to(self.logit_scale.device, torch.long)
        if users.numel() and (int(users.min()) < 0 or int(users.max()) >= self.num_users):
            raise ValueError(f"LightGCN: user ids must be in 0..{self.num_users - 1}")
        return self.logit_scale * self.propagated()[0][users]

    def output_weight(self) -> Tensor:
        return self.propagated()[1]

    def output_bias(self) -> Tensor | None:
        return None

    def forward(self, history: Tensor, users: Tensor) -> Tensor:
        return self.score(history, users)

    def score(self, history: Tensor, users: Tensor | None = None) -> Tensor:
        with self.propagation():
            return self.user_embedding(history, users) @ self.output_weight().T
