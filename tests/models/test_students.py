"""Behaviour of the sequential students: shapes, causality, padding, gradients, registry, learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import left_pad
from prmkd_dist.models import (STUDENTS, Caser, GRU4Rec, SASRec, StudentConfigError, build_student,
                               student_hparams)

C = 50
SMALL = {
    "sasrec": dict(dim=16, max_len=24, num_layers=2, num_heads=2, dropout=0.1),
    "gru4rec": dict(dim=16, max_len=24, num_layers=2, dropout=0.1, hidden=24),
    "caser": dict(dim=16, max_len=4, num_h_filters=3, num_v_filters=2, dropout=0.1),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(name, C, **SMALL[name])


def histories(b: int = 4, l: int = 12, seed: int = 1) -> torch.Tensor:
    """Left-padded histories with different lengths, including a full and an empty row."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, C, (b, l), generator=g)
    for i, n in enumerate([l, 7, 1, 0][:b]):
        h[i, : l - n] = PAD_ID
    return h


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_finite_and_zero_at_padding(name):
    m = make(name).eval()
    h = histories()
    out = m.encode(h)
    assert out.shape == (4, 12, 16)
    assert torch.isfinite(out).all()
    assert (out[h == PAD_ID] == 0).all()  # padding carries no signal
    assert (out[h != PAD_ID].abs().sum(-1) > 0).all()
    scores = m.score(h)
    assert scores.shape == (4, C) and torch.isfinite(scores).all()
    # score is the last hidden state against the output table
    expect = out[:, -1] @ m.output_weight().T
    if m.output_bias() is not None:
        expect = expect + m.output_bias()
    torch.testing.assert_close(scores, expect)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_causality(name):
    """Changing the item at position j changes positions >= j only."""
    m = make(name).eval()  # dropout would make two passes differ everywhere
    h = histories()
    base = m.encode(h)
    for j in (4, 9, 11):
        h2 = h.clone()
        real = h2[:, j] != PAD_ID
        h2[real, j] = (h2[real, j] + 1) % C
        out = m.encode(h2)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert (out[real, j] - base[real, j]).abs().max() > 1e-4  # the change is seen where it happens


