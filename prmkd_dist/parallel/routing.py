"""Routing the catalog-parallel loss's selected ids to the ranks that own them, and values back (all-to-all).

With data-parallel batches each rank brings the selected ids [b, M] of its own rows (the target and the teachers'
top-K, global ids, -1 = empty) and every rank holds a contiguous range of the item table. Only the owner of an id
can compute its logit, and only the owner applies its gradient. All-gathering every rank's ids would make each
rank scan all W ranks' entries (W times its share, and W times the bytes); here each id travels once, to its owner:

- :func:`route_ids` (forward): one pass groups a rank's entries by owner (``route_by_owner``: the C++ op on CPU,
  :func:`route_by_owner_reference` elsewhere), one small all-to-all exchanges the sizes and one all-to-all the ids.
  The owner receives its entries as a CSR over the global batch's rows (ranks in order, as
  :func:`~prmkd_dist.parallel.collectives.all_gather_dim0` orders them): ``ids`` [E] local row numbers of its shard
  and ``ptr`` [B + 1].
- :meth:`RoutedIds.to_senders`: the owner's values at its entries (the logits) back into each sender's [b, M]
  (0 at the empty slots), one all-to-all.
- :meth:`RoutedIds.to_owners`: the senders' values at their entries (the logits' gradients) to the owners, in the
  order of ``ids``, one all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from prmkd_dist.distill import cpp_backend

__all__ = ["RoutedIds", "route_ids", "route_by_owner", "route_by_owner_reference", "csr_to_dense"]


def route_by_owner_reference(ids: Tensor, lo: Tensor, hi: Tensor, head: Tensor | None = None
                             ) -> tuple[Tensor, Tensor, Tensor]:
    """What ``torch.ops.prmkd.route_by_owner`` computes (csrc/route.cpp), in tensor ops: for ids [b, M] (global,
    -1 = empty; with ``head`` [b], the [b, 1 + M] of head then ids) and the ranks' ranges [lo[q], hi[q]), (send
    int32: per owner q in rank order, the b per-row counts of q's entries then their ids - lo[q]; splits int64
    [W] = b + E_q; pos int64: each sent entry's flat index)."""
    if head is not None:
        ids = torch.cat([head.reshape(-1, 1).to(ids.dtype), ids], dim=1)
    b, m = ids.shape
    flat = ids.reshape(-1).to(torch.int64)
    owner = torch.full_like(flat, -1)
    for q in range(lo.shape[0]):
        owner[(flat >= int(lo[q])) & (flat < int(hi[q]))] = q
    stray = (flat != -1) & (owner < 0)
    if bool(stray.any()):
        i = int(stray.nonzero()[0, 0])
        raise ValueError(f"route_by_owner: ids[{i // m}, {i % m}] = {int(flat[i])} is on no rank's shard "
                         f"(ranges {list(zip(lo.tolist(), hi.tolist()))})")
    pieces, pos, splits = [], [], []
    for q in range(lo.shape[0]):
        mine = (owner == q).nonzero().flatten()  # ascending flat index: rows, then slots
        counts = torch.bincount(mine // max(m, 1), minlength=b)[:b]
        pieces += [counts.to(torch.int32), (flat[mine] - int(lo[q])).to(torch.int32)]
        pos.append(mine)
        splits.append(b + mine.numel())
    return torch.cat(pieces), torch.tensor(splits, dtype=torch.int64, device=ids.device), torch.cat(pos)


def route_by_owner(ids: Tensor, lo: Tensor, hi: Tensor, head: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``ids`` [b, M] (after ``head`` [b] as the first column, if given) grouped by owning rank (see
    :func:`route_by_owner_reference`): the C++ op (one counting pass, one write pass; it reads ``head`` where it
    lies, no concatenation) for CPU tensors when the extension is built, the tensor-op reference otherwise."""
    if ids.device.type == "cpu" and cpp_backend.available()[0]:
        return torch.ops.prmkd.route_by_owner(
            ids.to(torch.int64).contiguous(), lo.contiguous(), hi.contiguous(),
            None if head is None else head.to(torch.int64).contiguous())
    return route_by_owner_reference(ids, lo, hi, head)


def csr_to_dense(ids: Tensor, ptr: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A CSR (row b's ids at ptr[b] .. ptr[b + 1] - 1) as a dense [B, max row length] padded with -1, for backends
    that take the dense form only; also each entry's (row, column) in it, to read per-entry values back."""
    counts = ptr[1:] - ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=ids.device), counts)
    cols = torch.arange(ids.shape[0], device=ids.device) - ptr[:-1][rows]
    width = int(counts.max()) if counts.numel() else 0
    dense = torch.full((counts.shape[0], width), -1, dtype=torch.int64, device=ids.device)
    dense[rows, cols] = ids.to(torch.int64)
    return dense, rows, cols


