"""SASRec (Kang & McAuley, 2018): a causal self-attention student over left-padded histories.

Layout choices (all for left padding, most recent item at the right end):
- positional embeddings count from the right end: the most recent slot always gets position 0, so a
  history keeps the same encoding however much padding precedes it;
- pre-LN blocks, final LayerNorm, item embeddings scaled by sqrt(d), output tied to the item table;
- attention mask = causal AND key is a real item, OR the query itself (the diagonal): a padded query
  then attends only to itself instead of to nothing (an all-masked softmax row is NaN), and a real
  query never sees padding because padding only precedes real items.
Hidden states at padded positions are zeroed so that nothing downstream mistakes them for signal.

The class is general (width, depth, heads, FFN width, dropout) so that bigger SASRec teachers reuse it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prmkd_dist.constants import PAD_ID
from prmkd_dist.models.base import SequentialStudent


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)); x + FFN(LN(x)). The mask is built once per forward
    by the caller and shared by all blocks."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, device=None):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln_attn = nn.LayerNorm(dim, device=device)
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.proj = nn.Linear(dim, dim, device=device)
        self.ln_ffn = nn.LayerNorm(dim, device=device)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim, device=device),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim, device=device),
        )
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, d]; attn_mask bool [B, 1, L, L], True = may attend."""
        b, l, d = x.shape
        q, k, v = self.qkv(self.ln_attn(x)).view(b, l, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.resid_drop(self.proj(a.transpose(1, 2).reshape(b, l, d)))
        return x + self.resid_drop(self.ffn(self.ln_ffn(x)))

    def forward_last(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """``forward(x, mask)[:, -1]`` without the other positions' outputs: keys and values over all of x,
        the query, projection and FFN for the last position only. key_mask bool [B, 1, 1, L] (the mask's last
        row). x [B, L, d] -> [B, d]."""
        b, l, d = x.shape
        h = self.ln_attn(x)
        w, bias = self.qkv.weight, self.qkv.bias  # output features: [q | k | v], each d = heads x head_dim
        q = F.linear(h[:, -1:], w[:d], bias[:d]).view(b, 1, self.num_heads, d // self.num_heads).transpose(1, 2)
        k, v = F.linear(h, w[d:], bias[d:]).view(b, l, 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0)
        x = x[:, -1] + self.resid_drop(self.proj(a.reshape(b, d)))
        return x + self.resid_drop(self.ffn(self.ln_ffn(x)))


class SASRec(SequentialStudent):
    """Self-attentive sequential recommender.

    Args:
        num_items: catalog size C (item ids 0..C-1 are the logits' columns).
        dim: hidden width d (= item embedding width; output is tied to the item table).
        max_len: longest history accepted (size of the positional table); longer input is refused.
        num_layers: number of transformer blocks.
        num_heads: attention heads; must divide ``dim``.
        dropout: dropout on embeddings, attention weights, residual branches and inside the FFN.
        ffn_dim: inner width of the feed-forward layer (default 4 * dim).
        device: where the parameters are created.
    """

    registry_name = "sasrec"

    def __init__(self, num_items: int, dim: int = 64, max_len: int = 200, num_layers: int = 2, num_heads: int = 2,
                 dropout: float = 0.2, ffn_dim: int | None = None, device=None):
        super().__init__(num_items, dim, max_len, device)
        if num_layers < 1:
            raise ValueError(f"SASRec: num_layers must be >= 1, got {num_layers}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"SASRec: num_heads={num_heads} must be >= 1 and divide dim={dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SASRec: dropout must be in [0, 1), got {dropout}")
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        if ffn_dim < 1:
            raise ValueError(f"SASRec: ffn_dim must be >= 1, got {ffn_dim}")
        self.hparams = dict(dim=dim, max_len=max_len, num_layers=num_layers, num_heads=num_heads,
                            dropout=dropout, ffn_dim=ffn_dim)
        # row 0 = most recent slot (see module docstring)
        self.pos_emb = nn.Embedding(max_len, dim, device=device)
        # same scale as the sqrt(d)-scaled item embeddings (item table std d^-0.5 -> std 1 after scaling)
        nn.init.normal_(self.pos_emb.weight, std=1.0)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(dim, num_heads, ffn_dim, dropout, device) for _ in range(num_layers)
        )
        self.final_ln = nn.LayerNorm(dim, device=device)

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, d]; position l depends on items <= l only; zeros at padding."""
        x, valid, attn_mask = self._embed(history)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.final_ln(x) * valid.unsqueeze(-1)

    def user_embedding(self, history: torch.Tensor) -> torch.Tensor:
        """``encode(history)[:, -1]`` (the state that scores the next item) with the last block computed for the
        last position only: what serving and evaluation need, about 40 % fewer FLOPs at 2 layers."""
        x, valid, attn_mask = self._embed(history)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)
        x = self.blocks[-1].forward_last(x, attn_mask[:, :, -1:])
        return self.final_ln(x) * valid[:, -1:].to(x.dtype)

    def _embed(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input states [B, L, d], valid [B, L], attention mask [B, 1, L, L]) of a left-padded history."""
        if history.dim() != 2:
            raise ValueError(f"SASRec.encode: history must be [B, L], got shape {tuple(history.shape)}")
        l = history.shape[1]
        if l > self.max_len:
            raise ValueError(f"SASRec.encode: history length {l} exceeds max_len={self.max_len}; "
                             f"keep the most recent {self.max_len} items (prmkd_dist.data.dataset.left_pad)")
        valid = history != PAD_ID  # [B, L]
        positions = torch.arange(l - 1, -1, -1, device=history.device)  # right-aligned
        x = self.embed_items(history) * math.sqrt(self.dim) + self.pos_emb(positions)
        x = self.emb_drop(x)
        causal = torch.ones(l, l, dtype=torch.bool, device=history.device).tril()
        eye = torch.eye(l, dtype=torch.bool, device=history.device)
        attn_mask = ((causal & valid[:, None, :]) | eye).unsqueeze(1)  # [B, 1, L, L]
        return x, valid, attn_mask
