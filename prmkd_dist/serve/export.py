"""Export a trained student into a self-contained serving artifact (read back by ``serve.artifact``).

What is exported, and why: the program (``encoder.pt2``, ``torch.export``) maps a left-padded history
``[B, L]`` plus the input item table ``[C, d]`` to the user vector ``[B, d]`` -- not to scores ``[B, C]``.
The catalog side of scoring is then one matrix product ``u @ W.T + b`` that the loader runs itself,
item chunk by item chunk with a running top-K (memory bounded for any C), and that the approximate
(IVF) mode can restrict to a few clusters of items: neither is possible once ``@ W.T`` is baked into
the program. The item table is a program *input* rather than a weight inside it, so it is stored once,
in ``weights.safetensors``, even when the output embeddings are tied to it.

TorchRec's EmbeddingCollection takes a KeyedJaggedTensor, which ``torch.export`` cannot trace; the
exported encoder is a dense equivalent (``dense_item_lookup``: a gather, zero at PAD_ID) of the same
student, and ``export_student`` checks on real histories that it reproduces the training model's user
vectors before it writes anything (``ExportCheckError`` otherwise).

Artifact layout (all listed with sha256 in ``manifest.json``)::

    manifest.json       format, version, model facts, files {name: {sha256, bytes}}
    encoder.pt2         torch.export program: (history [B, history_len] int64, item_table [C, d]) -> [B, d]
    weights.safetensors item_input [C, d]; item_output [C, d] (only if untied); item_bias [C] (only if
                        the student has one); ivf_centroids [n, d], ivf_lists [n, S] (approximate search)
    items.json          raw item ids in id order (id i <-> items[i]) and the dataset fingerprint
    config.json         student name + hyper-parameters, and the training config when given
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import InteractionData, left_pad
from prmkd_dist.models.base import SequentialStudent

from prmkd_dist.serve.artifact import (ARTIFACT_FORMAT, ARTIFACT_VERSION, CONFIG_FILE, ITEMS_FILE, MANIFEST_FILE,
                                       PROGRAM_FILE, WEIGHTS_FILE)

# the largest batch the exported program accepts (the batch dimension is dynamic up to it)
MAX_BATCH = 1 << 20


class ExportError(ValueError):
    """The student or its data cannot be exported as asked."""


class ExportCheckError(ExportError):
    """The dense exported encoder does not reproduce the training model (nothing is written)."""


def dense_item_lookup(history: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[B, L] left-padded ids -> [B, L, d] rows of ``table``, zero at PAD_ID: the dense equivalent of
    ``models.base.lookup_padded`` (which goes through TorchRec and cannot be exported)."""
    valid = history != PAD_ID
    return F.embedding(history.clamp(min=0), table) * valid.unsqueeze(-1).to(table.dtype)


def history_len(student: SequentialStudent) -> int:
    """How many of the most recent items the exported encoder reads.

    SASRec and GRU4Rec read ``max_len`` (as in training). Caser's user vector is its encoding of the
    last window of ``max_len`` items, so those few items are all it needs: the program then does the
    work of one window instead of sliding over a long history."""
    return student.max_len


