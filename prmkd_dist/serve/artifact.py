"""Load a serving artifact (written by ``serve.export``) and recommend from it.

This module is the serving side: it imports torch, safetensors and numpy only -- none of the training
code (``prmkd_dist.models``/``train``/``data``/``teachers``) -- so a serving process stays small and
does not depend on TorchRec. The exported program maps a history to a user vector ``u``; scores are
``u @ W.T (+ b)`` computed here:

- exact (default): the whole catalog, item chunk by item chunk with a running top-K, so that memory is
  ``B x item_chunk`` scores however large the catalog;
- approximate (``approximate=True``): IVF -- the items were clustered by k-means at export (after the
  inner-product-to-L2 transform of ``export.mips_augment``); a user scores only the items of the
  ``nprobe`` clusters nearest to it.

Item ids: internal ids are 0..C-1 (the student's columns); raw ids are the dataset's original ids
(``items.json``), compared as strings. Seen items (everything in the given history, not only the part
the model reads) are excluded by default. A row with fewer than ``k`` candidates left gets empty slots
at its end: id PAD_ID (-1) with score -inf.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prmkd_dist.constants import PAD_ID

ARTIFACT_FORMAT = "prmkd-dist/serving-artifact"
ARTIFACT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROGRAM_FILE = "encoder.pt2"
WEIGHTS_FILE = "weights.safetensors"
ITEMS_FILE = "items.json"
CONFIG_FILE = "config.json"

# scores materialised at once by exact scoring: batch x item chunk (64 MiB of float32)
SCORE_BLOCK = 1 << 24


class ArtifactError(ValueError):
    """A serving artifact directory is missing a file, is corrupt, or is of another format."""


class HistoryError(ValueError):
    """A history given to ``recommend`` holds an id that is not an item of the artifact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (not a serving artifact, or an incomplete copy)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None


