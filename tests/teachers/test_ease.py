"""EASE against its closed form, computed independently with numpy (float64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.teachers import EASE, TeacherError, load_teacher
from prmkd_dist.teachers.ease import gram_matrix

# 5 users x 6 items; each row = chronological sequence. The last two items of each sequence are the
# validation/test targets, so the TRAINING matrix is built from the prefixes below.
SEQUENCES = [
    [0, 1, 2, 2, 5, 4],  # training prefix [0, 1, 2, 2] (a repeat: X stays binary)
    [1, 2, 3, 0, 1],     # [1, 2, 3]
    [0, 3, 4, 5, 2],     # [0, 3, 4]
    [2, 4, 5, 1, 3, 0],  # [2, 4, 5, 1]
    [5, 0],              # < 3 interactions: all training, no targets
]
TRAIN_PREFIXES = [[0, 1, 2, 2], [1, 2, 3], [0, 3, 4], [2, 4, 5, 1], [5, 0]]


def tiny_split() -> LeaveOneOutSplit:
    lens = [len(s) for s in SEQUENCES]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = np.concatenate(SEQUENCES).astype(np.int64)
    data = InteractionData("tiny", len(SEQUENCES), 6, offsets, items, np.arange(len(items), dtype=np.int64),
                           np.array([f"i{i}" for i in range(6)], dtype=object),
                           np.array([f"u{u}" for u in range(len(SEQUENCES))], dtype=object))
    return LeaveOneOutSplit.of(data)


def numpy_ease(l2: float) -> np.ndarray:
    x = np.zeros((len(TRAIN_PREFIXES), 6))
    for u, seq in enumerate(TRAIN_PREFIXES):
        x[u, seq] = 1.0
    p = np.linalg.inv(x.T @ x + l2 * np.eye(6))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("l2", [0.5, 3.0])
def test_weights_equal_closed_form(l2):
    split = tiny_split()
    assert [list(split.train_sequence(u)) for u in range(5)] == TRAIN_PREFIXES
    teacher = EASE.fit(split, l2=l2)
    np.testing.assert_allclose(teacher.B.numpy(), numpy_ease(l2), rtol=1e-4, atol=1e-5)
    assert np.all(np.diag(teacher.B.numpy()) == 0.0)
    # scoring gathers rows of B: they must be contiguous (LAPACK's column-major P made Games scoring crawl)
    assert teacher.B.is_contiguous() and teacher.B.stride() == (6, 1)


def test_scores_are_binary_history_times_b():
    split = tiny_split()
    teacher = EASE.fit(split, l2=1.0)
    b = numpy_ease(1.0)
    history = torch.tensor([[PAD_ID, PAD_ID, 0, 3], [2, 2, 5, 2], [PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    expected = np.stack([b[0] + b[3], b[2] + b[5], np.zeros(6)])  # a repeated item counts once
    np.testing.assert_allclose(teacher.score(history).numpy(), expected, rtol=1e-4, atol=1e-5)
    ids, scores = teacher.topk(history, 3)
    assert not set(ids[0].tolist()) & {0, 3} and not set(ids[1].tolist()) & {2, 5}
    assert torch.all(scores[:, :-1] >= scores[:, 1:])


def test_gram_matrix_is_binary_cooccurrence():
    g = gram_matrix(tiny_split()).numpy()
    assert g[2, 2] == 3.0  # item 2 in users 0, 1, 3 (user 0 twice: counted once)
    assert g[0, 5] == 1.0 and g == pytest.approx(g.T)


def test_fit_select_keeps_best_and_round_trips(tmp_path):
    split = tiny_split()
    # a scoring function that prefers the larger l2, so the selection is known in advance
    best = EASE.fit_select(split, grid=(0.5, 5.0, 2.0), evaluate_fn=lambda t: t.l2)
    assert best.l2 == 5.0 and set(best.info["l2_grid"]) == {"0.5", "5.0", "2.0"}
    best.save(tmp_path / "ease")
    loaded = load_teacher(tmp_path / "ease", fingerprint=split.data.fingerprint)
    assert isinstance(loaded, EASE) and loaded.l2 == 5.0
    h = torch.tensor([[PAD_ID, 1, 4]])
    assert torch.equal(loaded.score(h), best.score(h))
    with pytest.raises(TeacherError, match="l2 must be > 0"):
        EASE.fit(split, l2=0.0)


def test_recent_reads_the_last_positions_and_round_trips(tmp_path):
    split = tiny_split()
    teacher = EASE.fit(split, l2=1.0, recent=2)
    b = numpy_ease(1.0)
    history = torch.tensor([[PAD_ID, 0, 3, 5], [1, 4, 2, 2], [PAD_ID, PAD_ID, PAD_ID, 4]])
    expected = np.stack([b[3] + b[5], b[2], b[4]])  # the last two positions; a repeat counts once
    np.testing.assert_allclose(teacher.score(history).numpy(), expected, rtol=1e-4, atol=1e-5)
    ids, _ = teacher.topk(history, 2)
    assert 0 not in ids[0].tolist()  # read or not, a seen item is no candidate
    assert teacher.max_len == 2 and teacher.config() == {"l2": 1.0, "recent": 2}
    teacher.save(tmp_path / "e")
    loaded = load_teacher(tmp_path / "e", fingerprint=split.data.fingerprint)
    assert loaded.recent == 2 and torch.equal(loaded.score(history), teacher.score(history))
    with pytest.raises(TeacherError, match="not additive"):
        teacher.additive_rows()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(TeacherError, match="recent must be a positive int"):
            EASE(6, split.data.fingerprint, recent=bad)
