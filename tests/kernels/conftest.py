"""Kernel tests run the real Triton kernels; without a GPU they run in Triton's CPU interpreter.

TRITON_INTERPRET must be set before ``triton.jit`` decorates the kernels, i.e. before
``prmkd_dist.kernels.*`` is first imported; this conftest is imported before the test modules of this folder.
(``prmkd_dist.kernels._common`` also implies it on machines without CUDA, whatever imports it first.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run at all")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present (compiled kernels), else CPU (interpreted kernels)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------ test inputs
# Random but adversarial inputs: every case has empty slots (and a wholly empty teacher), the same id under
# several teachers, a teacher id equal to the target, a row without a target, a teacher with weight 0, an
# all-zero rank-weight teacher, and the last catalog column (C is never a multiple of a block size).

@dataclass
class TeacherCase:
    target: Tensor
    teacher_ids: Tensor
    teacher_scores: Tensor
    teacher_weights: Tensor
    rank_weights: Tensor | None

    def args(self, temperature: float, lambda_ce: float, lambda_kd: float, lambda_rank: float) -> tuple:
        """Positional arguments after the student's tensors, in the backend contract's order."""
        return (self.target, self.teacher_ids, self.teacher_scores, self.teacher_weights, self.rank_weights,
                temperature, lambda_ce, lambda_kd, lambda_rank)


def teacher_case(batch: int, n_items: int, n_teachers: int, k_slots: int, *, seed: int,
                 with_rank: bool, device: torch.device) -> TeacherCase:
    """Teacher inputs with every edge case the shapes allow (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, n_items, (batch,), generator=gen)
    target[0] = -1  # a row without cross-entropy
    ids = torch.randint(0, n_items, (batch, n_teachers, k_slots), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = -1  # scattered empty slots
    if n_teachers >= 1 and k_slots >= 1:
        ids[min(1, batch - 1), 0, :] = -1  # a wholly empty teacher
        ids[-1, 0, 0] = target[-1]  # a teacher id equal to the target
        ids[-1, 0, min(1, k_slots - 1)] = n_items - 1  # the last (ragged-tile) column
    if n_teachers >= 2 and k_slots >= 1:
        half = max(1, k_slots // 2)
        ids[:, 1, :half] = ids[:, 0, :half]  # the same ids under two teachers: their terms add
    scores = 3.0 * torch.randn((batch, n_teachers, k_slots), generator=gen)
    weights = torch.rand((batch, n_teachers), generator=gen)
    if n_teachers >= 1:
        weights[-1, -1] = 0.0
    rank = torch.rand((batch, n_teachers, k_slots), generator=gen) if with_rank else None
    if rank is not None and n_teachers >= 1:
        rank[-1, 0, :] = 0.0  # all-zero rank weights: rho_hat = 0
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    return TeacherCase(move(target), move(ids), move(scores), move(weights), move(rank))


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / scale if scale > 0 else diff


@pytest.fixture(scope="session")
def make_case():
    """``teacher_case`` as a fixture (test modules here are imported by path, not as a package)."""
    return teacher_case


@pytest.fixture(scope="session")
def relative_error():
    """``rel_err`` as a fixture."""
    return rel_err
