"""What trimming batches to their longest history saves: training steps and one validation pass, trimmed vs
full width (``max_len``), on one config (default ``sasrec-games``: Games histories are short, median 3 items).

    .venv/bin/python benchmarks/trim.py --config sasrec-games --steps 30 --out benchmarks/results/trim-games.json

Full width is emulated by padding each batch back to ``max_len``; the metrics of both evaluations must agree.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.prepare import load_split
from prmkd_dist.train.config import load_config
from prmkd_dist.train.engine import LocalEngine
from prmkd_dist.train.evaluate import evaluate
from prmkd_dist.train.trainer import NextItemObjective, build_model


def widen(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([torch.full((x.shape[0], width - x.shape[1]), PAD_ID, dtype=x.dtype), x], dim=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sasrec-games")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/trim-games.json")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    _, split = load_split(cfg.data.dataset)
    torch.manual_seed(0)
    model = build_model(cfg, split.data.num_items)
    eng = LocalEngine(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, grad_clip=cfg.optim.grad_clip,
                      loss_backend=cfg.optim.loss_backend)
    obj = NextItemObjective(split, cfg.data.max_len, cfg.optim.batch_size, 0, torch.device("cpu"))
    it = obj.batches(1)
    batches = [next(it) for _ in range(args.warmup + args.steps)]
    rows = {}
    eng.train()
    for name in ("full width", "trimmed", "full width", "trimmed"):  # twice each, interleaved
        t0 = None
        for s, (x, y) in enumerate(batches):
            if s == args.warmup:
                t0 = time.perf_counter()
            if name == "full width":
                x, y = widen(x, cfg.data.max_len), widen(y, cfg.data.max_len)
            eng.step(obj.loss(eng, (x, y)))
        rows.setdefault(name, []).append((time.perf_counter() - t0) / args.steps * 1e3)
    width = sum(b[0].shape[1] for b in batches) / len(batches)
    eng.eval()

    class FullWidth(torch.nn.Module):
        def score(self, history):
            return model.score(widen(history, cfg.data.max_len))

    evals = {}
    with torch.no_grad():
        for name, scorer in (("full width", FullWidth()), ("trimmed", model)):
            t0 = time.perf_counter()
            m = evaluate(scorer, split, "valid", max_len=cfg.data.max_len, progress=False)
            evals[name] = {"seconds": time.perf_counter() - t0, "NDCG@10": m["NDCG@10"]}
    print(f"| batches | mean width | ms per step (2 runs) | validation pass s | valid NDCG@10 |\n|---|---:|---:|---:|---:|")
    for name in ("full width", "trimmed"):
        w = cfg.data.max_len if name == "full width" else width
        print(f"| {name} | {w:.1f} | {' / '.join(f'{v:.0f}' for v in rows[name])} | {evals[name]['seconds']:.1f} | "
              f"{evals[name]['NDCG@10']:.5f} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": platform.platform(),
                                          "threads": torch.get_num_threads(), "step_ms": rows, "mean_width": width,
                                          "eval": evals}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
