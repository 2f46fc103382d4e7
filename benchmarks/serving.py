"""Serving benchmark: the exported student artifact(s) next to the teachers, in one run on one machine.

For each model: latency p50/p99 of one request (batch size 1, top-10 with seen items excluded, on
--latency-threads threads),
throughput (users/s at --batch), model size (parameters, bytes), and full-ranking NDCG@10 on --stage
(``prmkd_dist.train.evaluate``). For each student artifact also its approximate (IVF) mode at several
``nprobe``: latency, throughput and recall@10 against exact search on the same users.

Example (2-core CPU, about 20 s; the quickstart SASRec against the EASE teacher)::

    .venv/bin/python -m prmkd_dist.cli export --checkpoint runs/quickstart/checkpoint --out /tmp/sasrec-art
    .venv/bin/python benchmarks/serving.py --artifact /tmp/sasrec-art \
        --teacher artifacts/teachers/ml-latest-small/ease --stage test --requests 200 --threads 1 --out serving.json

On a machine shared with other jobs, ``--threads 1`` gives steadier throughput figures (intra-op
threads then fight for the same cores).

Prints a markdown table and writes all figures as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prmkd_dist.data.dataset import left_pad
from prmkd_dist.data.prepare import load_split
from prmkd_dist.serve.artifact import ServingArtifact
from prmkd_dist.train.evaluate import evaluate, stage_histories


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# torch threads of the two measurements (set in main): one request is a chain of small ops, which a
# second intra-op thread slows down (thread wake-ups, ~100x on a busy 2-core machine); a batch of 256
# is large enough to use them
THREADS = {"latency": 1, "throughput": 0}


def _use_threads(which: str) -> None:
    if THREADS[which]:
        torch.set_num_threads(THREADS[which])


def time_requests(fn, seqs: list[np.ndarray], requests: int, warmup: int = 5) -> dict[str, float]:
    """Latency of ``fn([one history])`` over ``requests`` histories (cycled), after ``warmup`` calls."""
    _use_threads("latency")
    for i in range(warmup):
        fn([seqs[i % len(seqs)]])
    samples = []
    for i in range(requests):
        t = time.perf_counter()
        fn([seqs[i % len(seqs)]])
        samples.append(time.perf_counter() - t)
    return _percentiles(samples)


def time_throughput(fn, seqs: list[np.ndarray], batch: int) -> float:
    """Users per second of ``fn`` over all ``seqs`` in batches of ``batch`` (one warm-up batch first)."""
    _use_threads("throughput")
    fn(seqs[:batch])
    t = time.perf_counter()
    for s in range(0, len(seqs), batch):
        fn(seqs[s:s + batch])
    return len(seqs) / (time.perf_counter() - t)


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx.tolist(), exact.tolist())]))


def bench_artifact(path: str, split, seqs, args) -> list[dict]:
    art = ServingArtifact.load(path)
    if art.item_fingerprint != split.data.fingerprint:
        raise ValueError(f"{path}: artifact items ({art.item_fingerprint}) are not those of {split.data.name} "
                         f"({split.data.fingerprint})")
    name = f"student {art.manifest['student']} ({Path(path).name})"
    base = {"kind": "student", "params": art.num_parameters(), "bytes": art.size_bytes(),
            "history_len": art.history_len}
    ndcg = evaluate(art, split, args.stage, ks=(10,), batch_size=256, max_len=args.max_len, progress=False)["NDCG@10"]
    rows = [{"model": name, "mode": "exact", **base, f"NDCG@10 ({args.stage})": ndcg,
             **time_requests(lambda h: art.recommend(h, k=args.k), seqs, args.requests),
             "users_per_s": time_throughput(lambda h: art.recommend(h, k=args.k), seqs, args.batch)}]
    exact, _ = art.recommend(seqs, k=args.k)
    for frac in args.nprobe_fractions:
        nprobe = max(1, round(frac * art.num_lists))
        approx, _ = art.recommend(seqs, k=args.k, approximate=True, nprobe=nprobe)
        fn = lambda h, n=nprobe: art.recommend(h, k=args.k, approximate=True, nprobe=n)  # noqa: E731
        rows.append({"model": name, "mode": f"IVF nprobe {nprobe}/{art.num_lists}", **base,
                     f"recall@{args.k} vs exact": recall_at_k(approx, exact),
                     **time_requests(fn, seqs, args.requests), "users_per_s": time_throughput(fn, seqs, args.batch)})
    return rows


def bench_teacher(path: str, split, seqs, args) -> dict:
    from prmkd_dist.teachers import load_teacher

    teacher = load_teacher(path, fingerprint=split.data.fingerprint)
    nbytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())

    def fn(h):
        return teacher.topk(torch.from_numpy(left_pad(h, args.max_len)), args.k)

    ndcg = evaluate(teacher, split, args.stage, ks=(10,), batch_size=256, max_len=args.max_len, progress=False)["NDCG@10"]
    return {"model": f"teacher {teacher.kind} ({teacher.name})", "mode": "exact", "kind": "teacher",
            "params": teacher.num_parameters(), "bytes": nbytes, f"NDCG@10 ({args.stage})": ndcg,
            **time_requests(fn, seqs, args.requests), "users_per_s": time_throughput(fn, seqs, args.batch)}


def markdown(rows: list[dict], stage: str, k: int) -> str:
    cols = ["model", "mode", "params", "MiB", f"NDCG@10 ({stage})", f"recall@{k} vs exact", "p50 ms", "p99 ms",
            "users/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["model"], r["mode"], f"{r['params']:,}", f"{r['bytes'] / 2**20:.2f}",
                 f"{r[cols[4]]:.4f}" if cols[4] in r else "", f"{r[cols[5]]:.3f}" if cols[5] in r else "",
                 f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['users_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", action="append", default=[], help="student artifact directory (repeatable)")
    p.add_argument("--teacher", action="append", default=[], help="trained teacher directory (repeatable)")
    p.add_argument("--dataset", help="dataset (default: the first artifact's)")
    p.add_argument("--stage", choices=["valid", "test"], default="test", help="split of NDCG@10 and of the requests")
    p.add_argument("--max-len", type=int, default=200, help="history items given to the models (as in evaluation)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--requests", type=int, default=200, help="batch-1 requests timed per model")
    p.add_argument("--batch", type=int, default=256, help="batch size of the throughput measurement")
    p.add_argument("--users", type=int, default=0, help="users used for requests/throughput/recall (0 = all)")
    p.add_argument("--nprobe-fractions", type=float, nargs="*", default=[0.05, 0.1, 0.25],
                   help="IVF clusters probed, as fractions of the artifact's clusters")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the throughput measurement (0 = torch's default)")
    p.add_argument("--latency-threads", type=int, default=1,
                   help="torch threads of the batch-1 latency measurement (one request per core, as served)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if not args.artifact and not args.teacher:
        p.error("give at least one --artifact or --teacher")
    THREADS["throughput"] = args.threads or torch.get_num_threads()
    THREADS["latency"] = args.latency_threads
    dataset = args.dataset
    if dataset is None:
        if not args.artifact:
            p.error("--dataset is required without --artifact")
        dataset = ServingArtifact.load(args.artifact[0], verify=False).manifest["dataset"]
    _, split = load_split(dataset)
    users = split.eval_users(args.stage)
    if args.users:
        users = users[:args.users]
    offsets, items = stage_histories(split, args.stage, users)
    seqs = [items[offsets[i]:offsets[i + 1]] for i in range(len(users))]

    rows = []
    for a in args.artifact:
        rows.extend(bench_artifact(a, split, seqs, args))
    for t in args.teacher:
        rows.append(bench_teacher(t, split, seqs, args))
    table = markdown(rows, args.stage, args.k)
    print(table)
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": dict(THREADS)},
              "dataset": dataset, "stage": args.stage, "users": len(seqs), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows, "markdown": table}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
