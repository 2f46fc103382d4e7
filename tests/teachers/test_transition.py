"""The item-transition teacher (SLIT) against its closed form, built independently with numpy loops (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.teachers import ItemTransition, TeacherError, load_teacher
from prmkd_dist.teachers import transition
from prmkd_dist.teachers.transition import transition_matrices

# the training prefixes are each sequence without its last two items (validation, test targets)
SEQUENCES = [
    [0, 1, 2, 2, 5, 4, 3],  # prefix [0, 1, 2, 2, 5]: a repeat inside the window adds its weights
    [1, 2, 3, 0, 1],        # [1, 2, 3]
    [0, 3, 4, 5, 2],        # [0, 3, 4]
    [2, 4, 5, 1, 3, 0],     # [2, 4, 5, 1]
    [5, 0],                 # < 3 interactions: all training
    [4],                    # one item: no transition at all
]


def split_of(sequences, num_items=6, domains=None) -> LeaveOneOutSplit:
    lens = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = np.concatenate(sequences).astype(np.int64)
    data = InteractionData("tiny", len(sequences), num_items, offsets, items, np.arange(len(items), dtype=np.int64),
                           np.array([f"i{i}" for i in range(num_items)], dtype=object),
                           np.array([f"u{u}" for u in range(len(sequences))], dtype=object), domains=domains)
    return LeaveOneOutSplit.of(data)


def numpy_transition_rows(split: LeaveOneOutSplit, window: int, decay: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, Y) dense float64, one row per training position with an earlier item (module doc of transition.py)."""
    c = split.data.num_items
    src, tgt = [], []
    for u in range(split.data.num_users):
        seq = split.train_sequence(u)
        for t in range(1, len(seq)):
            row = np.zeros(c)
            for d in range(1, min(window, t) + 1):
                row[seq[t - d]] += np.exp(-(d - 1) / decay)
            src.append(row)
            tgt.append(np.eye(c)[seq[t]])
    return np.array(src), np.array(tgt)


def numpy_slit(split: LeaveOneOutSplit, l2: float, window: int, decay: float) -> np.ndarray:
    s, y = numpy_transition_rows(split, window, decay)
    return np.linalg.solve(s.T @ s + l2 * np.eye(split.data.num_items), s.T @ y)


def numpy_slist(split: LeaveOneOutSplit, l2: float, window: int, decay: float, alpha: float) -> np.ndarray:
    """SLIST column by column: column j minimises alpha ||X_j - X b||^2 + (1 - alpha) ||Y_j - S b||^2 + l2 ||b||^2
    over b with b_j = 0, i.e. a ridge solve over the other C - 1 items (no Lagrange multiplier)."""
    c = split.data.num_items
    s, y = numpy_transition_rows(split, window, decay)
    x = np.zeros((split.data.num_users, c))
    for u in range(split.data.num_users):
        x[u, split.train_sequence(u)] = 1.0  # binary: a repeat is one interaction
    b = np.zeros((c, c))
    for j in range(c):
        keep = np.arange(c) != j
        design = np.vstack([np.sqrt(alpha) * x[:, keep], np.sqrt(1 - alpha) * s[:, keep]])
        target = np.concatenate([np.sqrt(alpha) * x[:, j], np.sqrt(1 - alpha) * y[:, j]])
        b[keep, j] = np.linalg.solve(design.T @ design + l2 * np.eye(c - 1), design.T @ target)
    return b


@pytest.mark.parametrize("rhs", ["sparse", "dense"])
@pytest.mark.parametrize("alpha,window,decay,l2", [(0.5, 3, 2.0, 1.0), (0.2, 10, 0.7, 0.5), (0.9, 1, 1.0, 2.0),
                                                   (0.0, 3, 2.0, 1.0)])
