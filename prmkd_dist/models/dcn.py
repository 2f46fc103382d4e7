"""DCN-v2 (Wang et al., 2021), stacked form: cross network, then a DNN, over the same fields as DeepFM.

x_0 = [user fields; item fields] (D = F * dim); cross layer l: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``
(elementwise product), with a full D x D ``W_l`` or, with ``cross_rank`` r > 0, the paper's low-rank
``W_l = U_l V_l`` (D x r, r x D). Then ``logit = w^T DNN(x_L) + first-order(u, i)``: the first-order id
biases (as in a wide part) are an addition to the paper. The first cross layer's ``W_0 x_0`` is split into
user and item parts (features.py); the other layers run per pair.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from prmkd_dist.models.features import FeatureInteractionStudent, check_widths
from prmkd_dist.models.features import mlp as build_mlp


class CrossLayer(nn.Module):
    """``x0 * (W x + b) + x`` with a full or low-rank W."""

    def __init__(self, width: int, rank: int = 0, device=None):
        super().__init__()
        if rank:
            self.v = nn.Linear(width, rank, bias=False, device=device)
            self.u = nn.Linear(rank, width, device=device)
        else:
            self.w = nn.Linear(width, width, device=device)
        self.rank = rank

    def linear(self, x: Tensor) -> Tensor:
        return self.u(self.v(x)) if self.rank else self.w(x)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x

    def dense_weight(self) -> Tensor:
        """The D x D matrix W (for the split first layer and for tests)."""
        return self.u.weight @ self.v.weight if self.rank else self.w.weight

    @property
    def bias(self) -> Tensor:
        return self.u.bias if self.rank else self.w.bias


class DCNv2(FeatureInteractionStudent):
    """DCN-v2 student.

    Args:
        num_items, num_users, num_attributes, dim, max_len, item_attributes, device: as DeepFM.
        num_cross_layers: cross layers (>= 1).
        cross_rank: 0 = full-rank W; r > 0 = low-rank U V with inner width r.
        mlp: hidden widths of the DNN after the cross network (may be empty).
        dropout: dropout after each hidden layer.
    """

    registry_name = "dcnv2"

    def __init__(self, num_items: int, num_users: int = 1, num_attributes: int = 0, dim: int = 16,
                 max_len: int = 50, num_cross_layers: int = 2, cross_rank: int = 0, mlp: list | tuple = (64,),
                 dropout: float = 0.1, item_attributes: str = "auto", device=None):
        super().__init__(num_items, num_users, num_attributes, dim, max_len, device)
        widths = check_widths("DCNv2", mlp)
        if num_cross_layers < 1 or cross_rank < 0:
            raise ValueError(f"DCNv2: need num_cross_layers >= 1 and cross_rank >= 0, got {num_cross_layers}, "
                             f"{cross_rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DCNv2: dropout must be in [0, 1), got {dropout}")
        self.hparams = dict(num_users=num_users, num_attributes=num_attributes, dim=dim, max_len=max_len,
                            num_cross_layers=num_cross_layers, cross_rank=cross_rank, mlp=list(widths),
                            dropout=dropout, item_attributes=item_attributes)
        width = self.num_fields * dim
        self.cross = nn.ModuleList(CrossLayer(width, cross_rank, device) for _ in range(num_cross_layers))
        self.dnn, last = build_mlp(width, widths, dropout, device)
        self.out = nn.Linear(last, 1, device=device)

    def user_part(self, fields: Tensor, first: Tensor) -> dict:
        x = fields.flatten(1)
        w = self.cross[0].dense_weight()[:, :x.shape[1]]
        return {"x": x, "a": x @ w.T + self.cross[0].bias, "first": first}

    def item_part(self, fields: Tensor, first: Tensor) -> dict:
        x = fields.flatten(-2)
        w = self.cross[0].dense_weight()[:, -x.shape[-1]:]
        return {"x": x, "a": x @ w.T, "first": first}

    def pair_scores(self, u: dict, i: dict) -> Tensor:
        b, m = u["x"].shape[0], i["x"].shape[1]
        x0 = torch.cat([u["x"][:, None].expand(-1, m, -1), i["x"].expand(b, -1, -1)], dim=-1)
        x = x0 * (u["a"][:, None] + i["a"]) + x0  # the first cross layer, its linear part split
        for layer in self.cross[1:]:
            x = layer(x0, x)
        return self.out(self.dnn(x)).squeeze(-1) + self.bias + u["first"][:, None] + i["first"]
