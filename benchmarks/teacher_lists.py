"""How informative and how alike the teachers' lists are, per teacher, over every training position of merged
shards (window-packing layout): the figures behind the "Distillation quality" diagnostics in RESULTS.md.

    .venv/bin/python benchmarks/teacher_lists.py --shards artifacts/teachers/ml-latest-small/shards-ease-itemknn \
        [--dataset ml-latest-small] [--out FILE.json]

Per teacher: the share of positions whose target is in the list (in-sample hit@K) and its median slot, the share of
slots holding one of the 100 most frequent training items, how many distinct items it ever lists, the share of
all slots taken by its 50 most listed items, and the mean top-slot probability after per-list standardisation
at temperature 1 (how peaked the distribution the student is pulled toward is).

Then, per teacher-weight strategy (uniform, confidence, consistency, conf+cons; ``alpha``, ``gamma``, ``score_norm``
and ``teacher_scale`` from ``--config`` and ``--set``, as the trainer applies them): the mean weight w_bt each teacher
gets over the positions, and the share of positions where it gets the largest weight. These say whether a strategy
moves the weight toward the teacher that generalises better: confidence is measured on training positions, where a
closed-form teacher fitted on them ranks the target high almost always.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


STRATEGIES = ("uniform", "confidence", "consistency", "confidence_consistency")


def weight_shares(ids: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, teacher_names: tuple[str, ...],
                  alpha: float, gamma: float, score_norm: str = "none", scale: dict[str, float] | None = None,
                  chunk: int = 65536) -> dict[str, dict[str, list[float]]]:
    """{strategy: {"mean_weight": [T], "top_share": [T]}} over the rows of ``ids``/``scores`` [N, T, K] with targets
    [N], the weights computed as the trainer does (``prepared_lists``: score_norm, the strategy, teacher_scale).
    Rows where no teacher has a list are left out; "top_share" splits ties evenly."""
    from prmkd_dist.distill.trainer import scaled_teacher_weights, standardise_scores
    from prmkd_dist.distill.weights import teacher_weights

    n_t = len(teacher_names)
    sums = {s: torch.zeros(n_t, dtype=torch.float64) for s in STRATEGIES}
    tops = {s: torch.zeros(n_t, dtype=torch.float64) for s in STRATEGIES}
    rows = 0
    for a in range(0, ids.shape[0], chunk):
        i, sc, tg = ids[a:a + chunk].long(), scores[a:a + chunk], targets[a:a + chunk]
        keep = (i >= 0).any(dim=2).any(dim=1)
        i, sc, tg = i[keep], sc[keep], tg[keep]
        if score_norm == "std":
            sc = standardise_scores(i, sc)
        rows += int(keep.sum())
        for strategy in STRATEGIES:
            w = teacher_weights(i, sc, tg, strategy=strategy, alpha=alpha, gamma=gamma)
            w = scaled_teacher_weights(w, teacher_names, scale or {})
            sums[strategy] += w.sum(dim=0).double()
            best = w == w.max(dim=1, keepdim=True).values
            tops[strategy] += (best.double() / best.sum(dim=1, keepdim=True)).sum(dim=0)
    return {s: {"mean_weight": (sums[s] / max(rows, 1)).tolist(), "top_share": (tops[s] / max(rows, 1)).tolist()}
            for s in STRATEGIES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--dataset", default="ml-latest-small")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--config", default="distill-sasrec-ml",
                    help="the train config whose distill alpha/gamma/score_norm/teacher_scale weigh the teachers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = ap.parse_args()

    from prmkd_dist.distill.packed import PositionTeacherTable
    from prmkd_dist.distill.trainer import standardise_scores
    from prmkd_dist.train.trainer import load_split_for

    split = load_split_for(args.dataset)
    table = PositionTeacherTable.load(args.shards, split)
    targets = torch.from_numpy(np.asarray(split.train_items, dtype=np.int64))
    n_items = split.data.num_items
    popular = torch.zeros(n_items, dtype=torch.bool)
    popular[torch.bincount(targets, minlength=n_items).argsort(descending=True)[:100]] = True
    rows = []
    for j, name in enumerate(table.teacher_names):
        ids, scores = table.ids[:, j].long(), table.scores[:, j]
        listed = (ids >= 0).any(dim=1)  # each user's first position has no list
        ids, scores, tgt = ids[listed], scores[listed], targets[listed]
        valid = ids >= 0
        hit = (ids == tgt[:, None]) & valid
        slot = torch.where(hit, torch.arange(ids.shape[1]).expand_as(ids), ids.shape[1]).min(dim=1).values
        counts = torch.bincount(ids[valid], minlength=n_items).float()
        z = standardise_scores(ids, scores).masked_fill(~valid, float("-inf"))
        rows.append({"teacher": name, "positions": int(listed.sum()),
                     "hit_at_k": hit.any(dim=1).float().mean().item(),
                     "median_hit_slot": float(slot[hit.any(dim=1)].float().median()),
                     "slots_top100": popular[ids[valid]].float().mean().item(),
                     "distinct_items": int((counts > 0).sum()),
                     "top50_share": (counts.sort(descending=True).values[:50].sum() / counts.sum()).item(),
                     "mean_top_prob": torch.softmax(z, dim=1).max(dim=1).values.mean().item()})
    print("| teacher | positions | hit@K | median hit slot | slots in top-100 | distinct items | top-50 share | "
          "mean top prob |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['teacher']} | {r['positions']:,} | {r['hit_at_k']:.3f} | {r['median_hit_slot']:.0f} | "
              f"{r['slots_top100']:.3f} | {r['distinct_items']:,} | {r['top50_share']:.3f} | {r['mean_top_prob']:.3f} |")
    from prmkd_dist.train.config import load_config

    d = load_config(args.config, [f"distill.shards={args.shards}", *args.set]).distill
    shares = weight_shares(table.ids, table.scores, targets, table.teacher_names, d.alpha, d.gamma, d.score_norm,
                           d.teacher_scale)
    print(f"\nteacher weights ({args.config}: alpha {d.alpha}, gamma {d.gamma}, score_norm {d.score_norm}, "
          f"teacher_scale {d.teacher_scale or 'none'}): mean w over positions / share of positions where largest")
    print("| strategy | " + " | ".join(table.teacher_names) + " |\n|---|" + "---:|" * len(table.teacher_names))
    for strategy, r in shares.items():
        print(f"| {strategy} | " + " | ".join(f"{m:.3f} / {t:.3f}" for m, t in zip(r["mean_weight"], r["top_share"]))
              + " |")
    if args.out is not None:
        args.out.write_text(json.dumps({"shards": args.shards, "dataset": args.dataset, "teachers": rows,
                                        "config": args.config, "overrides": args.set,
                                        "weights": {"alpha": d.alpha, "gamma": d.gamma, "score_norm": d.score_norm,
                                                    "teacher_scale": d.teacher_scale, "by_strategy": shares}},
                                       indent=2))


if __name__ == "__main__":
    main()
