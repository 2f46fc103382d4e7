"""The seam between the training loop and where the model's parameters live.

The trainer never touches an optimizer, a process group or a sharded table directly: it calls an
**engine**. One process: :class:`LocalEngine` (Adam over every parameter, the full item table at hand).
Several processes: ``prmkd_dist.parallel.engine.DistributedEngine`` (TorchRec-sharded tables with fused
in-backward optimizers, the dense part under DeepSpeed). Both satisfy :class:`Engine`.

The loss over the catalog goes through the engine too (:meth:`Engine.linear_loss`), because only the
engine knows whether the output item table is whole on this process (then it is ``kd_loss_linear``) or
row-sharded across ranks (then it is the catalog-parallel form, on the batch gathered from all ranks).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from prmkd_dist.models.base import SequentialStudent


class OutputRows(NamedTuple):
    """This process's rows of the output item table: ids ``first_id .. first_id + weight.shape[0] - 1``."""

    weight: Tensor  # [C_local, d]
    bias: Tensor | None  # [C_local] or None
    first_id: int
    num_items: int


class Engine(Protocol):
    model: SequentialStudent  # forward/encode are called on this
    rank: int
    world_size: int

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def step(self, loss: Tensor) -> None:
        """Backward, optimizer step(s), gradient clipping, zeroing: one training step for ``loss``."""

    def output_rows(self) -> OutputRows: ...

    def linear_loss(self, hidden: Tensor, target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                    teacher_weights: Tensor, rank_weights: Tensor | None = None, **loss_kwargs) -> Tensor:
        """``kd_loss_linear(hidden, item table, target, teachers...)`` over the whole catalog, wherever the
        table lives. ``loss_kwargs``: temperature, lambda_ce, lambda_kd, lambda_rank, reduction."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LocalEngine:
    """One process: Adam over all parameters (TorchRec's unsharded tables included), optional gradient
    clipping, the fused loss through the dispatcher (C++ on CPU, Triton on CUDA)."""

    rank = 0
    world_size = 1

    def __init__(self, model: SequentialStudent, lr: float, weight_decay: float = 0.0, grad_clip: float = 0.0,
                 loss_backend: str = "auto"):
        self.model = model
        self.grad_clip = grad_clip
        self.loss_backend = loss_backend
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        self._stash: OutputRows | None = None

    def train(self) -> None:
        self._stash = None
        self.model.train()

    def eval(self) -> None:
        self._stash = None
        self.model.eval()

    def step(self, loss: Tensor) -> None:
        self._stash = None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()

    def output_rows(self) -> OutputRows:
        """The whole output table. In a training step (grad enabled) it is computed once and reused until
        ``step``: for a student whose table is a function of other parameters (embedding distillation, NKD)
        the losses of one step (KD, SLD, ...) then share one forward and one backward of it."""
        if self._stash is not None:
            return self._stash
        rows = OutputRows(self.model.output_weight(), self.model.output_bias(), 0, self.model.num_items)
        if torch.is_grad_enabled() and self.model.training:
            self._stash = rows
        return rows

    def linear_loss(self, hidden: Tensor, target: Tensor, teacher_ids: Tensor, teacher_scores: Tensor,
                    teacher_weights: Tensor, rank_weights: Tensor | None = None, **loss_kwargs) -> Tensor:
        from prmkd_dist.distill.loss import kd_loss_linear

        rows = self.output_rows()
        return kd_loss_linear(hidden, rows.weight, target, teacher_ids, teacher_scores, teacher_weights,
                              rank_weights, item_bias=rows.bias, backend=self.loss_backend, **loss_kwargs)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._stash = None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def no_teachers(n: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """Teacher tensors with T = 0 (plain full-softmax cross-entropy through the same loss)."""
    return (torch.empty(n, 0, 0, dtype=torch.long, device=device), torch.empty(n, 0, 0, device=device),
            torch.empty(n, 0, device=device))
