"""Routing selected ids to their owning ranks (prmkd_dist/parallel/routing.py, csrc/route.cpp): the C++ grouping
against its tensor-op reference, the CSR form of the C++ catalog-local ops against their dense form, and the
all-to-all round trips with 3 real gloo processes (uneven rows, a rank without items, a rank without rows).

The workers are this file run as a script (``python test_routing.py RANK WORLD PORT OUT``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prmkd_dist.distill import cpp_backend
from prmkd_dist.parallel.routing import csr_to_dense, route_by_owner, route_by_owner_reference

needs_cpp = pytest.mark.skipif(not cpp_backend.available()[0], reason=cpp_backend.available()[1])

# 4 ranks over 50 items, ranges not in rank order, rank 2 holding none
LO = torch.tensor([30, 0, 30, 12])
HI = torch.tensor([50, 12, 30, 30])


def random_ids(b: int, m: int, n_items: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, n_items, (b, m), generator=g)
    ids[torch.rand(b, m, generator=g) < 0.25] = -1
    return ids


@needs_cpp
@pytest.mark.parametrize("b,m", [(9, 7), (1, 1), (0, 5), (6, 0), (40, 151)])
def test_cpp_grouping_matches_reference(b, m):
    ids = random_ids(b, m, seed=b * 100 + m)
    got = torch.ops.prmkd.route_by_owner(ids, LO, HI)
    want = route_by_owner_reference(ids, LO, HI)
    for g, w, what in zip(got, want, ("send", "splits", "pos")):
        assert g.dtype == w.dtype, what
        assert torch.equal(g, w), f"{what}: {g} vs {w}"
    send, splits, pos = got
    # each owner's part: b row counts, then its ids (local to its range); every non-empty id sent exactly once
    assert splits.tolist() == [b + int(((ids >= lo) & (ids < hi)).sum()) for lo, hi in zip(LO.tolist(), HI.tolist())]
    assert sorted(pos.tolist()) == (ids.reshape(-1) >= 0).nonzero().flatten().tolist()


@pytest.mark.parametrize("grouping", ["cpp", "reference"])
@pytest.mark.parametrize("b,m", [(9, 7), (1, 0), (0, 5), (40, 150)])
def test_head_column_equals_concatenation(grouping, b, m):
    """``head`` (the target column, read where it lies) routes exactly as the concatenated [b, 1 + M] matrix."""
    if grouping == "cpp" and not cpp_backend.available()[0]:
        pytest.skip(cpp_backend.available()[1])
    fn = torch.ops.prmkd.route_by_owner if grouping == "cpp" else route_by_owner_reference
    ids = random_ids(b, m, seed=7 * b + m)
    head = random_ids(b, 1, seed=11 * b + m).reshape(-1)
    got = fn(ids, LO, HI, head)
    want = route_by_owner_reference(torch.cat([head[:, None], ids], dim=1), LO, HI)
    for g, w, what in zip(got, want, ("send", "splits", "pos")):
        assert torch.equal(g, w), f"{what}: {g} vs {w}"


@needs_cpp
def test_head_column_errors_name_column_zero():
    with pytest.raises(RuntimeError, match=r"ids\[1, 0\] = 60 is on no rank's shard"):
        torch.ops.prmkd.route_by_owner(torch.tensor([[1, 2], [3, 4]]), LO, HI, torch.tensor([5, 60]))
    with pytest.raises(RuntimeError, match=r"head must be a contiguous int64 CPU \[b = 2\] tensor"):
        torch.ops.prmkd.route_by_owner(torch.tensor([[1, 2], [3, 4]]), LO, HI, torch.tensor([5, 6, 7]))


@needs_cpp
def test_pooled_outputs_stay_valid():
    """route_by_owner's outputs come from a reused buffer pool: outputs kept alive must never be handed out
    again, and outputs freed on another thread (gloo's worker frees what it sent) return to the same pool."""
    import threading

    kept = []
    for seed in range(6):  # more live outputs than the pool keeps
        ids = random_ids(300, 151, seed=seed)
        kept.append((ids, [t.clone() for t in torch.ops.prmkd.route_by_owner(ids, LO, HI)],
                     torch.ops.prmkd.route_by_owner(ids, LO, HI)))
    for ids, copies, live in kept:
        for c, t in zip(copies, live):
            assert torch.equal(c, t)
    outs = [torch.ops.prmkd.route_by_owner(random_ids(300, 151, seed=s), LO, HI) for s in range(4)]
    t = threading.Thread(target=outs.clear)
    t.start()
    t.join()
    ids = random_ids(300, 151, seed=99)
    again = torch.ops.prmkd.route_by_owner(ids, LO, HI)
    want = route_by_owner_reference(ids, LO, HI)
    for g, w in zip(again, want):
        assert torch.equal(g, w)


@needs_cpp
@pytest.mark.parametrize("with_head", [False, True])
def test_ranges_with_gaps(with_head):
    """Ranges that leave gaps (before the first and between two) take the op's general path: same grouping as
    the reference for ids inside the ranges, and an id in a gap is named."""
    lo, hi = torch.tensor([20, 5]), torch.tensor([40, 15])
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(5, 15, (30, 4), generator=g), torch.randint(20, 40, (30, 4), generator=g)], 1)
    ids[torch.rand(30, 8, generator=g) < 0.2] = -1
    head = ids[:, 0].clone() if with_head else None
    body = ids[:, 1:].contiguous() if with_head else ids
    for got, want in zip(torch.ops.prmkd.route_by_owner(body, lo, hi, head), route_by_owner_reference(ids, lo, hi)):
        assert torch.equal(got, want)
    for bad in (3, 17):
        ids2 = ids.clone()
        ids2[4, 2] = bad
        with pytest.raises(RuntimeError, match=rf"ids\[4, 2\] = {bad} is on no rank's shard"):
            torch.ops.prmkd.route_by_owner(ids2, lo, hi)


