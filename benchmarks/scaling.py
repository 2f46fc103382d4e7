"""Per-step time split and throughput of distributed training (DistributedEngine) for 1 and 2 ranks.

    .venv/bin/python benchmarks/scaling.py [--steps 20] [--batch 128] [--worlds 1 2] [--loss-backend auto]
                                           [--out FILE.json]

For each world size the script starts itself under torchrun (gloo; CPU unless CUDA is present) and trains
SASRec on ``--dataset`` (default ml-latest-small) with the same GLOBAL batch, timing per step (median over steps
after warm-up):
  lookup   forward of the sharded item table (input dist + lookup + output dist all-to-alls)
  dense    the rest of the student's forward
  loss     all-gather of the hidden rows + catalog-parallel loss forward
  backward DeepSpeed backward: dense grads, fused table update, all-to-all / all-reduce of gradients
  step     DeepSpeed dense optimizer step (+ ZeRO gathers)
and examples/s (global batch / step time). ``--scoring sampled`` trains with the sampled softmax instead
(candidates + ``--negatives`` shared negatives looked up through the sharded table; prmkd_dist/distill/sampled.py).
``--loss-backend`` picks the local part of the catalog-parallel loss
("auto": the fused C++ op on CPU; "reference": the chunked PyTorch form), to compare the two in one run.
``--teachers T --k K`` (T > 0) also times, in the same processes and on the same batches, every step with T
teachers' top-K lists per row (confidence+consistency teacher weights, KD term at ``--temperature``): the
distillation overhead. The two variants alternate step by step, so both see the same machine load.
``--weights prepared`` (default) computes the teacher weights outside the timed step, as the window-packed
trainer does (once per position when it starts); ``--weights step`` inside it, as the streaming trainer does.
``--profile PREFIX`` (with ``--teachers``) then runs torch.profiler on rank 0 over ``--profile-steps`` batches as
plain and as distillation steps, prints the ops whose CPU self time differs most and writes PREFIX.world<N>.json.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("lookup", "dense", "loss", "backward", "step", "total")


def worker(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from prmkd_dist.models import build_student
    from prmkd_dist.parallel.engine import DistributedEngine, ParallelConfig, init_process_group
    from prmkd_dist.train.engine import no_teachers
    from prmkd_dist.train.trainer import load_split_for, trainable_users, training_batch
    from types import SimpleNamespace

    rank, world, _ = init_process_group()
    torch.manual_seed(0)
    split = load_split_for(args.dataset)
    model = build_student("sasrec", split.data.num_items, dim=args.dim, max_len=args.max_len, num_layers=2,
                          num_heads=2, dropout=0.0)
    optim = SimpleNamespace(lr=1e-3, weight_decay=0.0, grad_clip=1.0, batch_size=args.batch)
    eng = DistributedEngine(model, optim, ParallelConfig(sharding="row_wise", zero_stage=args.zero,
                                                         scoring=args.scoring, num_negatives=args.negatives))
    users = trainable_users(split)
    per = args.batch // world
    timer = {"t": 0.0}
    ec = eng.model.item_ec
    # the history lookup: the first forward of the table in a step (sampled scoring looks it up again in the loss)
    def lookup_started(module, args) -> None:
        timer.setdefault("t0", time.perf_counter())

    def lookup_done(module, args, output) -> None:  # (a hook that returns a value replaces the output)
        timer.setdefault("t", time.perf_counter() - timer["t0"])

    ec.register_forward_pre_hook(lookup_started)
    ec.register_forward_hook(lookup_done)
    from prmkd_dist.distill.weights import teacher_weights

    variants = [0] + ([args.teachers] if args.teachers > 0 else [])
    rows = {t: [] for t in variants}
    gen = torch.Generator().manual_seed(1234 + rank)
    eng.train()
    def batch(s: int):
        b = users[(s * args.batch) % (len(users) - args.batch):][:args.batch][rank * per:(rank + 1) * per]
        x, y = training_batch(split, b, args.max_len)
        ids = scores = w = None
        if args.teachers > 0:
            # this rank's rows' lists (the engine gathers them with the rows), drawn outside the timed step
            tgt_all = y[y >= 0]
            ids = torch.randint(0, split.data.num_items, (tgt_all.shape[0], args.teachers, args.k), generator=gen)
            scores = torch.randn(ids.shape, generator=gen).sort(dim=-1, descending=True).values
            if args.weights == "prepared":
                w = teacher_weights(ids, scores, tgt_all, strategy="confidence_consistency")
        return x, y, ids, scores, w

    def step(t: int, x, y, ids, scores, w) -> dict:
        timer.clear()
        dist.barrier()
        t0 = time.perf_counter()
        hidden = eng.model.encode(x)
        t1 = time.perf_counter()
        mask = y >= 0
        h, tgt = hidden[mask], y[mask]
        if t == 0:
            loss = eng.linear_loss(h, tgt, *no_teachers(h.shape[0]), backend=args.loss_backend)
        else:
            if args.weights == "step":
                w = teacher_weights(ids, scores, tgt, strategy="confidence_consistency")
            loss = eng.linear_loss(h, tgt, ids, scores, w, None, temperature=args.temperature, lambda_kd=1.0,
                                   backend=args.loss_backend)
        t2 = time.perf_counter()
        eng._stash = None
        eng.ds.backward(loss)
        t3 = time.perf_counter()
        eng.ds.step()
        t4 = time.perf_counter()
        return {"lookup": timer["t"], "dense": t1 - t0 - timer["t"], "loss": t2 - t1, "backward": t3 - t2,
                "step": t4 - t3, "total": t4 - t0, "rows": int(h.shape[0])}

    for s in range(args.warmup + args.steps):
        data = batch(s)
        for t in (variants if s % 2 == 0 else variants[::-1]):
            r = step(t, *data)
            if s >= args.warmup:
                rows[t].append(r)
    if args.profile and rank == 0 and len(variants) == 2:
        profile_steps(args, step, [batch(args.warmup + args.steps + i) for i in range(args.profile_steps)], world)
    elif args.profile and len(variants) == 2:
        # the other ranks take part in the collectives of rank 0's profiled steps, in its order
        batches = [batch(args.warmup + args.steps + i) for i in range(args.profile_steps)]
        for t in variants:
            for data in batches:
                step(t, *data)
    out = []
    for t in variants:
        med = {k: float(np.median([r[k] for r in rows[t]])) for k in PHASES}
        med["rows"] = float(np.mean([r["rows"] for r in rows[t]]))
        allmed = [None] * world
        dist.all_gather_object(allmed, med)
        worst = {k: max(m[k] for m in allmed) for k in PHASES}  # the slowest rank sets the pace
        worst["examples_per_s"] = args.batch / worst["total"]
        worst["rows_per_step"] = sum(m["rows"] for m in allmed)  # scored positions of the global batch
        out.append({"world": world, "teachers": t, "k": args.k if t else 0, **worst})
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    from prmkd_dist.parallel.engine import exit_after_process_group

    exit_after_process_group(0)  # past the interpreter's teardown (see its docstring)


def profile_steps(args, step, batches, world) -> None:
    """torch.profiler over the same batches as a plain and as a distillation step (rank 0, CPU self time
    per op); writes both op tables and the per-op difference (distillation minus plain) to ``--profile``."""
    from torch.profiler import ProfilerActivity, profile

    def run(t: int) -> dict:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for data in batches:
                step(t, *data)
        return {e.key: {"self_ms": e.self_cpu_time_total / 1e3 / len(batches), "calls": e.count / len(batches)}
                for e in prof.key_averages()}

    plain, distill = run(0), run(args.teachers)
    diff = {k: distill.get(k, {}).get("self_ms", 0.0) - plain.get(k, {}).get("self_ms", 0.0)
            for k in set(plain) | set(distill)}
    top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:25]
    lines = [f"world {world}: per-step CPU self time, distillation ({args.teachers} x {args.k}) minus plain, top ops",
             "| op | plain ms | distill ms | extra ms |", "|---|---:|---:|---:|"]
    for k, d in top:
        lines.append(f"| {k} | {plain.get(k, {}).get('self_ms', 0.0):.1f} | "
                     f"{distill.get(k, {}).get('self_ms', 0.0):.1f} | {d:+.1f} |")
    lines.append(f"| total | {sum(v['self_ms'] for v in plain.values()):.1f} | "
                 f"{sum(v['self_ms'] for v in distill.values()):.1f} | {sum(diff.values()):+.1f} |")
    print("\n".join(lines), flush=True)
    path = Path(args.profile).with_suffix(f".world{world}.json")
    path.write_text(json.dumps({"plain": plain, "distill": distill, "table": lines}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="ml-latest-small",
                    help="prepared dataset whose catalog the loss scores (amazon-games: 2.4x ml's items)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128, help="global batch (users)")
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loss-backend", default="auto", choices=["auto", "cpp", "reference"],
                    help="local part of the catalog-parallel loss")
    ap.add_argument("--teachers", type=int, default=0, help="also time steps with T teachers' lists (0 = off)")
    ap.add_argument("--k", type=int, default=50, help="teacher list length with --teachers")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="KD temperature with --teachers (the packaged configs use 1; != 1 adds a second LSE pass)")
    ap.add_argument("--weights", choices=["prepared", "step"], default="prepared",
                    help="teacher weights outside the timed step (window-packed trainer) or inside it (streaming)")
    ap.add_argument("--profile", help="with --teachers: also profile (torch.profiler, rank 0) plain vs distillation "
                    "steps; writes PROFILE.world<N>.json and prints the ops that differ most")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--scoring", choices=["full", "sampled"], default="full",
                    help="training loss over the catalog: exact (catalog-parallel) or sampled softmax")
    ap.add_argument("--negatives", type=int, default=1024, help="shared negatives per step with --scoring sampled")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "scaling.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    results = []
    for w in args.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
                   __file__, "--worker", "--result", str(res), "--dataset", args.dataset, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-len", str(args.max_len),
                   "--dim", str(args.dim), "--zero", str(args.zero), "--loss-backend", args.loss_backend,
                   "--teachers", str(args.teachers), "--k", str(args.k), "--temperature", str(args.temperature),
                   "--weights", args.weights, "--profile-steps", str(args.profile_steps), "--scoring", args.scoring,
                   "--negatives", str(args.negatives)]
            if args.profile:
                cmd += ["--profile", str(Path(args.profile).resolve())]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "PRMKD_LOG_LEVEL": "WARNING"}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
            if args.profile:  # the profile table is printed by rank 0
                print("\n".join(l for l in proc.stdout.splitlines() if l.startswith(("|", "world"))))
            results.extend(json.loads(res.read_text()))
    scoring = "exact" if args.scoring == "full" else f"sampled softmax, {args.negatives} negatives"
    print(f"{args.dataset}: catalog of the loss = its items ({scoring}); rows = scored positions per global batch")
    print("| loss backend | ranks | teachers x K | rows | " + " | ".join(f"{k} ms" for k in PHASES) + " | examples/s |")
    print("|---" * (len(PHASES) + 5) + "|")
    for r in results:
        tk = f"{r['teachers']} x {r['k']}" if r["teachers"] else "none"
        print(f"| {args.loss_backend} | {r['world']} | {tk} | {r['rows_per_step']:.0f} | " + " | ".join(f"{1000 * r[k]:.1f}" for k in PHASES)
              + f" | {r['examples_per_s']:.0f} |")
    for w in args.worlds:
        pair = [r for r in results if r["world"] == w]
        if len(pair) == 2:
            print(f"distillation overhead, {w} rank(s): step {pair[1]['total'] / pair[0]['total']:.2f}x")
    Path(args.out).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()
                                                     if k not in ("worker", "result")},
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
