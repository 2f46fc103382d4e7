"""How good is the distribution a multi-teacher KL term pulls the student toward, on held-out users?

The KD term of ``kd_loss`` (spec: tau^2 * sum_t w_t KL(p_t || q)) has the same gradient in the student as a
cross-entropy against the mixture m = sum_t w_t p_t of the teachers' top-K softmaxes (per-list standardised
scores, as ``score_norm: std``, at temperature tau). So, for a fixed per-teacher weight, the best a KL-only student
can learn from a teacher mix is m's ranking. This script ranks each validation and test target by m, over a grid of
weights for two teachers (w = teacher 1's weight; any number of teachers for the uniform mix), from lists the
teachers compute exactly as the exporter does (``Teacher.topk`` on the most recent ``--max-history`` items, the
history excluded). If no weight picked on validation puts m above the better teacher alone on test, the pair has
nothing a weighted KL mix can add: the limit is the teachers', not the weighting's.

    .venv/bin/python benchmarks/teacher_mix.py --dataset amazon-games \
        --teacher slist=artifacts/teachers/games-pipeline/models/slist \
        --teacher id-transformer=artifacts/teachers/games-pipeline/models/id-transformer \
        --temperature 1 2 --out benchmarks/results/teacher-mix-games.json

Differences from ``evaluate`` (the teachers' own rows in RESULTS): a target the user had already interacted
with is excluded with the history here (the lists the student is taught never hold it), so such users count as
misses for every row alike; and an item outside every list has m = 0 (ranked after all listed items, ties against
the target). The rows w = 1 and w = 0 are each teacher alone under these rules, for comparison within the table.
Per-example weights that use the target (confidence) would read the held-out label here, so only fixed weights
are measured.

Each row also gives the mixture's mean entropy over the listed items (nats) and the mean probability it puts on
the target (``target_p``): a mixture can rank the target better and still be a flatter, less informative target
for the student than one teacher's list.

``--shards DIR`` adds the same curve on the lists the student is actually trained on: every listed training
position of merged shards (window-packing layout), its training target ranked by the mixture. A teacher fitted on
those positions lists them in sample (SLIST holds the training target in its top-50 at 97 % of Games' positions),
so this curve can differ from the held-out one. The shards' teachers are taken in the shards' order, as many as
``--teacher`` gives (other exports of the same models, cross-fitted lists say), or alone without ``--teacher``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.distill.trainer import standardise_scores
from prmkd_dist.train.evaluate import STAGES, history_batches, stage_histories
from prmkd_dist.train.metrics import metrics_from_ranks

KS = (10, 20)


class MixtureIndex:
    """Where each listed item of each row sits in the row's union of the teachers' lists, computed once per set of
    lists (the [K*T]^2 id comparison) so that every (temperature, weight) point costs one scatter-add.

    ``slot`` [N, T*K]: the union index of each slot's item (-1 = empty slot); ``target`` [N]: the target's union
    index (-1 = in no list); ``size`` [N]: distinct items listed."""

    def __init__(self, ids: torch.Tensor, targets: torch.Tensor, chunk: int = 2048):
        n, tk = ids.shape[0], ids.shape[1] * ids.shape[2]
        self.slot = torch.full((n, tk), -1, dtype=torch.int64)
        self.target = torch.full((n,), -1, dtype=torch.int64)
        self.size = torch.zeros(n, dtype=torch.int64)
        earlier_or_self = torch.tril(torch.ones(tk, tk, dtype=torch.bool))
        for a in range(0, n, chunk):
            i = ids[a:a + chunk].flatten(1).long()
            valid = i != PAD_ID
            same = (i.unsqueeze(2) == i.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)  # [b, TK, TK]
            first_slot = (same & earlier_or_self).to(torch.uint8).argmax(dim=2)  # the first slot holding the item
            first = valid & (first_slot == torch.arange(tk))
            union = torch.cumsum(first, dim=1) - 1                                # union index of first slots
            self.slot[a:a + chunk] = torch.where(valid, union.gather(1, first_slot), -1)
            self.size[a:a + chunk] = first.sum(dim=1)
            is_target = (i == targets[a:a + chunk].long().unsqueeze(1)) & valid
            at = is_target.to(torch.uint8).argmax(dim=1, keepdim=True)
            self.target[a:a + chunk] = torch.where(is_target.any(dim=1), self.slot[a:a + chunk].gather(1, at)[:, 0], -1)

    def ranks(self, probs: torch.Tensor, num_items: int, chunk: int = 16384) -> torch.Tensor:
        """[N] rank of each target under the mixture ``probs`` [N, T, K] (already weighted: w_t * p_t, 0 on empty
        slots): an item's value is the sum over every slot holding it, and the rank counts the other listed items
        with a value >= the target's (ties against the target, as ``metrics.target_rank``); a target in no list
        has value 0 and ties with every unlisted item: rank ``num_items - 1``."""
        return self.measure(probs, num_items, chunk)[0]

    def measure(self, probs: torch.Tensor, num_items: int, chunk: int = 16384
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ranks as ``ranks``, entropy [N] of the mixture normalised to sum 1 over the listed items (nats; how
        spread the target the KL term pulls toward is), target mass [N] (its normalised mixture probability, 0 when
        in no list)). A row with no listed item has entropy 0 and target mass 0."""
        n, tk = self.slot.shape
        p = probs.reshape(n, tk).double()
        ranks = torch.empty(n, dtype=torch.int64)
        entropy = torch.empty(n, dtype=torch.float64)
        mass = torch.empty(n, dtype=torch.float64)
        cols = torch.arange(tk)
        for a in range(0, n, chunk):
            sl = self.slot[a:a + chunk]
            value = torch.zeros(sl.shape[0], tk + 1, dtype=torch.float64)  # column tk takes the empty slots
            value.scatter_add_(1, torch.where(sl < 0, tk, sl), p[a:a + chunk])
            value = value[:, :tk]
            tg = self.target[a:a + chunk]
            t_value = value.gather(1, tg.clamp(min=0).unsqueeze(1))
            above = ((value >= t_value) & (cols < self.size[a:a + chunk].unsqueeze(1))).sum(dim=1) - 1
            ranks[a:a + chunk] = torch.where(tg >= 0, above, num_items - 1)
            total = value.sum(dim=1, keepdim=True)
            q = value / total.clamp(min=1e-300)
            entropy[a:a + chunk] = -torch.special.xlogy(q, q).sum(dim=1)
            mass[a:a + chunk] = torch.where(tg >= 0, (t_value / total.clamp(min=1e-300))[:, 0], 0.0)
        return ranks, entropy, mass