@needs_cpp
def test_pooled_outputs_in_a_forked_child():
    """The buffer pool (and its lock, released around fork()) works in a forked child, as in DataLoader workers."""
    ids = random_ids(300, 151, seed=5)
    want = [t.tolist() for t in route_by_owner_reference(ids, LO, HI)]
    kept = torch.ops.prmkd.route_by_owner(ids, LO, HI)  # a pooled block alive across the fork
    pid = os.fork()
    if pid == 0:  # child: exit status 0 only if the op runs and matches (no OpenMP-parallel torch op here: GNU
        # OpenMP cannot run in a child forked after the parent used its threads, a limitation of its own)
        ok = [t.tolist() for t in torch.ops.prmkd.route_by_owner(ids, LO, HI)] == want
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert [t.tolist() for t in kept] == want


def test_grouping_by_hand():
    ids = torch.tensor([[0, 5, -1, 9], [3, 3, 7, -1]])
    send, splits, pos = route_by_owner(ids, torch.tensor([0, 5]), torch.tensor([5, 10]))
    assert send.tolist() == [1, 2, 0, 3, 3, 2, 1, 0, 4, 2]  # rank 0: counts 1, 2; ids 0, 3, 3 | rank 1: 2, 1; 0, 4, 2
    assert splits.tolist() == [5, 5]
    assert pos.tolist() == [0, 4, 5, 1, 3, 6]


@pytest.mark.parametrize("grouping", ["cpp", "reference"])
def test_ids_on_no_shard_are_refused(grouping):
    if grouping == "cpp" and not cpp_backend.available()[0]:
        pytest.skip(cpp_backend.available()[1])
    fn = torch.ops.prmkd.route_by_owner if grouping == "cpp" else route_by_owner_reference
    ids = torch.tensor([[1, 2], [3, 60]])
    with pytest.raises((RuntimeError, ValueError), match=r"ids\[1, 1\] = 60 is on no rank's shard"):
        fn(ids, LO, HI)
    if grouping == "cpp":
        with pytest.raises(RuntimeError, match=r"ids\[0, 1\] = -3: item ids must be >= -1"):
            fn(torch.tensor([[1, -3]]), LO, HI)


