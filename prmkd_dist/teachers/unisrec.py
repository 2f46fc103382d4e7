"""A UniSRec-style text-based teacher (after Hou et al., "Towards Universal Sequence Representation
Learning for Recommender Systems", KDD 2022).

Item representation = MoE adaptor(frozen text embedding) (+ a learned ID embedding, the "transductive"
setting). The adaptor is a mixture of parametric-whitening experts, ``(x - b_k) W_k``, combined by a
softmax gate on the text embedding. A causal transformer (the project's SASRec blocks) encodes the
sequence of adapted item representations; scores are cosine similarities divided by a temperature,
``normalize(h) . normalize(item_repr) / tau``, as in UniSRec, so that they are well-scaled logits.

Because it shares SASRec's encoder and exposes ``encode``/``output_weight``, the network is a
``SequentialStudent`` and the project's trainer (full-softmax CE, early stopping) trains it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import InteractionData
from prmkd_dist.models.base import lookup_padded
from prmkd_dist.models.sasrec import SASRec
from prmkd_dist.teachers.base import SequentialModelTeacher, TeacherError, register_teacher, seed_init
from prmkd_dist.teachers.text_encoder import DEFAULT_MODEL, EMBEDDING_DIM, item_text_embeddings


class MoEAdaptor(nn.Module):
    """Mixture of ``num_experts`` parametric-whitening experts ``dropout(x - b_k) @ W_k`` [text_dim -> dim],
    weighted by ``softmax(x @ W_gate)``."""

    def __init__(self, text_dim: int, dim: int, num_experts: int, dropout: float):
        super().__init__()
        if num_experts < 1:
            raise TeacherError(f"MoEAdaptor: num_experts must be >= 1, got {num_experts}")
        self.bias = nn.Parameter(torch.zeros(num_experts, text_dim))
        self.weight = nn.Parameter(torch.empty(num_experts, text_dim, dim))
        nn.init.normal_(self.weight, std=text_dim ** -0.5)
        self.gate = nn.Linear(text_dim, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)  # start as a uniform mixture
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, text_dim] -> [N, dim]."""
        gates = torch.softmax(self.gate(x), dim=-1)  # [N, E]
        centered = self.dropout(x.unsqueeze(1) - self.bias)  # [N, E, text_dim]
        experts = torch.einsum("net,etd->ned", centered, self.weight)  # [N, E, dim]
        return torch.einsum("ne,ned->nd", gates, experts)