@pytest.mark.parametrize("name", sorted(SMALL))
def test_padding_invariance(name):
    """The same history with more left padding encodes identically at every real position."""
    m = make(name).eval()
    h = histories(l=12)
    more = torch.cat([torch.full((4, 9), PAD_ID), h], dim=1)
    with torch.no_grad():
        a, b = m.encode(h), m.encode(more)
    torch.testing.assert_close(b[:, 9:], a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.score(more), m.score(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_torchrec_item_table(name):
    m = make(name)
    h = histories()
    loss = m.encode(h)[h != PAD_ID].pow(2).sum() + m.score(h).logsumexp(-1).sum()
    loss.backward()
    grad = m.item_table_weight().grad
    assert grad is not None
    seen = torch.zeros(C, dtype=torch.bool)
    seen[h[h != PAD_ID]] = True
    assert (grad[seen].abs().sum(-1) > 0).all()
    if name != "caser":  # tied output: every row gets the softmax gradient
        assert (grad.abs().sum(-1) > 0).all()
    else:  # untied: the output table and bias get it instead
        assert (m.output_weight().grad.abs().sum(-1) > 0).all()
        assert (m.output_bias().grad.abs() > 0).all()
        assert not m.output_weight() is m.item_table_weight()


def test_gru4rec_packing_matches_plain_gru_on_the_unpadded_sequence():
    m = make("gru4rec").eval()
    h = histories()
    with torch.no_grad():
        out = m.encode(h)
        for i in range(3):  # rows with at least one item
            real = h[i][h[i] != PAD_ID]
            e = m.embed_items(real[None])
            ref, _ = m.gru(e)
            torch.testing.assert_close(out[i, h.shape[1] - len(real):], m.proj(ref[0]), rtol=1e-5, atol=1e-6)


def test_caser_position_equals_its_window():
    """Position l is Caser's encoding of the max_len items ending at l (and of nothing older)."""
    m = make("caser").eval()
    w = m.max_len
    h = histories(l=12)
    with torch.no_grad():
        out = m.encode(h)
        for l in range(12):
            window = h[:, max(0, l - w + 1): l + 1]
            window = torch.cat([torch.full((4, w - window.shape[1]), PAD_ID), window], dim=1)
            torch.testing.assert_close(out[:, l], m.encode(window)[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_user_embedding_is_the_last_position_of_encode(name):
    # SASRec computes it with the last block trimmed to the last position: the same numbers up to float32
    # rounding (the TorchRec table stays float32, so the model does not run in float64)
    model = make(name).eval()
    h = histories(b=6, l=12)
    h[2] = PAD_ID  # an empty history
    with torch.no_grad():
        torch.testing.assert_close(model.user_embedding(h), model.encode(h)[:, -1], rtol=1e-5, atol=1e-6)


def test_sasrec_refuses_history_longer_than_max_len():
    m = make("sasrec")
    with pytest.raises(ValueError, match="exceeds max_len=24"):
        m.encode(torch.zeros(2, 25, dtype=torch.long))


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_heads=3"):
        SASRec(C, dim=16, num_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        GRU4Rec(C, dropout=1.0)
    with pytest.raises(ValueError, match="num_h_filters"):
        Caser(C, num_h_filters=0, num_v_filters=0)


def test_build_student_registry_and_errors():
    assert set(STUDENTS) == {"sasrec", "gru4rec", "caser", "deepfm", "dcnv2", "lightgcn"}
    assert set(student_hparams("gru4rec")) == {"dim", "max_len", "num_layers", "dropout", "hidden"}
    with pytest.raises(StudentConfigError, match=r"unknown student 'bert'.*'caser', 'dcnv2', 'deepfm', 'gru4rec', 'lightgcn', 'sasrec'"):
        build_student("bert", C)
    with pytest.raises(StudentConfigError, match=r"unknown hyper-parameter 'num_layer'.*'num_layers'"):
        build_student("sasrec", C, num_layer=3)
    with pytest.raises(StudentConfigError, match=r"'dim' must be <class 'int'>, got '64'"):
        build_student("sasrec", C, dim="64")
    with pytest.raises(StudentConfigError, match="'num_layers'"):
        build_student("gru4rec", C, num_layers=True)
    with pytest.raises(StudentConfigError, match="'hidden'"):
        build_student("gru4rec", C, hidden=2.5)
    assert isinstance(build_student("sasrec", C, dropout=0), SASRec)  # an int is a fine float
    assert build_student("gru4rec", C, hidden=None).hparams["hidden"] == 64


@pytest.mark.parametrize("name", sorted(SMALL))
def test_rebuild_from_recorded_hparams(name):
    m = make(name)
    clone = build_student(m.registry_name, m.num_items, **m.hparams)
    clone.load_state_dict(m.state_dict())
    h = histories()
    m.eval(), clone.eval()
    torch.testing.assert_close(clone.score(h), m.score(h))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_on_real_sequences_reduces_next_item_loss(name, ml_small_split):
    """A few Adam steps on 32 real ml-latest-small training prefixes lower the next-item loss."""
    split = ml_small_split
    seqs = [split.train_sequence(u) for u in range(32)]
    batch = torch.from_numpy(left_pad(seqs, 17))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    mask = (inputs != PAD_ID) & (targets != PAD_ID)
    hp = dict(SMALL[name], dim=32, max_len=16 if name != "caser" else 4)
    torch.manual_seed(0)
    m = build_student(name, split.data.num_items, **hp)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def loss_fn() -> torch.Tensor:
        logits = m.encode(inputs)[mask] @ m.output_weight().T
        if m.output_bias() is not None:
            logits = logits + m.output_bias()
        return F.cross_entropy(logits, targets[mask])

    m.eval()
    with torch.no_grad():
        before = loss_fn().item()
    m.train()
    for _ in range(10):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        after = loss_fn().item()
    assert np.isfinite(after) and after < before - 0.5, (before, after)