def test_csr_to_dense():
    ids = torch.tensor([4, 1, 7, 2, 2])
    ptr = torch.tensor([0, 2, 2, 5])
    dense, rows, cols = csr_to_dense(ids, ptr)
    assert dense.tolist() == [[4, 1, -1], [-1, -1, -1], [7, 2, 2]]
    assert torch.equal(dense[rows, cols], ids)


@needs_cpp
@pytest.mark.parametrize("bias", [True, False])
def test_cpp_catalog_local_csr_matches_dense(bias):
    """The C++ catalog-local ops give the same statistics, picked logits and gradients whether the selected ids
    come dense (global ids, the op keeps its shard's) or as the CSR of the shard's entries only (local ids)."""
    g = torch.Generator().manual_seed(1)
    B, R, d, offset = 37, 1100, 8, 300
    user = torch.randn(B, d, generator=g)
    item = torch.randn(R, d, generator=g)
    b = torch.randn(R, generator=g) if bias else None
    ids = torch.randint(0, 2000, (B, 13), generator=g)
    ids[torch.rand(B, 13, generator=g) < 0.2] = -1
    ids[5] = ids[4]  # duplicates
    m0, z0, t0, sel0 = cpp_backend.catalog_local_stats(user, item, b, 1.5, None, ids, offset)
    owned = (ids >= offset) & (ids < offset + R)
    csr_ids = (ids[owned] - offset)
    ptr = torch.zeros(B + 1, dtype=torch.int64)
    ptr[1:] = owned.sum(1).cumsum(0)
    m1, z1, t1, sel1 = cpp_backend.catalog_local_stats(user, item, b, 1.5, None, csr_ids, 0, sel_ptr=ptr)
    for x, y in ((m0, m1), (z0, z1), (t0, t1)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert sel1.shape == (int(owned.sum()),)
    torch.testing.assert_close(sel1, sel0[owned], rtol=0, atol=0)
    assert bool((sel0[~owned] == 0).all())
    # int32 CSR ids (as the routed ids arrive) give the same, bit for bit
    sel32 = cpp_backend.catalog_local_stats(user, item, b, 1.5, None, csr_ids.to(torch.int32), 0, sel_ptr=ptr)[3]
    assert torch.equal(sel32, sel1)

    lse1 = (m0 + z0.log()).float()
    lse_t = (m0 / 1.5 + t0.log()).float()
    c1, ct = torch.randn(B, generator=g), torch.randn(B, generator=g)
    grad = torch.randn(B, 13, generator=g)
    dense = cpp_backend.catalog_local_grad(user, item, b, c1, ct, lse1, lse_t, ids, grad, 1.5, None, offset)
    csr = cpp_backend.catalog_local_grad(user, item, b, c1, ct, lse1, lse_t, csr_ids, grad[owned].contiguous(), 1.5,
                                         None, 0, sparse_ptr=ptr)
    csr32 = cpp_backend.catalog_local_grad(user, item, b, c1, ct, lse1, lse_t, csr_ids.to(torch.int32),
                                           grad[owned].contiguous(), 1.5, None, 0, sparse_ptr=ptr)
    for x, y, z in zip(dense, csr, csr32):
        if x is None:
            assert y is None and z is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
            assert torch.equal(y, z)


@needs_cpp
def test_cpp_csr_pointer_is_checked():
    user, item = torch.randn(3, 4), torch.randn(10, 4)
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match="row pointer of sel_idx must run from 0 to E = 3"):
        cpp_backend.catalog_local_stats(user, item, None, 1.0, None, ids, 0, sel_ptr=torch.tensor([0, 1, 2, 2]))
    with pytest.raises(RuntimeError, match="row pointer of sel_idx decreases at row 1"):
        cpp_backend.catalog_local_stats(user, item, None, 1.0, None, ids, 0, sel_ptr=torch.tensor([0, 2, 1, 3]))


