"""Multi-domain datasets: several prepared datasets as the domains of one (CKD-MDSR / PRM-KD multi-domain training).

``combine_domains`` concatenates datasets into one ``InteractionData`` whose users and items are the domains'
own, renumbered into contiguous blocks (domain d's items are global ids [items_lo, items_hi), its users
[users_lo, users_hi)); ``data.domains`` records the blocks, and a combined dataset is saved and loaded like any
other (``prmkd-dist data combine``; ``meta.json`` carries the blocks). Everything that works on a dataset works on
it: one student trains on all domains' examples, teachers fit and export over the combined catalog, the shards
carry each example's ``domain_id``.

The one rule that changes is what a user is ranked against: a user of domain d is recommended domain d's items
only. ``restrict_to_domains`` applies it wherever a ranking over the catalog is taken (full-ranking evaluation,
the teachers' exported top-K, sampled negatives), and the evaluation reports metrics per domain next to the
overall ones (``"<domain>/NDCG@10"``...).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Domain", "combine_domains", "user_domain_ids", "restrict_to_domains", "domain_ranges"]


@dataclass(frozen=True)
class Domain:
    """One domain's blocks of global ids: items [items[0], items[1]), users [users[0], users[1])."""

    name: str
    items: tuple[int, int]
    users: tuple[int, int]

    def to_dict(self) -> dict:
        return {"name": self.name, "items": list(self.items), "users": list(self.users)}

    @classmethod
    def from_dict(cls, d: dict) -> "Domain":
        return cls(str(d["name"]), (int(d["items"][0]), int(d["items"][1])), (int(d["users"][0]), int(d["users"][1])))


def check_domains(domains: list[Domain], num_users: int, num_items: int, offsets: np.ndarray, items: np.ndarray,
                  where: str) -> str | None:
    """Why ``domains`` do not describe this data (blocks that do not tile the ids in order, a user with an item of
    another domain), or None. ``where`` names the dataset in the message."""
    if not domains:
        return f"{where}: an empty domain list (omit it for a single-domain dataset)"
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        return f"{where}: domain names must be distinct, got {names}"
    for kind, total in (("items", num_items), ("users", num_users)):
        expected = 0
        for d in domains:
            lo, hi = getattr(d, kind)
            if lo != expected or hi < lo:
                return (f"{where}: domain {d.name!r} holds {kind} [{lo}, {hi}), expected a block starting at {expected} "
                        f"(the domains' {kind} must tile 0..{total - 1} in order)")
            expected = hi
        if expected != total:
            return f"{where}: the domains' {kind} cover [0, {expected}), expected [0, {total})"
    for d in domains:
        lo, hi = d.items
        seq = items[offsets[d.users[0]]:offsets[d.users[1]]]
        outside = np.flatnonzero((seq < lo) | (seq >= hi))
        if len(outside):
            pos = offsets[d.users[0]] + int(outside[0])
            user = int(np.searchsorted(offsets, pos, side="right") - 1)
            return (f"{where}: user {user} of domain {d.name!r} has item {int(items[pos])}, outside the domain's "
                    f"items [{lo}, {hi})")
    return None


def combine_domains(datasets: list, name: str | None = None):
    """One ``InteractionData`` holding ``datasets`` (each an ``InteractionData``, at least two, distinct names) as
    domains, in the given order. Raw ids are kept and prefixed with the domain name (``"<domain>:<raw id>"``) so
    that they stay unique; item texts are kept where a domain has them."""
    from prmkd_dist.data.dataset import DatasetFormatError, InteractionData

    if len(datasets) < 2:
        raise DatasetFormatError(f"combine_domains: needs at least two datasets, got {len(datasets)}")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise DatasetFormatError(f"combine_domains: the datasets' names must be distinct (they name the domains), got {names}")
    for d in datasets:
        if getattr(d, "domains", None):
            raise DatasetFormatError(f"combine_domains: {d.name!r} is already multi-domain; combine its sources instead")
    domains, offsets, items, stamps, item_raw, user_raw, texts = [], [np.zeros(1, np.int64)], [], [], [], [], []
    u0 = i0 = n0 = 0
    for d in datasets:
        domains.append(Domain(d.name, (i0, i0 + d.num_items), (u0, u0 + d.num_users)))
        offsets.append(d.offsets[1:] + n0)
        items.append(d.items + i0)
        stamps.append(d.timestamps)
        item_raw.append(np.array([f"{d.name}:{x}" for x in d.item_raw_ids], dtype=object))
        user_raw.append(np.array([f"{d.name}:{x}" for x in d.user_raw_ids], dtype=object))
        texts.extend(d.item_text if d.item_text is not None else [None] * d.num_items)
        u0, i0, n0 = u0 + d.num_users, i0 + d.num_items, n0 + d.num_interactions
    return InteractionData(
        name=name or "+".join(names), num_users=u0, num_items=i0, offsets=np.concatenate(offsets),
        items=np.concatenate(items), timestamps=np.concatenate(stamps), item_raw_ids=np.concatenate(item_raw),
        user_raw_ids=np.concatenate(user_raw), item_text=texts if any(t is not None for t in texts) else None,
        source="combined:" + ",".join(f"{d.name}={d.fingerprint}" for d in datasets), domains=domains)


def user_domain_ids(data, users: np.ndarray) -> np.ndarray:
    """[n] int32 domain index of each user (0 for every user of a single-domain dataset)."""
    users = np.asarray(users, dtype=np.int64)
    if not data.domains:
        return np.zeros(len(users), dtype=np.int32)
    starts = np.array([d.users[0] for d in data.domains], dtype=np.int64)
    return (np.searchsorted(starts, users, side="right") - 1).astype(np.int32)


def domain_ranges(data, users: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """([n] lo, [n] hi) item-id range of each user's domain, or None for a single-domain dataset."""
    if not data.domains:
        return None
    dom = user_domain_ids(data, users)
    lo = np.array([d.items[0] for d in data.domains], dtype=np.int64)[dom]
    hi = np.array([d.items[1] for d in data.domains], dtype=np.int64)[dom]
    return lo, hi


def restrict_to_domains(scores: torch.Tensor, data, users: np.ndarray, fill: float = float("-inf")) -> torch.Tensor:
    """``scores`` [n, C] with every item outside row i's user's domain set to ``fill`` (a new tensor; the input
    is returned unchanged for a single-domain dataset)."""
    ranges = domain_ranges(data, users)
    if ranges is None:
        return scores
    lo, hi = (torch.from_numpy(r).to(scores.device) for r in ranges)
    cols = torch.arange(scores.shape[1], device=scores.device)
    outside = (cols[None, :] < lo[:, None]) | (cols[None, :] >= hi[:, None])
    return scores.masked_fill(outside, fill)