@dataclass
class RoutedIds:
    """The entries a rank owns, from every rank's rows: ``ids`` [E] (int32 as they arrive: rows of its shard),
    ``ptr`` [B + 1] (int64) over the global batch's rows; and what it takes to send values along the same
    routes."""
    ids: Tensor
    ptr: Tensor
    pos: Tensor             # [sum sent]: flat index in this rank's [b, M] of each entry it sent, in send order
    sent: list[int]         # entries this rank sent to each rank
    received: list[int]     # entries this rank received from each rank
    shape: tuple[int, int]  # this rank's [b, M]
    group: object
    _dense: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    def dense(self) -> tuple[Tensor, Tensor, Tensor]:
        """``csr_to_dense(ids, ptr)``, built once (forward and backward of a backend without the CSR form)."""
        if self._dense is None:
            self._dense = csr_to_dense(self.ids, self.ptr)
        return self._dense

    def to_senders(self, values: Tensor) -> Tensor:
        """The owner's ``values`` [E] (one per received entry) -> this rank's [b, M], 0 where it sent nothing."""
        back = values.new_empty(sum(self.sent))
        dist.all_to_all_single(back, values.contiguous(), self.sent, self.received, group=self.group)
        n = self.shape[0] * self.shape[1]
        # zeros only where a slot was empty (teachers' lists are usually full: then every slot is written)
        out = values.new_empty(n) if back.shape[0] == n else values.new_zeros(n)
        return out.index_copy_(0, self.pos, back).view(self.shape)  # (index_copy_: less overhead than out[pos] =)

    def to_owners(self, own: Tensor) -> Tensor:
        """This rank's ``own`` [b, M] values at the entries it sent -> the owners' [E], in the order of ``ids``."""
        out = own.new_empty(sum(self.received))
        dist.all_to_all_single(out, own.reshape(-1).index_select(0, self.pos), self.received, self.sent,
                               group=self.group)
        return out


def route_ids(sel_ids: Tensor, sizes: list[int], lo: Tensor, hi: Tensor, group, head: Tensor | None = None
              ) -> RoutedIds:
    """Every rank's ``sel_ids`` [sizes[rank], M] (after ``head`` [sizes[rank]] as their first column, if given)
    sent to the ranks owning them (rank q: items [lo[q], hi[q])); every rank must call it. Two all-to-alls: the
    split sizes, then the counts and ids."""
    b, m = sel_ids.shape[0], sel_ids.shape[1] + (head is not None)
    send, splits, pos = route_by_owner(sel_ids, lo, hi, head)
    recv_splits = torch.empty_like(splits)
    dist.all_to_all_single(recv_splits, splits, group=group)
    recv_splits = recv_splits.tolist()
    splits = splits.tolist()
    recv = send.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, splits, group=group)
    counts, parts, off = [], [], 0
    for n_rows, n in zip(sizes, recv_splits):  # from rank p: its b_p per-row counts, then its entries for us
        counts.append(recv[off:off + n_rows])
        parts.append(recv[off + n_rows:off + n])
        off += n
    ptr = torch.zeros(sum(sizes) + 1, dtype=torch.int64, device=sel_ids.device)
    torch.cumsum(torch.cat(counts).to(torch.int64), 0, out=ptr[1:])
    return RoutedIds(ids=torch.cat(parts), ptr=ptr, pos=pos,
                     sent=[s - b for s in splits], received=[r - n_rows for r, n_rows in zip(recv_splits, sizes)],
                     shape=(b, m), group=group)