def mixture_ranks(ids: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, num_items: int,
                  chunk: int = 2048) -> torch.Tensor:
    """[N] rank of each target under the mixture of ``ids`` [N, T, K] (PAD_ID = empty slot) weighted by ``probs``
    (``MixtureIndex.ranks``), for one mixture."""
    return MixtureIndex(ids, targets, chunk=chunk).ranks(probs, num_items, chunk=chunk)


def teacher_probs(ids: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_t per list [N, T, K]: softmax over the valid slots of the standardised scores / tau (0 on empty slots)."""
    z = standardise_scores(ids, scores).double() / temperature
    z = z.masked_fill(ids == PAD_ID, float("-inf"))
    p = torch.softmax(z, dim=2)
    return torch.nan_to_num(p, nan=0.0)  # a row whose list is empty: all -inf -> NaN -> 0


def metrics(ranks: torch.Tensor) -> dict[str, float]:
    return {name: float(v.mean()) for name, v in metrics_from_ranks(ranks, KS).items()}


def teacher_lists(teachers: dict, split, stage: str, k: int, max_history: int, batch_size: int):
    """(ids [N, T, k] int32, scores [N, T, k] float32, targets [N]) for every ``stage`` user, the teachers in
    ``teachers``' order."""
    users = split.eval_users(stage)
    offsets, items = stage_histories(split, stage, users)
    n, t = len(users), len(teachers)
    ids = torch.full((n, t, k), PAD_ID, dtype=torch.int32)
    scores = torch.zeros((n, t, k), dtype=torch.float32)
    for idx, _seqs, hist in history_batches(users, offsets, items, batch_size, max_history):
        rows = torch.from_numpy(idx)
        for j, teacher in enumerate(teachers.values()):
            i, s = teacher.topk(hist, k)
            ids[rows, j] = i.to(torch.int32)
            scores[rows, j] = s
    return ids, scores, torch.from_numpy(split.target(stage)[users].astype(np.int64))


def shard_lists(shards: str, split):
    """(ids [N, T, K], scores, targets [N], teacher names) of every training position of ``shards`` that has a
    list (a user's first position has none)."""
    from prmkd_dist.distill.packed import PositionTeacherTable

    table = PositionTeacherTable.load(shards, split)
    targets = torch.from_numpy(np.asarray(split.train_items, dtype=np.int64))
    listed = (table.ids >= 0).any(dim=2).any(dim=1)
    return table.ids[listed], table.scores[listed], targets[listed], list(table.teacher_names)


def weight_grid(step: float) -> list[float]:
    if not 0 < step <= 1:
        raise ValueError(f"--step must be in (0, 1], got {step}")
    n = int(round(1 / step))
    if abs(n * step - 1) > 1e-9:
        raise ValueError(f"--step must divide 1 (0.1, 0.05, 0.25, ...), got {step}")
    return [round(j * step, 10) for j in range(n, -1, -1)]


def mix_table(lists: dict, temperatures: list[float], grid: list[float], num_items: int) -> list[dict]:
    """One row per (temperature, weight): the metrics of the mixture on every stage. With two teachers the
    weight is teacher 1's (teacher 2 gets 1 - w); with more, only the uniform mix (w = None)."""
    rows, index = [], None
    n_t = next(iter(lists.values()))[0].shape[1]
    for tau in temperatures:
        probs = {stage: teacher_probs(ids, scores, tau) for stage, (ids, scores, _) in lists.items()}
        index = index or {stage: MixtureIndex(ids, targets) for stage, (ids, _, targets) in lists.items()}
        weights = [torch.tensor([w, 1 - w], dtype=torch.float64) for w in grid] if n_t == 2 else [None]
        for w in weights:
            wt = torch.full((n_t,), 1.0 / n_t, dtype=torch.float64) if w is None else w
            row = {"temperature": tau, "weights": [round(float(x), 10) for x in wt]}
            for stage in lists:
                ranks, entropy, mass = index[stage].measure(probs[stage] * wt.view(1, -1, 1), num_items)
                row[stage] = {**metrics(ranks), "entropy": float(entropy.mean()), "target_p": float(mass.mean())}
            rows.append(row)
    return rows


def select(rows: list[dict], names: list[str]) -> dict:
    """Per temperature: the validation-selected weight (valid NDCG@10; ties to the earlier grid point) and its
    test NDCG@20 against each teacher alone and the uniform mix. Empty without held-out rows."""
    out = {}
    if not rows or "valid" not in rows[0]:
        return out
    for tau in sorted({r["temperature"] for r in rows}):
        rs = [r for r in rows if r["temperature"] == tau]
        best = max(rs, key=lambda r: r["valid"]["NDCG@10"])
        alone = {name: next((r for r in rs if r["weights"][j] == 1.0), None) for j, name in enumerate(names)}
        uniform = next((r for r in rs if len(set(r["weights"])) == 1), None)
        entry = {"selected_weights": best["weights"], "valid NDCG@10": best["valid"]["NDCG@10"],
                 "test NDCG@20": best["test"]["NDCG@20"]}
        for name, r in alone.items():
            if r is not None:
                entry[f"{name} alone: test NDCG@20"] = r["test"]["NDCG@20"]
        if uniform is not None:
            entry["uniform: test NDCG@20"] = uniform["test"]["NDCG@20"]
        single = [r["test"]["NDCG@20"] for r in alone.values() if r is not None]
        if single and max(single) > 0:
            entry["vs the better teacher alone (test NDCG@20)"] = best["test"]["NDCG@20"] / max(single) - 1
        out[str(tau)] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR",
                    help="a saved teacher (repeat; two for the weight grid)")
    ap.add_argument("--shards", default=None, help="merged shards: the curve on their training positions too")
    ap.add_argument("--k", type=int, default=50, help="list length, as exported (default 50)")
    ap.add_argument("--max-history", type=int, default=200, help="as exported (default 200)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0])
    ap.add_argument("--step", type=float, default=0.1, help="weight grid step for two teachers (default 0.1)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=None, help="JSON report")
    args = ap.parse_args(argv)

    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers.base import load_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    if any(t <= 0 for t in args.temperature):
        ap.error(f"--temperature must be > 0, got {args.temperature}")
    grid = weight_grid(args.step)
    named = {}
    for spec in args.teacher:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            ap.error(f"--teacher expects NAME=DIR, got {spec!r}")
        if name in named:
            ap.error(f"--teacher: the name {name!r} is given twice")
        named[name] = path
    if not named and not args.shards:
        ap.error("give --teacher NAME=DIR (two for the weight grid) and/or --shards DIR")
    _, split = load_split(args.dataset)
    start = time.perf_counter()
    rows, names, shard_names = [], list(named), []
    if named:
        teachers = {name: load_teacher(path, fingerprint=split.data.fingerprint) for name, path in named.items()}
        lists = {stage: teacher_lists(teachers, split, stage, args.k, args.max_history, args.batch_size)
                 for stage in STAGES}
        rows = mix_table(lists, args.temperature, grid, split.data.num_items)
        print(f"{args.dataset}: teachers {names}, top-{args.k} lists, {len(lists['valid'][2])} valid / "
              f"{len(lists['test'][2])} test users ({time.perf_counter() - start:.0f} s)")
    if args.shards:
        ids, scores, targets, shard_names = shard_lists(args.shards, split)
        if named and len(shard_names) != len(names):
            ap.error(f"--shards {args.shards} holds {len(shard_names)} teachers {shard_names}, --teacher gives "
                     f"{len(names)}: the weights would not line up")
        train_rows = mix_table({"train": (ids, scores, targets)}, args.temperature, grid, split.data.num_items)
        for r, t in zip(rows, train_rows):
            r["train"] = t["train"]
        rows = rows or train_rows
        print(f"{args.shards}: teachers {shard_names}, {len(targets):,} listed training positions")
    summary = select(rows, names)

    stages = [st for st in ("valid", "test", "train") if st in rows[0]]
    shown = [f"NDCG@{k}" for k in KS] + ["entropy", "target_p"]
    cols = " | ".join(f"{st} {m}" for st in stages for m in shown)
    print(f"| tau | weights ({' / '.join(names or shard_names)}) | {cols} |")
    print("|---:|---|" + "---:|" * (len(stages) * len(shown)))
    for r in rows:
        vals = " | ".join(f"{r[st][m]:.4f}" for st in stages for m in shown)
        print(f"| {r['temperature']:g} | {' / '.join(f'{w:g}' for w in r['weights'])} | {vals} |")
    for tau, entry in summary.items():
        print(f"tau {tau}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in entry.items()))
    if args.out:
        report = {"dataset": args.dataset, "teachers": named, "shards": args.shards, "shard_teachers": shard_names,
                  "k": args.k, "max_history": args.max_history, "temperatures": args.temperature, "grid": grid,
                  "rows": rows, "selected": summary, "seconds": time.perf_counter() - start,
                  "command": " ".join(["benchmarks/teacher_mix.py", *(argv if argv is not None else sys.argv[1:])])}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
