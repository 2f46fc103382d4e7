"""Fixtures of the training tests: the real ml-latest-small split, a tiny real student, tiny data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.models.base import SequentialStudent


@pytest.fixture(scope="session")
def ml_split(ml_small_split) -> LeaveOneOutSplit:
    """ml-latest-small (prepared by the data layer) as a leave-one-out split."""
    return ml_small_split


class MeanPoolStudent(SequentialStudent):
    """A real (tiny) student: causal running mean of item embeddings through one linear layer."""

    def __init__(self, num_items: int, dim: int = 16, max_len: int = 50):
        super().__init__(num_items, dim, max_len)
        self.proj = nn.Linear(dim, dim)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        e = self.embed_items(history)
        count = (history >= 0).cumsum(1).clamp(min=1).unsqueeze(-1)
        return self.proj(e.cumsum(1) / count)


def tiny_data(sequences: list[list[int]], num_items: int) -> InteractionData:
    """InteractionData from explicit per-user item lists (timestamps = positions)."""
    return InteractionData.from_sequences(sequences, num_items, name="tiny")