"""Fixtures of the serving tests: briefly trained students of each architecture on ml-latest-small,
and their exported artifacts (module-independent: trained and exported once per session)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.models import build_student
from prmkd_dist.serve.export import export_student
from prmkd_dist.train.trainer import trainable_users, training_batch

# the training history length; Caser's own window is 5 (its max_len), so its artifact reads 5 items
TRAIN_LEN = 30
STUDENTS = {
    "sasrec": dict(dim=32, max_len=TRAIN_LEN, num_layers=1, num_heads=2, dropout=0.1),
    "gru4rec": dict(dim=32, max_len=TRAIN_LEN, dropout=0.1),
    "caser": dict(dim=32, max_len=5, num_h_filters=8, num_v_filters=2, dropout=0.1),
}


def brief_training(name: str, split: LeaveOneOutSplit, steps: int = 4, batch: int = 32, seed: int = 0):
    """A student trained for a few seconds: enough to move its weights far from initialisation."""
    torch.manual_seed(seed)
    model = build_student(name, split.data.num_items, **STUDENTS[name])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    users = np.random.default_rng(seed).permutation(trainable_users(split))
    model.train()
    for s in range(steps):
        start = (s * batch) % len(users)  # cycle over the ~600 users
        inputs, targets = training_batch(split, users[start:start + batch], TRAIN_LEN)
        # plain full-softmax next-item CE: the serving tests need moved weights, not the trainer's engine
        mask = targets >= 0
        logits = model.encode(inputs)[mask] @ model.output_weight().T
        if model.output_bias() is not None:
            logits = logits + model.output_bias()
        loss = F.cross_entropy(logits, targets[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_students(ml_small_split) -> dict:
    return {name: brief_training(name, ml_small_split) for name in STUDENTS}


@pytest.fixture(scope="session")
def artifacts(trained_students, ml_small, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {name: export_student(model, ml_small, root / name, ivf_lists=64)
            for name, model in trained_students.items()}