def test_slist_weights_equal_the_constrained_closed_form(alpha, window, decay, l2, rhs, monkeypatch):
    # both products of the right-hand side into P (a tiny catalog is dense: force each)
    monkeypatch.setattr(transition, "DENSE_RHS_DENSITY", 0.0 if rhs == "dense" else 2.0)
    split = split_of(SEQUENCES)
    if alpha == 0:  # SLIT: unconstrained
        teacher = ItemTransition.fit(split, l2=l2, window=window, decay=decay)
        np.testing.assert_allclose(teacher.B.numpy(), numpy_slit(split, l2, window, decay), rtol=1e-4, atol=1e-5)
        return
    teacher = ItemTransition.fit(split, l2=l2, window=window, decay=decay, alpha=alpha)
    np.testing.assert_allclose(teacher.B.numpy(), numpy_slist(split, l2, window, decay, alpha), rtol=1e-4, atol=1e-5)
    assert np.all(np.diag(teacher.B.numpy()) == 0) and teacher.B.is_contiguous()
    assert teacher.config()["alpha"] == alpha and teacher.info["alpha"] == alpha
    # the SLIS half changes the fit: not the SLIT weights with a zeroed diagonal
    slit = numpy_slit(split, l2, window, decay)
    np.fill_diagonal(slit, 0)
    assert np.abs(teacher.B.numpy() - slit).max() > 1e-2


def test_slist_round_trips_and_fits_domains_per_block(tmp_path):
    seqs = [[0, 1, 2, 1, 0], [1, 2, 0, 2], [2, 0, 1, 0, 1], [3, 4, 5, 4, 3], [4, 5, 3, 5], [5, 3, 4, 3]]
    from prmkd_dist.data.domains import Domain

    split = split_of(seqs, domains=[Domain("a", (0, 3), (0, 3)), Domain("b", (3, 6), (3, 6))])
    teacher = ItemTransition.fit(split, l2=1.0, window=2, decay=1.0, alpha=0.5)
    b = teacher.B.numpy()
    assert np.all(b[:3, 3:] == 0) and np.all(b[3:, :3] == 0)
    np.testing.assert_allclose(b[3:, 3:], numpy_slist(split_of([[i - 3 for i in q] for q in seqs[3:]], 3), 1.0, 2, 1.0, 0.5),
                               rtol=1e-4, atol=1e-5)
    teacher.save(tmp_path / "t")
    loaded = load_teacher(tmp_path / "t", fingerprint=split.data.fingerprint)
    assert loaded.alpha == 0.5 and torch.equal(loaded.B, teacher.B)


@pytest.mark.parametrize("window,decay,l2", [(1, 1.0, 0.5), (3, 2.0, 2.0), (10, 0.7, 1.0)])
def test_weights_equal_closed_form(window, decay, l2):
    split = split_of(SEQUENCES)
    teacher = ItemTransition.fit(split, l2=l2, window=window, decay=decay)
    np.testing.assert_allclose(teacher.B.numpy(), numpy_slit(split, l2, window, decay), rtol=1e-4, atol=1e-5)
    assert teacher.B.is_contiguous() and teacher.max_len == window


def test_score_is_the_decayed_window_times_b():
    split = split_of(SEQUENCES)
    teacher = ItemTransition.fit(split, l2=1.0, window=3, decay=2.0)
    b = teacher.B.numpy().astype(np.float64)
    w = np.exp(-np.arange(3) / 2.0)  # 1 for the most recent item
    history = torch.tensor([[PAD_ID, PAD_ID, 0, 3, 5], [1, 4, 2, 2, 0], [PAD_ID, PAD_ID, PAD_ID, PAD_ID, 4]])
    expected = np.stack([w[0] * b[5] + w[1] * b[3] + w[2] * b[0],
                         w[0] * b[0] + w[1] * b[2] + w[2] * b[2],  # the window: [2, 2, 0]; 4 and 1 are too old
                         w[0] * b[4]])
    np.testing.assert_allclose(teacher.score(history).numpy(), expected, rtol=1e-5, atol=1e-6)
    # a history shorter than the window reads the weights of its own positions
    np.testing.assert_allclose(teacher.score(history[:, -2:]).numpy()[0], w[0] * b[5] + w[1] * b[3], rtol=1e-5, atol=1e-6)


