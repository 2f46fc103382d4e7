"""DeepFM (Guo et al., 2017) over user id, recent history, item id and item attributes.

score(u, i) = b + first-order(u, i) + FM(fields) + DNN([fields]), with the fields and first-order terms of
``features.FeatureInteractionStudent``. FM is the pairwise term over all fields,
``sum_{f < g} <v_f, v_g> = 0.5 * (||sum_f v_f||^2 - sum_f ||v_f||^2)``; with user-side sum S_u and item-side sum
S_i it splits into a user constant, an item constant and ``<S_u, S_i>``, so only the dot product is per pair.
The DNN's first layer is split into user and item parts (features.py), the rest runs per pair.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from prmkd_dist.models.features import FeatureInteractionStudent, check_widths
from prmkd_dist.models.features import mlp as build_mlp


class DeepFM(FeatureInteractionStudent):
    """DeepFM student.

    Args:
        num_items: catalog size C.
        num_users: users U (data-derived; ``build_model`` sets it from the split).
        num_attributes: item attribute vocabulary (data-derived; 0 = no attribute field).
        dim: field embedding width (multiple of 4).
        max_len: most recent history items in the history field.
        mlp: hidden widths of the DNN (at least one layer).
        dropout: dropout after each hidden layer.
        item_attributes: "auto" (genres/tags where the dataset has them) or "none".
        device: where the parameters are created.
    """

    registry_name = "deepfm"

    def __init__(self, num_items: int, num_users: int = 1, num_attributes: int = 0, dim: int = 16,
                 max_len: int = 50, mlp: list | tuple = (64,), dropout: float = 0.1, item_attributes: str = "auto",
                 device=None):
        super().__init__(num_items, num_users, num_attributes, dim, max_len, device)
        widths = check_widths("DeepFM", mlp)
        if not widths:
            raise ValueError("DeepFM: mlp needs at least one hidden layer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"DeepFM: dropout must be in [0, 1), got {dropout}")
        self.hparams = dict(num_users=num_users, num_attributes=num_attributes, dim=dim, max_len=max_len,
                            mlp=list(widths), dropout=dropout, item_attributes=item_attributes)
        self.dnn_in = nn.Linear(self.num_fields * dim, widths[0], device=device)  # split into user/item parts
        self.dnn_drop = nn.Dropout(dropout)
        self.dnn_rest, last = build_mlp(widths[0], widths[1:], dropout, device)
        self.dnn_out = nn.Linear(last, 1, device=device)

    @staticmethod
    def fm_half(fields: Tensor) -> Tensor:
        """0.5 * (||sum_f v_f||^2 - sum_f ||v_f||^2) over the field axis (-2): the pairwise term within a side."""
        return 0.5 * (fields.sum(-2).pow(2).sum(-1) - fields.pow(2).sum((-2, -1)))

    def user_part(self, fields: Tensor, first: Tensor) -> dict:
        w = self.dnn_in.weight[:, :2 * self.dim]
        return {"sum": fields.sum(1), "const": first + self.fm_half(fields),
                "h": fields.flatten(1) @ w.T + self.dnn_in.bias}

    def item_part(self, fields: Tensor, first: Tensor) -> dict:
        w = self.dnn_in.weight[:, 2 * self.dim:]
        return {"sum": fields.sum(-2), "const": first + self.fm_half(fields), "h": fields.flatten(-2) @ w.T}

    def pair_scores(self, u: dict, i: dict) -> Tensor:
        fm_cross = torch.einsum("bd,bmd->bm", u["sum"], i["sum"].expand(u["sum"].shape[0], -1, -1))
        h = self.dnn_drop(torch.relu(u["h"][:, None] + i["h"]))
        dnn = self.dnn_out(self.dnn_rest(h)).squeeze(-1)
        return self.bias + u["const"][:, None] + i["const"] + fm_cross + dnn