class DenseUserEncoder(nn.Module):
    """``(history [B, L], item_table [C, d]) -> user vector [B, d]`` of a copy of ``student`` whose
    TorchRec tables are removed and whose item lookup is ``dense_item_lookup``."""

    def __init__(self, student: SequentialStudent):
        super().__init__()
        self.registry_name = getattr(student, "registry_name", type(student).__name__)
        body = copy.deepcopy(student).eval()
        # the tables travel in weights.safetensors; keeping them here would store them twice
        for name, child in list(body.named_children()):
            if type(child).__name__ == "EmbeddingCollection":
                delattr(body, name)
        self.body = body

    def forward(self, history: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        # an instance attribute shadows the class's TorchRec lookup for the code that calls it (encode)
        self.body.embed_items = lambda h: dense_item_lookup(h, item_table)
        if self.registry_name == "gru4rec":
            return self._gru4rec_user(history, item_table)
        return self.body.user_embedding(history)  # the model's own last-position path (SASRec: last block trimmed)

    def _gru4rec_user(self, history: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """GRU4Rec packs its sequences (data-dependent shapes, not exportable). Same result without
        packing: rotate each row so its items start at step 0, run the GRU over all L steps, and read
        the state at step n-1 -- a GRU is causal, so that state has seen exactly the n real items."""
        body = self.body
        b, l = history.shape
        valid = history != PAD_ID
        lengths = valid.sum(dim=1)
        x = dense_item_lookup(history, item_table)
        steps = torch.arange(l, device=history.device)
        to_front = (steps[None, :] + (l - lengths)[:, None]) % l
        x = x.gather(1, to_front.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        out, _ = body.gru(x)
        last = (lengths - 1).clamp(min=0)
        h = out.gather(1, last.view(b, 1, 1).expand(-1, 1, out.shape[-1])).squeeze(1)
        return body.proj(h) * (lengths > 0).unsqueeze(-1).to(h.dtype)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_histories(data: InteractionData, num: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Real histories for the export check: random users' sequences cut at random points, plus the
    longest sequence and an empty history (the edge cases of padding)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(data.num_users, size=min(num, data.num_users), replace=False)
    seqs = []
    for u in users:
        s = data.sequence(int(u))
        seqs.append(s[: rng.integers(1, len(s) + 1)] if len(s) else s)
    seqs.append(data.sequence(int(np.argmax(data.lengths()))))
    seqs.append(np.empty(0, dtype=np.int64))
    return seqs


def kmeans_ivf(vectors: torch.Tensor, num_lists: int, iters: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted lists of ``vectors [C, d]``: ``(centroids [n, d], lists [n, S])`` where row j of ``lists``
    holds the ids assigned to cluster j, padded with PAD_ID to the largest cluster size S.

    Plain (Lloyd's) k-means on the vectors as they are used for scoring; empty clusters are re-seeded
    with the points farthest from their centroid so that no list is wasted."""
    c = vectors.shape[0]
    n = max(1, min(num_lists, c))
    gen = torch.Generator().manual_seed(seed)
    x = vectors.detach().float()
    centroids = x[torch.randperm(c, generator=gen)[:n]].clone()
    x_sq = (x * x).sum(1, keepdim=True)
    for _ in range(iters):
        dist = x_sq - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=n)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None].float())
        if bool(empty.any()):
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    dist = x_sq - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    assign = dist.argmin(1)
    counts = torch.bincount(assign, minlength=n)
    lists = torch.full((n, int(counts.max())), PAD_ID, dtype=torch.int64)
    order = torch.argsort(assign, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(c) - starts[assign[order]]
    lists[assign[order], pos] = order
    return centroids, lists


def mips_augment(vectors: torch.Tensor) -> torch.Tensor:
    """[C, d] -> [C, d + 1]: append sqrt(M^2 - |x|^2) (M = the largest norm), so that every row has norm M.

    Scoring is a maximum inner product search, but k-means clusters by L2 distance. After this
    transform (Bachrach et al., 2014) a query [q, 0] is nearest in L2 to the items of largest q.x, so
    L2 clusters are the right ones for it; the loader probes clusters by the same L2 distance."""
    x = vectors.detach().float()
    sq = (x * x).sum(1)
    return torch.cat([x, (sq.max() - sq).clamp(min=0).sqrt()[:, None]], dim=1)


def default_num_lists(num_items: int) -> int:
    """About sqrt(C) clusters (the usual IVF choice): ~sqrt(C) items per list."""
    return max(1, int(round(math.sqrt(num_items))))


@torch.no_grad()
def export_student(model: SequentialStudent, data: InteractionData, out_dir: str | os.PathLike, *,
                   config: dict | None = None, ivf_lists: int | None = None, check_users: int = 256,
                   atol: float = 1e-4, overwrite: bool = False) -> Path:
    """Write the serving artifact of ``model`` (trained on ``data``'s item ids) to ``out_dir``.

    ``config``: the training config (a plain dict), stored for provenance. ``ivf_lists``: number of
    k-means clusters for approximate search (default ~sqrt(C)). Before writing, the exported program
    is run on ``check_users`` real histories and must match ``model.user_embedding`` within ``atol``
    (``ExportCheckError`` otherwise). Returns the artifact directory."""
    if getattr(model, "needs_users", False):  # DeepFM, DCN-v2, LightGCN: scored from user ids, not a history encoder
        raise ExportError(f"student {getattr(model, 'registry_name', type(model).__name__)!r} scores user ids (a "
                          f"data-bound student): the serving artifact exports sequential history encoders only")
    if model.num_items != data.num_items:
        raise ExportError(f"model has {model.num_items} items, dataset {data.name!r} has {data.num_items}: "
                          f"not the item-id space it was trained on")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: directory exists and is not empty (pass overwrite=True / --overwrite)")
    was_training = model.training
    model.eval()
    try:
        model_cpu = copy.deepcopy(model).cpu().float()
    finally:
        model.train(was_training)
    l = history_len(model_cpu)
    item_input = model_cpu.item_table_weight().detach().contiguous()
    out_w = model_cpu.output_weight().detach()
    tied = out_w.data_ptr() == item_input.data_ptr()
    bias = model_cpu.output_bias()

    encoder = DenseUserEncoder(model_cpu).eval()
    example = torch.from_numpy(left_pad(check_histories(data, 4, seed=1), l))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        program = torch.export.export(encoder, (example, item_input),
                                      dynamic_shapes={"history": {0: batch}, "item_table": None})
    except Exception as e:  # torch raises many types here; name the model and keep the cause
        raise ExportError(f"torch.export failed for student {encoder.registry_name!r}: {e}") from e

    # the check: exported program vs the training model (TorchRec lookup) on real histories
    seqs = check_histories(data, check_users)
    # Caser: the model reads a long history, the program only its last window -- the check covers that
    model_len = max(l, 64) if encoder.registry_name == "caser" else l
    expected = model_cpu.user_embedding(torch.from_numpy(left_pad(seqs, model_len)))
    got = program.module()(torch.from_numpy(left_pad(seqs, l)), item_input)
    err = (got - expected).abs().max().item()
    if not math.isfinite(err) or err > atol:
        raise ExportCheckError(f"exported {encoder.registry_name!r} encoder differs from the training model by "
                               f"{err:.3g} (> atol {atol}) on real histories of {data.name!r}; nothing written")

    num_lists = default_num_lists(data.num_items) if ivf_lists is None else int(ivf_lists)
    if num_lists < 1:
        raise ExportError(f"ivf_lists must be >= 1, got {num_lists}")
    centroids, lists = kmeans_ivf(mips_augment(out_w if bias is None else torch.cat([out_w, bias.detach()[:, None]], 1)),
                                  num_lists)

    # written into a sibling staging directory, then moved in: a failure half-way leaves no partial artifact
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        tensors = {"item_input": item_input, "ivf_centroids": centroids.contiguous(), "ivf_lists": lists.contiguous()}
        if not tied:
            tensors["item_output"] = out_w.contiguous()
        if bias is not None:
            tensors["item_bias"] = bias.detach().contiguous()
        save_file(tensors, str(stage / WEIGHTS_FILE))
        program.example_inputs = None  # they hold a copy of the item table (the largest tensor): stored once, above
        torch.export.save(program, str(stage / PROGRAM_FILE))
        (stage / ITEMS_FILE).write_text(json.dumps({
            "dataset": data.name, "item_fingerprint": data.fingerprint,
            "raw_ids": [str(r) for r in data.item_raw_ids]}))
        (stage / CONFIG_FILE).write_text(json.dumps({
            "student": encoder.registry_name, "hparams": dict(getattr(model, "hparams", {})),
            "training_config": config}, indent=2, default=str))
        files = {name: {"sha256": _sha256(stage / name), "bytes": (stage / name).stat().st_size}
                 for name in (PROGRAM_FILE, WEIGHTS_FILE, ITEMS_FILE, CONFIG_FILE)}
        manifest = {
            "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION,
            "student": encoder.registry_name, "num_items": data.num_items, "dim": int(item_input.shape[1]),
            "history_len": l, "tied_output": tied, "has_bias": bias is not None,
            "num_parameters": sum(p.numel() for p in model_cpu.parameters()),
            "dataset": data.name, "item_fingerprint": data.fingerprint,
            "export_check": {"histories": len(seqs), "max_abs_error": err, "atol": atol},
            "files": files,
        }
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        out.mkdir(exist_ok=True)
        for name in (PROGRAM_FILE, WEIGHTS_FILE, ITEMS_FILE, CONFIG_FILE, MANIFEST_FILE):  # the manifest last
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # empty after success; the partial files after a failure
    return out
