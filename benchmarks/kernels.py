"""Forward+backward time and peak memory of the distillation-loss backends.

Compares every backend that can run on the device (through the public dispatcher) with the eager
PyTorch reference and ``torch.compile`` of it, over a grid of batch sizes B, catalog sizes C and (for the
fused-linear form) embedding widths d, with T teachers x K slots each:

    # full grid on a GPU (Triton, reference, torch.compile; fused-linear also at C = 1e7)
    .venv/bin/python benchmarks/kernels.py --out artifacts/bench/kernels_gpu.json
    # quick check on a CPU (C++ backend, reference, torch.compile)
    .venv/bin/python benchmarks/kernels.py --batch 256 --items 1e4 --dim 64 --reps 3

On CUDA it also measures the HBM bandwidth (a large device-to-device copy) and the bf16 matmul rate in the
same run and reports which fraction of them each Triton cell achieves: bytes for the logits form (it is
bandwidth-bound: it reads the logits twice and writes the gradient once), FLOPs for the fused-linear form
(five B x C x d matmuls: three recomputations of the logits, dU and dE).

``liger`` (CUDA, when the ``liger_kernel`` package is importable; never a default on CPU) times Liger-Kernel's
fused cross-entropy on the same logits (``LigerCrossEntropyLoss``) and its fused linear cross-entropy on the
same embeddings (``LigerFusedLinearCrossEntropyLoss``). Liger has no top-K multi-teacher KD: these cells
compute the cross-entropy term alone, the floor a single-teacher-free fused loss reaches on the shape, so the
ratio triton / liger is what the distillation terms cost on top of it.

Timing: ``--warmup`` untimed runs (they include compilation / autotuning), then ``--reps`` timed runs; the
median is reported (CUDA events and a synchronise on GPU, ``perf_counter`` on CPU). Peak memory: on GPU
``torch.cuda.max_memory_allocated`` above what the inputs already held; on CPU the peak increase of the
process RSS sampled every millisecond during one extra run, with glibc's mmap threshold pinned so that
freed tensors leave the RSS (approximate: it also counts the allocator's and torch's own workspaces). A cell whose estimated footprint exceeds ``--mem-limit-gb`` is not run and is reported
as "skipped: OOM estimate".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import prmkd_dist
from prmkd_dist.distill import reference

FORMS = ("logits", "linear")
BACKEND_CHOICES = ("reference", "compile", "cpp", "triton", "triton-inplace", "liger")


@dataclass
class Cell:
    """One measurement: a form (logits given / fused linear), a shape and a backend."""

    form: str
    backend: str
    batch: int
    items: int
    dim: int | None
    teachers: int
    slots: int
    dtype: str
    ms: float | None = None
    peak_mb: float | None = None
    estimate_mb: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ inputs
def _teacher_inputs(batch: int, items: int, teachers: int, slots: int, device: torch.device, gen: torch.Generator):
    """Teacher tensors like an export's: top-K ids (10% empty slots), scores, weights, rank weights."""
    ids = torch.randint(0, items, (batch, teachers, slots), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.1] = -1
    scores = torch.randn((batch, teachers, slots), generator=gen).sort(dim=2, descending=True).values
    weights = torch.softmax(torch.randn((batch, teachers), generator=gen), dim=1)
    rank = torch.rand((batch, teachers, slots), generator=gen)
    target = torch.randint(0, items, (batch,), generator=gen)
    return [x.to(device) for x in (target, ids, scores, weights, rank)]


