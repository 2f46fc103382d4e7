"""How informative and how alike the teachers' lists are, per teacher, over every training position of merged
shards (window-packing layout): the figures behind the "Distillation quality" diagnostics in RESULTS.md.

    .venv/bin/python benchmarks/teacher_lists.py --shards artifacts/teachers/ml-latest-small/shards-ease-itemknn \
        [--dataset ml-latest-small] [--out FILE.json]

Per teacher: the share of positions whose target is in the list (in-sample hit@K) and its median slot, the share of
slots holding one of the 100 most frequent training items, how many distinct items it ever lists, the share of
all slots taken by its 50 most listed items, and the mean top-slot probability after per-list standardisation
at temperature 1 (how peaked the distribution the student is pulled toward is).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True)
    ap.add_argument("--dataset", default="ml-latest-small")
    ap.add_argument("--out", type=Path, default=None)
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
    if args.out is not None:
        args.out.write_text(json.dumps({"shards": args.shards, "dataset": args.dataset, "teachers": rows}, indent=2))


if __name__ == "__main__":
    main()