# ------------------------------------------------------------------------------------------ multi-process
WORLD = 3
ROWS = [5, 0, 8]              # rank 1 brings no rows
RANGES = [(0, 20), (20, 20), (20, 47)]  # rank 1 holds no items


def worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from prmkd_dist.parallel.routing import route_ids

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        all_ids = random_ids(sum(ROWS), 9, n_items=47, seed=7)
        lo_row = sum(ROWS[:rank])
        mine = all_ids[lo_row:lo_row + ROWS[rank]]
        lo = torch.tensor([r[0] for r in RANGES])
        hi = torch.tensor([r[1] for r in RANGES])
        routed = route_ids(mine, ROWS, lo, hi, None)
        # the owner sees exactly its entries of every row of the global batch, in row and slot order
        a, b = RANGES[rank]
        want_rows = [[int(v) - a for v in row if a <= v < b] for row in all_ids]
        got_rows = [routed.ids[routed.ptr[r]:routed.ptr[r + 1]].tolist() for r in range(sum(ROWS))]
        assert got_rows == want_rows, (rank, got_rows, want_rows)
        # owner -> senders: a value computed from (global row, item) comes back to the right slot
        rows = torch.repeat_interleave(torch.arange(sum(ROWS)), routed.ptr[1:] - routed.ptr[:-1])
        back = routed.to_senders((rows * 1000 + routed.ids + a).double())
        local_rows = torch.arange(lo_row, lo_row + ROWS[rank])[:, None].double()
        want = torch.where(mine >= 0, local_rows * 1000 + mine, torch.zeros((), dtype=torch.float64))
        assert torch.equal(back, want), (rank, back, want)
        # senders -> owners: each entry's value arrives in the order of routed.ids
        arrived = routed.to_owners(mine.double() * 10 + local_rows)
        assert torch.equal(arrived, ((routed.ids + a) * 10 + rows).double()), rank
        # full lists (no empty slot: every slot of to_senders' output is written, none zero-filled), the first
        # column routed as the head (as the loss routes its targets)
        full = all_ids.clamp(min=0)[lo_row:lo_row + ROWS[rank]]
        routed_full = route_ids(full[:, 1:].contiguous(), ROWS, lo, hi, None, head=full[:, 0].contiguous())
        rows = torch.repeat_interleave(torch.arange(sum(ROWS)), routed_full.ptr[1:] - routed_full.ptr[:-1])
        back = routed_full.to_senders((rows * 1000 + routed_full.ids + a).double())
        assert torch.equal(back, local_rows * 1000 + full), (rank, back)
        report = {"entries": int(routed.ids.numel()), "sent": routed.sent, "received": routed.received}
    finally:
        dist.destroy_process_group()
    Path(out).write_text(json.dumps(report))


@pytest.mark.multiproc
def test_three_gloo_ranks_route_and_return(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outs = [tmp_path / f"rank{r}.json" for r in range(WORLD)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(WORLD), str(port), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    reports = [json.loads(o.read_text()) for o in outs]
    all_ids = random_ids(sum(ROWS), 9, n_items=47, seed=7)
    for r, (a, b) in enumerate(RANGES):
        assert reports[r]["entries"] == int(((all_ids >= a) & (all_ids < b)).sum())
    assert reports[1]["entries"] == 0 and reports[1]["sent"] == [0, 0, 0]
    # what rank p sent to q is what q received from p
    assert all(reports[p]["sent"][q] == reports[q]["received"][p] for p in range(WORLD) for q in range(WORLD))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