def estimate_bytes(form: str, backend: str, batch: int, items: int, dim: int | None, elem: int,
                   teachers: int, slots: int) -> int:
    """Rough peak footprint of one forward+backward, inputs included (for skipping cells, not a measurement).

    A [B, C] buffer is counted per materialised copy: eager autograd keeps about six fp32 [B, C] tensors
    alive (upcast logits, s / tau, two log-softmax results, their gradients), torch.compile about three,
    the fused backends only the logits and their gradient (or nothing [B, C] in the linear form)."""
    bc = batch * items
    small = batch * teachers * slots * 40 + batch * 64
    if form == "linear":
        emb = (batch + items) * (dim or 0) * elem * 2 + items * elem * 2  # tables, their gradients, bias
        if backend in ("cpp", "triton", "liger"):
            return emb + small + items * (dim or 0) * 4  # + an fp32 accumulator of d item_emb at most
        return emb + small + {"reference": 6, "compile": 3}[backend] * bc * 4
    copies = {"reference": 6 * 4, "compile": 3 * 4, "cpp": 2 * elem + 4, "triton": 2 * elem,
              "triton-inplace": elem, "liger": elem}[backend]
    return bc * copies + small


def memory_limit_bytes(device: torch.device, limit_gb: float | None) -> int:
    """The footprint a cell may use: --mem-limit-gb, else 85% of free GPU memory / 50% of available RAM
    (the CPU machine is shared)."""
    if limit_gb is not None:
        return int(limit_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.85)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return 4 * 2**30


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pin_malloc_mmap_threshold() -> bool:
    """Make glibc serve every allocation >= 128 KiB with its own mmap and unmap it on free, so that the
    process RSS follows the live tensors (by default glibc raises the threshold after frees and keeps freed
    tensors' pages, which hides later peaks). Returns False where glibc's mallopt is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(libc.mallopt(m_trim_threshold, 128 * 1024))
    except OSError:
        return False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_step(prepare: Callable[[], object], step: Callable[[object], None], device: torch.device,
              warmup: int, reps: int) -> tuple[float, float]:
    """Median milliseconds of ``step(prepare())`` (prepare is untimed) and peak memory (MB) of one step."""
    for _ in range(warmup):
        step(prepare())
    _sync(device)
    times = []
    for _ in range(reps):
        state = prepare()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(state)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(state)
            times.append((time.perf_counter() - t0) * 1e3)
        del state
    state = prepare()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(state)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        base, peak_rss, done = _rss_bytes(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak_rss[0] = max(peak_rss[0], _rss_bytes())
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        step(state)
        done.set()
        sampler.join()
        peak = max(0, max(peak_rss[0], _rss_bytes()) - base)
    return statistics.median(times), peak / 2**20


def graph_ms(prepare: Callable[[], object], step: Callable[[object], None], device: torch.device, reps: int) -> float:
    """Milliseconds per replay of ``step`` captured in a CUDA graph: the kernels' own time, without the
    Python dispatch and launch latency that the plain timing includes (it dominates sub-millisecond cells).
    Replays run back to back, so a step's result may be overwritten by the next (fine for timing)."""
    state = prepare()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up on a side stream, as graph capture requires
        step(state)
    torch.cuda.current_stream(device).wait_stream(side)
    if isinstance(state, torch.Tensor):
        state.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(state)
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / reps


def measure_hardware(device: torch.device) -> dict:
    """Measured HBM copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) of this GPU."""
    if device.type != "cuda":
        return {}
    n = 2**30 // 4  # 1 GiB of fp32
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    ms, _ = time_step(lambda: None, lambda _: dst.copy_(src), device, warmup=3, reps=10)
    hbm = 2 * n * 4 / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms, _ = time_step(lambda: None, lambda _: a @ b, device, warmup=3, reps=10)
    return {"hbm_copy_gbps": hbm, "bf16_matmul_tflops": 2 * m**3 / (ms * 1e-3) / 1e12}


# ------------------------------------------------------------------------------------------------ backends
def _compiled_reference(form: str, tau: float):
    """torch.compile of the reference's mean loss, static shapes. Dynamo's caches are reset first: every
    cell is a new shape, and past its recompile limit Dynamo would silently run the function eagerly."""
    torch._dynamo.reset()
    if form == "logits":
        def loss(logits, target, ids, scores, weights, rank):
            return reference.kd_loss_rows(logits, target, ids, scores, weights, rank, tau, 1.0, 1.0, 0.3).mean()
    else:
        def loss(user, item, bias, target, ids, scores, weights, rank):
            return reference.kd_loss_linear_rows(user, item, bias, target, ids, scores, weights, rank,
                                                 tau, 1.0, 1.0, 0.3).mean()
    return torch.compile(loss, dynamic=False)