def test_transition_matrices_keep_user_boundaries():
    split = split_of(SEQUENCES)
    s, y = transition_matrices(split, window=10, decay=1e9)  # decay -> infinity: every weight 1
    # positions with an earlier item: 4 + 2 + 2 + 3 + 1 (the [5, 0] user) + 0 (the one-item user)
    assert s.shape == (12, 6) and y.shape == (12, 6)
    first = s[:4].toarray()  # user 0's positions 1..4 read [0], [0, 1], [0, 1, 2], [0, 1, 2, 2]
    np.testing.assert_allclose(first, [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 2, 0, 0, 0]])
    assert s[4].toarray().tolist() == [[0, 1, 0, 0, 0, 0]]  # user 1's first transition reads user 1's item only
    assert y.argmax(axis=1).A1.tolist()[:6] == [1, 2, 2, 5, 2, 3]


def test_domains_fit_per_block():
    # two domains (items 0-2, 3-5), no user crosses them: B is block diagonal and each block is its own fit
    seqs = [[0, 1, 2, 1, 0], [1, 2, 0, 2], [2, 0, 1, 0, 1], [3, 4, 5, 4, 3], [4, 5, 3, 5], [5, 3, 4, 3]]
    from prmkd_dist.data.domains import Domain

    domains = [Domain("a", (0, 3), (0, 3)), Domain("b", (3, 6), (3, 6))]
    split = split_of(seqs, domains=domains)
    teacher = ItemTransition.fit(split, l2=1.0, window=2, decay=1.0)
    b = teacher.B.numpy()
    assert np.all(b[:3, 3:] == 0) and np.all(b[3:, :3] == 0)
    np.testing.assert_allclose(b[:3, :3], numpy_slit(split_of(seqs[:3], 3), 1.0, 2, 1.0), rtol=1e-4, atol=1e-5)
    assert teacher.info["item_blocks"] == 2


def test_fit_select_keeps_best_and_round_trips(tmp_path):
    split = split_of(SEQUENCES)
    scores = {0.1: 0.2, 1.0: 0.9, 10.0: 0.5}
    teacher = ItemTransition.fit_select(split, grid=list(scores), window=2, decay=3.0,
                                        evaluate_fn=lambda t: scores[t.l2], name="slit")
    assert teacher.l2 == 1.0 and teacher.info["l2_grid"] == {"0.1": 0.2, "1.0": 0.9, "10.0": 0.5}
    assert teacher.config() == {"l2": 1.0, "window": 2, "decay": 3.0, "alpha": 0.0}
    teacher.save(tmp_path / "t")
    loaded = load_teacher(tmp_path / "t", fingerprint=split.data.fingerprint)
    history = torch.tensor([[PAD_ID, 0, 3, 5], [1, 4, 2, 2]])
    assert type(loaded) is ItemTransition and torch.equal(loaded.score(history), teacher.score(history))
    ids, _ = teacher.topk(history, 2)
    assert not set(ids[0].tolist()) & {0, 3, 5}  # seen items are no candidates
    with pytest.raises(TeacherError, match="grid is empty"):
        ItemTransition.fit_select(split, grid=[])


@pytest.mark.parametrize("kwargs,message", [({"window": 0}, "window must be a positive int"),
                                            ({"window": 2.5}, "window must be a positive int"),
                                            ({"decay": 0.0}, "decay must be a finite number > 0"),
                                            ({"decay": float("nan")}, "decay must be a finite number > 0"),
                                            ({"l2": -1.0}, "l2 must be > 0"),
                                            ({"alpha": 1.0}, r"alpha must be a number in \[0, 1\)"),
                                            ({"alpha": -0.1}, r"alpha must be a number in \[0, 1\)"),
                                            ({"alpha": True}, r"alpha must be a number in \[0, 1\)")])
def test_bad_hparams(kwargs, message):
    with pytest.raises(TeacherError, match=message):
        ItemTransition.fit(split_of(SEQUENCES), **kwargs)