class ServingArtifact:
    """An exported student ready to recommend. Build it with ``ServingArtifact.load(dir)``."""

    def __init__(self, directory: Path, manifest: dict, program, weights: dict[str, torch.Tensor],
                 raw_ids: list[str]):
        self.directory = directory
        self.manifest = manifest
        self.num_items: int = int(manifest["num_items"])
        self.dim: int = int(manifest["dim"])
        self.history_len: int = int(manifest["history_len"])
        self.item_fingerprint: str = manifest["item_fingerprint"]
        self._encoder = program.module()
        self._item_input = weights["item_input"]
        self._item_output = weights.get("item_output", self._item_input)
        self._item_bias = weights.get("item_bias")
        self._centroids = weights["ivf_centroids"]
        self._lists = weights["ivf_lists"]
        self.raw_ids = np.asarray(raw_ids, dtype=object)
        self._raw_to_id = {r: i for i, r in enumerate(raw_ids)}

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, verify: bool = True) -> "ServingArtifact":
        """Read and validate an artifact directory. With ``verify`` (default) every file's sha256 is
        checked against the manifest; any problem raises ArtifactError naming the file."""
        d = Path(directory)
        if not d.is_dir():
            raise ArtifactError(f"{d}: not a directory (expected a serving artifact from `prmkd-dist export`)")
        manifest_path = d / MANIFEST_FILE
        manifest = _read_json(manifest_path)
        if manifest.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{manifest_path}: format {manifest.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
        if manifest.get("version") != ARTIFACT_VERSION:
            raise ArtifactError(f"{manifest_path}: version {manifest.get('version')!r}, this loader reads "
                                f"version {ARTIFACT_VERSION}")
        required = ("num_items", "dim", "history_len", "item_fingerprint", "files")
        missing = [k for k in required if k not in manifest]
        if missing:
            raise ArtifactError(f"{manifest_path}: missing keys {missing}")
        files = manifest["files"]
        for name in (PROGRAM_FILE, WEIGHTS_FILE, ITEMS_FILE, CONFIG_FILE):
            path = d / name
            if name not in files:
                raise ArtifactError(f"{manifest_path}: does not list {name}")
            if not path.is_file():
                raise ArtifactError(f"{path}: missing (listed in {MANIFEST_FILE})")
            if path.stat().st_size != files[name]["bytes"]:
                raise ArtifactError(f"{path}: {path.stat().st_size} bytes, manifest says {files[name]['bytes']} "
                                    f"(truncated or replaced)")
            if verify and _sha256(path) != files[name]["sha256"]:
                raise ArtifactError(f"{path}: sha256 does not match {MANIFEST_FILE} (corrupt or edited)")

        c, dim = int(manifest["num_items"]), int(manifest["dim"])
        try:
            weights = load_file(str(d / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{d / WEIGHTS_FILE}: unreadable safetensors file ({e})") from None
        expected = {"item_input": (c, dim), "ivf_centroids": None, "ivf_lists": None}
        if not manifest.get("tied_output", True):
            expected["item_output"] = (c, dim)
        if manifest.get("has_bias", False):
            expected["item_bias"] = (c,)
        ivf_width = dim + int(bool(manifest.get("has_bias", False))) + 1  # [w, (b,) r], export.mips_augment
        if "ivf_centroids" in weights and (weights["ivf_centroids"].dim() != 2
                                           or weights["ivf_centroids"].shape[1] != ivf_width):
            raise ArtifactError(f"{d / WEIGHTS_FILE}: tensor 'ivf_centroids' has shape "
                                f"{tuple(weights['ivf_centroids'].shape)}, expected [n, {ivf_width}]")
        for key, shape in expected.items():
            if key not in weights:
                raise ArtifactError(f"{d / WEIGHTS_FILE}: missing tensor {key!r}")
            if shape is not None and tuple(weights[key].shape) != shape:
                raise ArtifactError(f"{d / WEIGHTS_FILE}: tensor {key!r} has shape {tuple(weights[key].shape)}, "
                                    f"expected {shape}")

        items = _read_json(d / ITEMS_FILE)
        raw_ids = items.get("raw_ids")
        if not isinstance(raw_ids, list) or len(raw_ids) != c:
            raise ArtifactError(f"{d / ITEMS_FILE}: 'raw_ids' must list the {c} raw item ids in id order")
        if items.get("item_fingerprint") != manifest["item_fingerprint"]:
            raise ArtifactError(f"{d / ITEMS_FILE}: item_fingerprint {items.get('item_fingerprint')!r} differs "
                                f"from {MANIFEST_FILE}'s {manifest['item_fingerprint']!r}")
        try:
            program = torch.export.load(str(d / PROGRAM_FILE))
        except Exception as e:  # torch raises several types for a bad archive
            raise ArtifactError(f"{d / PROGRAM_FILE}: cannot load the exported program ({type(e).__name__}: {e})") from None
        return cls(d, manifest, program, weights, [str(r) for r in raw_ids])

    # ---- ids ------------------------------------------------------------------------------------
    @property
    def num_lists(self) -> int:
        """Number of IVF clusters (approximate search)."""
        return int(self._centroids.shape[0])

    def lookup_raw(self, raw: Sequence) -> np.ndarray:
        """Raw item ids (compared as strings) -> int64 internal ids, PAD_ID where unknown."""
        return np.fromiter((self._raw_to_id.get(str(r), PAD_ID) for r in raw), dtype=np.int64, count=len(raw))

    def to_internal(self, histories: Sequence, raw_ids: bool = False) -> list[np.ndarray]:
        """Histories (each a sequence of ids, oldest first) -> int64 arrays of internal ids. Raises
        HistoryError naming the row and the id when an id is not an item of the artifact."""
        out = []
        for row, hist in enumerate(histories):
            if raw_ids:
                ids = self.lookup_raw(hist)
                unknown = np.flatnonzero(ids == PAD_ID)
                if len(unknown):
                    raise HistoryError(f"row {row}: raw item id {hist[unknown[0]]!r} is not in the artifact's "
                                       f"catalog ({self.num_items} items, {ITEMS_FILE}); {len(unknown)} unknown in this row")
            else:
                ids = np.asarray(hist, dtype=np.int64).reshape(-1)
                bad = (ids < 0) | (ids >= self.num_items)
                if bad.any():
                    raise HistoryError(f"row {row}: item id {int(ids[bad][0])} is not in 0..{self.num_items - 1}")
            out.append(ids)
        return out

    def to_raw(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Internal ids (any shape) -> raw ids (object array of str; None at PAD_ID)."""
        ids = np.asarray(ids)
        table = np.append(self.raw_ids, None)  # index -1 (PAD_ID) -> None
        return table[ids]

    def _pad(self, seqs: list[np.ndarray]) -> torch.Tensor:
        # the same left padding as training (prmkd_dist.data.dataset.left_pad), restated here so that
        # serving does not import the data package
        out = np.full((len(seqs), self.history_len), PAD_ID, dtype=np.int64)
        for i, s in enumerate(seqs):
            s = s[-self.history_len:]
            if len(s):
                out[i, self.history_len - len(s):] = s
        return torch.from_numpy(out)

    @staticmethod
    def _unpad(history: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        h = np.asarray(history.cpu() if isinstance(history, torch.Tensor) else history)
        if h.ndim != 2:
            raise HistoryError(f"a padded history batch must be [B, L], got shape {h.shape}")
        return [row[row != PAD_ID].astype(np.int64) for row in h]

    # ---- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, histories: Sequence | torch.Tensor, raw_ids: bool = False) -> torch.Tensor:
        """[B, d] user vectors of the histories (internal ids unless ``raw_ids``)."""
        seqs = self._unpad(histories) if isinstance(histories, (torch.Tensor, np.ndarray)) else histories
        return self._encode(self.to_internal(seqs, raw_ids))

    @torch.no_grad()
    def score(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded internal ids -> [B, C] scores over the whole catalog (the ``Scorer``
        protocol of ``prmkd_dist.train.evaluate``; no exclusion, no top-K)."""
        u = self._encode(self.to_internal(self._unpad(history)))
        s = u @ self._item_output.T
        return s if self._item_bias is None else s + self._item_bias

    def _encode(self, seqs: list[np.ndarray]) -> torch.Tensor:
        return self._encoder(self._pad(seqs), self._item_input)

    @torch.no_grad()
    def recommend(self, histories: Sequence | torch.Tensor, k: int = 10, exclude_seen: bool = True,
                  raw_ids: bool = False, approximate: bool = False,
                  nprobe: int | None = None) -> tuple[torch.Tensor | np.ndarray, torch.Tensor]:
        """Top-``k`` items for each history: ``(ids [B, k], scores [B, k] float32)``, best first.

        ``histories``: a list of id sequences (oldest first; any length, the model reads the most
        recent ``history_len``) or a left-padded ``[B, L]`` tensor of internal ids. ``raw_ids``: the
        histories hold raw item ids and the returned ids are raw too (object array, None at empty
        slots). ``approximate``: IVF search over the ``nprobe`` best clusters (default:
        ``default_nprobe``) instead of the whole catalog."""
        if not 0 < k <= self.num_items:
            raise ValueError(f"k must be in 1..{self.num_items}, got {k}")
        seqs = self._unpad(histories) if isinstance(histories, (torch.Tensor, np.ndarray)) else histories
        seqs = self.to_internal(seqs, raw_ids)
        if not seqs:
            ids, scores = torch.empty(0, k, dtype=torch.int64), torch.empty(0, k)
        else:
            u = self._encode(seqs)
            seen = seqs if exclude_seen else [np.empty(0, np.int64)] * len(seqs)
            if approximate:
                ids, scores = self._topk_ivf(u, seen, k, self.default_nprobe() if nprobe is None else nprobe)
            else:
                ids, scores = self._topk_exact(u, seen, k)
        return (self.to_raw(ids) if raw_ids else ids), scores

    def _topk_exact(self, u: torch.Tensor, seen: list[np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = u.shape[0]
        rows = torch.from_numpy(np.repeat(np.arange(b), [len(s) for s in seen]))
        cols = torch.from_numpy(np.concatenate(seen).astype(np.int64)) if b else torch.empty(0, dtype=torch.int64)
        chunk = max(k, SCORE_BLOCK // b)
        best_s = torch.full((b, 0), -math.inf)
        best_i = torch.empty((b, 0), dtype=torch.int64)
        for start in range(0, self.num_items, chunk):
            stop = min(start + chunk, self.num_items)
            s = u @ self._item_output[start:stop].T
            if self._item_bias is not None:
                s += self._item_bias[start:stop]
            inside = (cols >= start) & (cols < stop)
            s[rows[inside], cols[inside] - start] = -math.inf
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, torch.arange(start, stop).expand(b, -1)], dim=1)
            best_s, pos = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        best_i = best_i.masked_fill(torch.isinf(best_s), PAD_ID)
        return best_i, best_s

    def default_nprobe(self) -> int:
        """Clusters probed by default: a tenth of them (at least 1): ~10% of the catalog is scored."""
        return max(1, math.ceil(self.num_lists / 10))

    def _topk_ivf(self, u: torch.Tensor, seen: list[np.ndarray], k: int,
                  nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 1 <= nprobe <= self.num_lists:
            raise ValueError(f"nprobe must be in 1..{self.num_lists} (the artifact's IVF clusters), got {nprobe}")
        b = u.shape[0]
        # items were clustered as [w, (b,) r] (export.mips_augment); the query is [u, (1,) 0]: the nearest
        # centroids in L2 are those of largest q.c - |c|^2 / 2
        q = u if self._item_bias is None else torch.cat([u, u.new_ones(b, 1)], dim=1)
        cent = self._centroids
        probe = torch.topk(q @ cent[:, :-1].T - 0.5 * (cent * cent).sum(1), nprobe, dim=1).indices  # [B, nprobe]
        cand = self._lists[probe].reshape(b, -1)  # [B, M] item ids, PAD_ID in short lists
        m = cand.shape[1]
        out_i = torch.full((b, k), PAD_ID, dtype=torch.int64)
        out_s = torch.full((b, k), -math.inf)
        step = max(1, SCORE_BLOCK // max(m * self.dim, 1))  # bound the gathered [step, M, d] block
        for start in range(0, b, step):
            c = cand[start:start + step]
            safe = c.clamp(min=0)
            s = torch.bmm(self._item_output[safe], u[start:start + step, :, None]).squeeze(-1)
            if self._item_bias is not None:
                s += self._item_bias[safe]
            blocked = c < 0
            part = seen[start:start + step]
            if any(len(x) for x in part):
                seen_mask = torch.zeros(len(part), self.num_items, dtype=torch.bool)
                rows = torch.from_numpy(np.repeat(np.arange(len(part)), [len(x) for x in part]))
                seen_mask[rows, torch.from_numpy(np.concatenate(part).astype(np.int64))] = True
                blocked |= seen_mask.gather(1, safe)
            s = s.masked_fill(blocked, -math.inf)
            top_s, pos = torch.topk(s, min(k, m), dim=1)
            top_i = c.gather(1, pos).masked_fill(torch.isinf(top_s), PAD_ID)
            out_s[start:start + step, :top_s.shape[1]] = top_s
            out_i[start:start + step, :top_i.shape[1]] = top_i
        return out_i, out_s

    # ---- facts ----------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters of the served model (recorded at export)."""
        return int(self.manifest.get("num_parameters", 0))

    def size_bytes(self) -> int:
        """Bytes of the artifact's files."""
        return sum(int(f["bytes"]) for f in self.manifest["files"].values())

    def __repr__(self) -> str:
        return (f"ServingArtifact({str(self.directory)!r}, student={self.manifest.get('student')!r}, "
                f"items={self.num_items}, dim={self.dim}, history_len={self.history_len})")