def run_cell(cell: Cell, device: torch.device, dtype: torch.dtype, warmup: int, reps: int, hardware: dict,
             tau: float = 0.7) -> None:
    """Measure ``cell`` in place (ms, peak_mb, extra)."""
    gen = torch.Generator().manual_seed(0)
    target, ids, scores, weights, rank = _teacher_inputs(cell.batch, cell.items, cell.teachers, cell.slots,
                                                         device, gen)
    hyper = dict(temperature=tau, lambda_ce=1.0, lambda_kd=1.0, lambda_rank=0.3)
    fwd_step = None
    if cell.form == "logits":
        base = torch.randn(cell.batch, cell.items, generator=gen).to(device=device, dtype=dtype)

        def prepare():
            if cell.backend in ("triton-inplace", "liger"):
                return base.clone().requires_grad_(True)  # its storage becomes the gradient
            base.grad = None
            return base.requires_grad_(True)

        if cell.backend in ("reference", "cpp", "triton"):
            def step(x):
                prmkd_dist.kd_loss(x, target, ids, scores, weights, rank, backend=cell.backend,
                                   check_inputs=False, **hyper).backward()
        elif cell.backend == "liger":
            from liger_kernel.transformers import LigerCrossEntropyLoss

            ce = LigerCrossEntropyLoss()

            def step(x):  # Liger writes the gradient into the logits' storage, like triton-inplace
                ce(x, target).backward()
        elif cell.backend == "triton-inplace":
            from prmkd_dist.kernels.kd_loss import kd_loss_rows

            def step(x):
                kd_loss_rows(x, target, ids, scores, weights, rank, tau, 1.0, 1.0, 0.3, grad_inplace=True).mean().backward()
        else:
            fn = _compiled_reference("logits", tau)

            def step(x):
                fn(x, target, ids, scores, weights, rank).backward()
        if cell.backend.startswith("triton"):
            from prmkd_dist.kernels.kd_loss import kd_loss_rows

            def fwd_step(x):
                with torch.no_grad():
                    kd_loss_rows(x, target, ids, scores, weights, rank, tau, 1.0, 1.0, 0.3)
        moved = 3 * cell.batch * cell.items * base.element_size()  # read, read again, write the gradient
    else:
        user = torch.randn(cell.batch, cell.dim, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
        item = (0.1 * torch.randn(cell.items, cell.dim, generator=gen)).to(device=device, dtype=dtype).requires_grad_(True)
        bias = torch.zeros(cell.items, device=device, dtype=dtype).requires_grad_(True)

        def prepare():
            for t in (user, item, bias):
                t.grad = None
            return None

        if cell.backend == "compile":
            fn = _compiled_reference("linear", tau)

            def step(_):
                fn(user, item, bias, target, ids, scores, weights, rank).backward()
        elif cell.backend == "liger":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()

            def step(_):
                flce(item, user, target, bias).backward()
        else:
            def step(_):
                prmkd_dist.kd_loss_linear(user, item, target, ids, scores, weights, rank, item_bias=bias,
                                          backend=cell.backend, check_inputs=False, **hyper).backward()
        flops = 5 * 2 * cell.batch * cell.items * cell.dim
    cell.ms, cell.peak_mb = time_step(prepare, step, device, warmup, reps)
    if (cell.backend.startswith("triton") or cell.backend == "liger") and hardware:
        if cell.form == "logits":
            gbps = moved / (cell.ms * 1e-3) / 1e9
            cell.extra = {"achieved_gbps": gbps, "fraction_of_hbm": gbps / hardware["hbm_copy_gbps"]}
            cell.note = f"{100 * cell.extra['fraction_of_hbm']:.0f}% of copy BW"
            if cell.backend.startswith("triton"):
                from prmkd_dist.kernels.kd_loss import column_splits

                cell.extra["column_splits"] = column_splits(cell.batch, cell.items, device)
                cell.note += f", {cell.extra['column_splits']} split(s)/row"
            if device.type == "cuda" and cell.backend != "liger":
                # the kernels alone (CUDA graph replay): forward, and forward + backward
                try:
                    fwd = graph_ms(prepare, fwd_step, device, reps)
                    both = graph_ms(prepare, step, device, reps)
                    frac = moved / (both * 1e-3) / 1e9 / hardware["hbm_copy_gbps"]
                    cell.extra.update(graph_ms=both, graph_fwd_ms=fwd, graph_fraction_of_hbm=frac)
                    cell.note += f"; kernels {both:.2f} ms (fwd {fwd:.2f}) = {100 * frac:.0f}%"
                except Exception as exc:  # noqa: BLE001 - a capture failure must not lose the plain timing
                    cell.note += f"; graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        else:
            tflops = flops / (cell.ms * 1e-3) / 1e12
            cell.extra = {"achieved_tflops": tflops, "fraction_of_matmul": tflops / hardware["bf16_matmul_tflops"]}
            cell.note = f"{100 * cell.extra['fraction_of_matmul']:.0f}% of bf16 matmul"
    if device.type == "cuda" and "graph_ms" not in (cell.extra or {}):
        # every other backend's step replayed from a CUDA graph too: below ~1e8 logits the plain step of every
        # backend is bound by the host (Python, dispatch, launches), and this compares what runs on the device
        try:
            both = graph_ms(prepare, step, device, reps)
            cell.extra = {**(cell.extra or {}), "graph_ms": both}
            cell.note = (cell.note + "; " if cell.note else "") + f"graph replay {both:.2f} ms"
        except Exception as exc:  # noqa: BLE001 - a capture failure must not lose the plain timing
            cell.note = (cell.note + "; " if cell.note else "") + \
                f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def backends_for(device: torch.device, requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """Backends to run on ``device`` and, for the others, why not."""
    available = prmkd_dist.available_backends(device)
    chosen, skipped = [], {}
    for name in requested or BACKEND_CHOICES:
        base = "triton" if name == "triton-inplace" else name
        if base == "compile":
            chosen.append(name)
        elif base == "liger":
            if device.type != "cuda":
                skipped[name] = "Liger-Kernel is CUDA-only"
                continue
            try:
                import liger_kernel  # noqa: F401
                chosen.append(name)
            except ImportError:
                skipped[name] = "liger_kernel is not installed (carry its wheel: pip install liger-kernel)"
        elif base == "triton" and device.type != "cuda":
            skipped[name] = "Triton is timed on CUDA only (the CPU interpreter is a correctness tool)"
        elif not available[base][0]:
            skipped[name] = available[base][1]
        else:
            chosen.append(name)
    return chosen, skipped


def _count(text: str) -> int:
    """An integer from '1e6' or '1000000'."""
    value = float(text)
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (e.g. 1e6), got {text!r}")
    return int(value)


def markdown(cells: list[Cell], header: dict) -> str:
    lines = [f"device: {header['device']}; dtype {header['dtype']}; T={header['teachers']} K={header['slots']}; "
             f"tau {header['temperature']}; "
             f"median of {header['reps']} after {header['warmup']} warm-up"]
    if header.get("hardware"):
        hw = header["hardware"]
        lines.append(f"measured: HBM copy {hw['hbm_copy_gbps']:.0f} GB/s, bf16 matmul {hw['bf16_matmul_tflops']:.0f} TFLOP/s")
    lines += ["", "| form | B | C | d | backend | fwd+bwd ms | peak MB | est. MB | note |",
              "|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for c in cells:
        ms = f"{c.ms:.2f}" if c.ms is not None else "-"
        peak = f"{c.peak_mb:.0f}" if c.peak_mb is not None else "-"
        lines.append(f"| {c.form} | {c.batch} | {c.items:.0e} | {c.dim or '-'} | {c.backend} | {ms} | {peak} | "
                     f"{c.estimate_mb:.0f} | {c.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--backends", nargs="+", choices=BACKEND_CHOICES, default=None,
                   help="default: every backend that can run on the device")
    p.add_argument("--batch", nargs="+", type=_count, default=[256, 1024, 4096])
    p.add_argument("--items", nargs="+", type=_count, default=[10**4, 10**5, 10**6], help="C of both forms")
    p.add_argument("--linear-items", nargs="*", type=_count, default=[10**7],
                   help="additional C for the fused-linear form only")
    p.add_argument("--dim", nargs="+", type=_count, default=[64, 128], help="d of the fused-linear form")
    p.add_argument("--teachers", type=int, default=3)
    p.add_argument("--slots", type=int, default=50, help="K, slots per teacher")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="tau of every cell (1.0 takes the kernels' one-exp path: softmax(s / tau) = softmax(s))")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    p.add_argument("--reps", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="skip cells estimated above this (default: 85%% of free GPU memory / 50%% of available RAM)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    reps = args.reps if args.reps is not None else (20 if on_gpu else 3)
    limit = memory_limit_bytes(device, args.mem_limit_gb)
    if not on_gpu and not pin_malloc_mmap_threshold():
        print("warning: mallopt unavailable; CPU peak memory may read low (freed pages are reused)", file=sys.stderr)
    backends, skipped = backends_for(device, args.backends)
    for name, why in skipped.items():
        print(f"not run: {name}: {why}", file=sys.stderr)
    hardware = measure_hardware(device)
    elem = torch.empty((), dtype=dtype).element_size()

    grid = []
    for form in args.forms:
        items = args.items + (args.linear_items if form == "linear" else [])
        dims = args.dim if form == "linear" else [None]
        for batch in args.batch:
            for n_items in items:
                for dim in dims:
                    for backend in backends:
                        if form == "linear" and backend == "triton-inplace":
                            continue
                        grid.append(Cell(form, backend, batch, n_items, dim, args.teachers, args.slots, str(dtype)))
    header = {"device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
              "dtype": str(dtype), "teachers": args.teachers, "slots": args.slots, "temperature": args.temperature,
              "reps": reps, "warmup": warmup,
              "torch": torch.__version__, "hardware": hardware, "not_run": skipped,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}

    def save() -> None:  # after every cell, so that a run stopped at a time limit keeps what it measured
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**header, "results": [asdict(c) for c in grid]}, indent=2))

    failures = 0
    for cell in grid:
        est = estimate_bytes(cell.form, cell.backend, cell.batch, cell.items, cell.dim, elem, cell.teachers, cell.slots)
        cell.estimate_mb = est / 2**20
        if est > limit:
            cell.note = f"skipped: OOM estimate ({est / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB)"
        else:
            try:
                run_cell(cell, device, dtype, warmup, reps, hardware, args.temperature)
            except torch.OutOfMemoryError as exc:
                cell.note = f"out of memory: {str(exc).splitlines()[0][:80]}"
            except Exception as exc:  # noqa: BLE001 - one broken backend must not hide the other cells
                cell.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                failures += 1
            if on_gpu:
                torch.cuda.empty_cache()
        print(f"{cell.form:6s} B={cell.batch:5d} C={cell.items:.0e} d={cell.dim} {cell.backend:14s} "
              f"{'-' if cell.ms is None else f'{cell.ms:10.2f} ms'} {cell.note}", file=sys.stderr, flush=True)
        save()

    print(markdown(grid, header))
    save()
    if failures:
        print(f"{failures} cell(s) failed: see the note column", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