class UniSRecNetwork(SASRec):
    """SASRec encoder over adapted text representations. ``text_emb`` [C, text_dim] is a frozen buffer."""

    registry_name = "unisrec"

    def __init__(self, num_items: int, text_dim: int = EMBEDDING_DIM, dim: int = 256, max_len: int = 50,
                 num_layers: int = 2, num_heads: int = 4, dropout: float = 0.2, num_experts: int = 8,
                 adaptor_dropout: float = 0.2, use_id_embedding: bool = True, temperature: float = 0.07):
        super().__init__(num_items, dim, max_len, num_layers, num_heads, dropout)
        if temperature <= 0:
            raise TeacherError(f"UniSRec: temperature must be > 0, got {temperature}")
        self.hparams.update(text_dim=text_dim, num_experts=num_experts, adaptor_dropout=adaptor_dropout,
                            use_id_embedding=use_id_embedding, temperature=temperature)
        self.register_buffer("text_emb", torch.zeros(num_items, text_dim))
        self.adaptor = MoEAdaptor(text_dim, dim, num_experts, adaptor_dropout)
        self.use_id_embedding = use_id_embedding
        self.temperature = temperature
        if not use_id_embedding:
            # the inherited ID table stays (TorchRec EC of the base class) but is zero and frozen
            with torch.no_grad():
                self.item_table_weight().zero_()
            self.item_table_weight().requires_grad_(False)

    def _item_repr(self, text: torch.Tensor) -> torch.Tensor:
        # unit text vectors through N(0, 1/text_dim) experts give std ~text_dim^-0.5 per coordinate: the same
        # scale as SASRec's ID table (std d^-0.5), so neither part drowns the other after SASRec's sqrt(d)
        return self.adaptor(text)

    def _catalog_text_repr(self) -> torch.Tensor:
        """adaptor(text_emb) for the whole catalog [C, dim]. At inference (eval mode, no autograd) it is
        cached: the 8-expert adaptor over every item costs ~8 GFLOP on ml-latest-small and does not change
        between batches. The cache is keyed on the versions of the adaptor's parameters and of the text
        buffer (every in-place update, optimiser step or load_state_dict bumps them)."""
        if self.training or torch.is_grad_enabled():
            return self._item_repr(self.text_emb)
        key = tuple((t.data_ptr(), t._version) for t in (self.text_emb, *self.adaptor.parameters()))
        cached = getattr(self, "_text_repr_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._item_repr(self.text_emb))
            self._text_repr_cache = cached
        return cached[1]

    def embed_items(self, history: torch.Tensor) -> torch.Tensor:
        mask = history != PAD_ID
        text = self._item_repr(self.text_emb[history[mask]])
        out = lookup_padded(self.item_ec, history) if self.use_id_embedding else text.new_zeros(*history.shape, self.dim)
        out = out.clone()
        out[mask] = out[mask] + text
        return out

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """Cosine-logit form: unit hidden states divided by the temperature (zeros at padding)."""
        return F.normalize(super().encode(history), dim=-1) / self.temperature

    def output_weight(self) -> torch.Tensor:
        w = self._catalog_text_repr()
        if self.use_id_embedding:
            w = w + self.item_table_weight()
        return F.normalize(w, dim=-1)


@register_teacher
class UniSRecTeacher(SequentialModelTeacher):
    """Text-based teacher (frozen MiniLM item-text embeddings + MoE adaptor + transformer).

    Build one with ``UniSRecTeacher.from_data(data, ...)`` (embeds the item texts, cached), train it with
    ``prmkd_dist.teachers.training.fit_teacher``."""

    kind = "unisrec"

    def __init__(self, num_items: int, item_fingerprint: str, name: str | None = None, text_dim: int = EMBEDDING_DIM,
                 text_model: str = DEFAULT_MODEL, dim: int = 256, max_len: int = 50, num_layers: int = 2,
                 num_heads: int = 4, dropout: float = 0.2, num_experts: int = 8, adaptor_dropout: float = 0.2,
                 use_id_embedding: bool = True, temperature: float = 0.07):
        super().__init__(num_items, item_fingerprint, name)
        self.hparams = dict(text_dim=text_dim, text_model=text_model, dim=dim, max_len=max_len, num_layers=num_layers,
                            num_heads=num_heads, dropout=dropout, num_experts=num_experts,
                            adaptor_dropout=adaptor_dropout, use_id_embedding=use_id_embedding, temperature=temperature)
        self.model = UniSRecNetwork(num_items, text_dim, dim, max_len, num_layers, num_heads, dropout, num_experts,
                                    adaptor_dropout, use_id_embedding, temperature)

    def config(self) -> dict:
        return dict(self.hparams)

    @classmethod
    def from_data(cls, data: InteractionData, text_embeddings: torch.Tensor | None = None, name: str | None = None,
                  allow_missing_text: bool = False, cache_dir: str | None = None, seed: int | None = None,
                  **hparams) -> "UniSRecTeacher":
        """A fresh (untrained) teacher over ``data``'s items, with their text embedded by ``text_model``
        (or the given ``text_embeddings`` [C, text_dim]); ``seed`` (if given) seeds torch's RNG after the text
        is embedded and right before the network is built (see ``seed_init``)."""
        if text_embeddings is None:
            text_embeddings = item_text_embeddings(data, model=hparams.get("text_model", DEFAULT_MODEL),
                                                   cache_dir=cache_dir, allow_missing=allow_missing_text)
        if text_embeddings.shape[0] != data.num_items:
            raise TeacherError(f"UniSRec: {text_embeddings.shape[0]} text embeddings for {data.num_items} items of {data.name!r}")
        if hparams.setdefault("text_dim", int(text_embeddings.shape[1])) != text_embeddings.shape[1]:
            raise TeacherError(f"UniSRec: text_dim={hparams['text_dim']} but the text embeddings are {text_embeddings.shape[1]}-d")
        seed_init(seed)
        teacher = cls(data.num_items, data.fingerprint, name, **hparams)
        teacher.model.text_emb.copy_(text_embeddings)
        return teacher
