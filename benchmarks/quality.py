"""Quality of multi-teacher distillation: one student, the same shards, several distillation methods.

For a dataset and a student config (default ``distill-<student>-ml``), each variant is trained from the
same seeds on the same examples (every training prefix in the teachers' shards); the model is selected
on validation NDCG@10 (early stopping) and the test split is read once, at the end of each run:

    no distillation              lambda_kd = lambda_rank = 0 (CE on the same examples)
    teacher <name> alone         one teacher column (for each teacher in the shards)
    all teachers, uniform        teacher_weights strategy "uniform"
    all teachers, conf+cons      strategy "confidence_consistency"
    + ranking distillation       lambda_rank > 0 (importance-aware, DLLM2Rec)
    + embedding distillation     collaborative embedding distillation (needs teacher item embeddings)
    teacher <name> alone + embedding distillation
                                 its control: one teacher's lists, the same ranking term and item embeddings
                                 (the embeddings are every teacher's that has them, as above)
    + curriculum                 disagreement curriculum, linear pacing
    MKD                          conf+cons + NKD + CPD + SLD (needs teacher item embeddings)

The "+" rows are cumulative, as the issue lists them (embedding and curriculum keep the ranking term);
MKD starts again from conf+cons, without the ranking term.

Reports mean and std over seeds of validation and test metrics and the relative test improvement over
"no distillation"; prints markdown and writes JSON. Shards come from ``--shards`` (with
``--teacher-embeddings``) or from running the teacher pipeline on ``--dataset`` (``--fast-teachers``
for its smoke settings).

    python benchmarks/quality.py --dataset ml-latest-small --student sasrec --seeds 3
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from prmkd_dist.data.paths import write_json_atomic
from prmkd_dist.data.prepare import load_split
from prmkd_dist.distill.trainer import train_distilled
from prmkd_dist.train.config import load_config
from prmkd_dist.train.trainer import RESUME_FILE, read_resume_state
from prmkd_dist.train.utils import format_table

METRICS = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "MRR")
BASELINE = "no distillation"


def variants(teachers: list[str], have_embeddings: bool, rank: float, curriculum_epochs: int) -> dict[str, list[str]]:
    """{variant name: config overrides}, in report order."""
    cc = ["distill.strategy=confidence_consistency"]
    out = {BASELINE: ["distill.lambda_kd=0", "distill.lambda_rank=0"]}
    for t in teachers:
        out[f"teacher {t} alone"] = [f"distill.teachers=[{t}]", "distill.strategy=uniform", "distill.lambda_rank=0"]
    out["all teachers, uniform"] = ["distill.strategy=uniform", "distill.lambda_rank=0"]
    out["all teachers, conf+cons"] = [*cc, "distill.lambda_rank=0"]
    # confidence alone: per example, the teachers that rank the ground truth higher count more (PRM-KD's
    # confidence term without the overlap term, which cannot tell two teachers with full top-K lists apart)
    out["all teachers, confidence"] = ["distill.strategy=confidence", "distill.lambda_rank=0"]
    out["+ ranking distillation"] = [*cc, f"distill.lambda_rank={rank}"]
    if have_embeddings:
        out["+ embedding distillation"] = [*cc, f"distill.lambda_rank={rank}", "distill.embedding.enabled=true"]
        # its control: one teacher's lists with the same ranking term and the same item embeddings, so that
        # "multi-teacher above the best single teacher" is judged with the embeddings on both sides
        for t in teachers:
            out[f"teacher {t} alone + embedding distillation"] = [
                f"distill.teachers=[{t}]", *cc, f"distill.lambda_rank={rank}", "distill.embedding.enabled=true"]
    out["+ curriculum"] = [*cc, f"distill.lambda_rank={rank}", "distill.curriculum.kind=disagreement",
                           f"distill.curriculum.epochs={curriculum_epochs}"]
    if have_embeddings:
        out["MKD (NKD + CPD + SLD)"] = [*cc, "distill.lambda_rank=0", "distill.mkd.nkd=true", "distill.mkd.cpd=0.5",
                                        "distill.mkd.sld=0.5"]
    return out


def summarise(runs: list[dict]) -> dict:
    out = {}
    for stage in ("valid", "test"):
        for m in METRICS:
            vals = np.array([r[stage][m] for r in runs], dtype=np.float64)
            out[f"{stage} {m}"] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    out["best_epoch"] = [r["best_epoch"] for r in runs]
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in runs]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-latest-small", help="builtin name, reader YAML or prepared dir")
    ap.add_argument("--student", default="sasrec", choices=["sasrec", "gru4rec", "caser"])
    ap.add_argument("--config", help="base config (default: distill-<student>-ml)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (to add seeds to a run)")
    ap.add_argument("--shards", help="merged teacher shards (default: run the teacher pipeline)")
    ap.add_argument("--teacher-embeddings", nargs="*", default=None, help="embedding shard dirs (with --shards)")
    ap.add_argument("--teachers-out", help="teacher pipeline output dir (default artifacts/teachers/<dataset>)")
    ap.add_argument("--fast-teachers", action="store_true", help="teacher pipeline smoke settings")
    ap.add_argument("--only", nargs="*", help="run only these variants (names as printed)")
    ap.add_argument("--rank", type=float, default=0.5, help="lambda_rank of the ranking variants")
    ap.add_argument("--curriculum-epochs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--run-dir", default="runs/quality", help="per-run checkpoints and logs (not results)")
    ap.add_argument("--baseline-from", metavar="JSON", nargs="+",
                    help="take the no-distillation runs of these seeds from earlier reports of this script (same "
                         "dataset and config; several when lanes split the baseline's seeds) instead of training "
                         "them again")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished runs of an unfinished report at --out (same dataset, config, shards, "
                         "teacher embeddings and --set, and the same files there: the report records their content "
                         "digests) and run only the rest; a run cut short continues after its last finished epoch "
                         "(run.resume)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    # the call as a shell line (variant names hold spaces), whether from the shell or from main(argv)
    args.command = shlex.join(["benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])

    t_all = time.perf_counter()
    _, split = load_split(args.dataset)
    if args.shards:
        shards, embeddings = args.shards, list(args.teacher_embeddings or [])
    else:
        from prmkd_dist.teachers.pipeline import run_teacher_pipeline

        report = run_teacher_pipeline(args.dataset, args.teachers_out, fast=args.fast_teachers, progress=args.progress)
        shards = report["shards"]["out_dir"]
        embeddings = [t["export"]["embeddings"] for t in report["teachers"].values() if t["export"].get("embeddings")]
    from prmkd_dist.data.shards import ShardSet

    shard_set = ShardSet.open(shards)
    teachers = list(shard_set.meta.teacher_names)
    # what the runs distil from, by content: the paths alone cannot tell a rebuilt teacher pipeline from the old one
    args.digests = {"shards": shard_set.content_digest(),
                    "teacher_embeddings": [ShardSet.open(e, kind="embeddings").content_digest() for e in embeddings]}
    base = args.config or f"distill-{args.student}-ml"
    emb_set = [f"distill.teacher_embeddings=[{','.join(embeddings)}]"] if embeddings else []
    plan = variants(teachers, bool(embeddings), args.rank, args.curriculum_epochs)
    order = list(plan)
    if args.only:
        unknown = [v for v in args.only if v not in plan]
        if unknown:
            ap.error(f"unknown variant {unknown[0]!r}; variants: {list(plan)}")
        plan = {k: v for k, v in plan.items() if k in args.only or k == BASELINE}
    out_root = Path(args.run_dir) / Path(args.out).stem
    results: dict[str, dict] = {}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    resuming = args.resume and Path(args.out).exists()
    # a resumed report holds the seeds of every call that filled it (--first-seed adds seeds to a report)
    args.report_seeds = sorted(set(seeds) | set(earlier_seeds(args.out) if resuming else []))
    if args.baseline_from:
        results[BASELINE] = earlier_baseline(args.baseline_from, split.data.name, base, args.report_seeds)
        plan.pop(BASELINE)
    done = (finished_runs(args.out, split.data.name, base, shards, embeddings, args.set, args.digests)
            if resuming else {})
    if done:
        results.update(carried_over(args.out, done, [*plan, *results]))
    args.commands = earlier_commands(args.out) if resuming else []
    # a resumed report that recorded no digests cannot vouch for one content: its earlier runs may have seen others
    resumed_legacy = resuming and json.loads(Path(args.out).read_text()).get("content_digests") is None
    args.report_digests = None if resumed_legacy else args.digests
    for name, overrides in plan.items():
        def train_one(seed: int, name=name, overrides=overrides) -> dict:
            run_dir = out_root / name.replace(" ", "_").replace(",", "").replace("+", "plus") / f"seed{seed}"
            cfg = load_config(base, [f"data.dataset={args.dataset}", f"distill.shards={shards}", *emb_set, *overrides,
                                     *args.set, f"run.seed={seed}", f"run.out_dir={run_dir}", "run.tensorboard=false"])
            cfg.run.progress = args.progress
            if args.resume:  # a run cut short continues after its last finished epoch
                cfg.run.resume = True
                state = run_dir / RESUME_FILE
                why = read_resume_state(state, cfg)[1] if state.exists() else ""
                if why:  # left by a run of other settings (a removed report's, an edited config)
                    print(f"[quality] {state}: {why}; that run starts over", file=sys.stderr, flush=True)
                    state.unlink()
            t0 = time.perf_counter()
            res = train_distilled(cfg, split)
            print(f"[quality] {name} seed {seed}: valid NDCG@10 {res.valid['NDCG@10']:.4f} test NDCG@10 "
                  f"{res.test['NDCG@10']:.4f} (epoch {res.best_epoch}, {time.perf_counter() - t0:.0f}s)", flush=True)
            # the intra-op thread count the run trained with: runs repeat exactly only at the same count
            return {"seed": seed, "valid": res.valid, "test": res.test, "best_epoch": res.best_epoch,
                    "epochs_run": res.epochs_run, "train_seconds": res.train_seconds, "threads": torch.get_num_threads()}

        def partial(runs: list[dict], name=name, overrides=overrides) -> None:
            # partial results after every run, so a run cut short by a timeout keeps what it finished
            results[name] = {"overrides": overrides, "runs": runs, "summary": summarise(runs)}
            _write(args, split, base, shards, teachers, embeddings, results, t_all, table=None)

        runs = run_variant(name, seeds, done.get(name, {}), train_one, partial, kept_from=args.out)
        results[name] = {"overrides": overrides, "runs": runs, "summary": summarise(runs)}
    results = in_report_order(results, order)

    base10 = results[BASELINE]["summary"]["test NDCG@10"]["mean"]
    base20 = results[BASELINE]["summary"]["test NDCG@20"]["mean"]
    rows = {}
    for name, r in results.items():
        s = r["summary"]
        rel = (s["test NDCG@10"]["mean"] / base10 - 1.0) * 100 if base10 > 0 else float("nan")
        rel20 = (s["test NDCG@20"]["mean"] / base20 - 1.0) * 100 if base20 > 0 else float("nan")
        r["relative_test_ndcg10_vs_no_distillation_pct"] = rel
        r["relative_test_ndcg20_vs_no_distillation_pct"] = rel20  # the goal metric
        rows[name] = {
            "valid NDCG@10": f"{s['valid NDCG@10']['mean']:.4f} ± {s['valid NDCG@10']['std']:.4f}",
            "test NDCG@10": f"{s['test NDCG@10']['mean']:.4f} ± {s['test NDCG@10']['std']:.4f}",
            "test NDCG@20": f"{s['test NDCG@20']['mean']:.4f} ± {s['test NDCG@20']['std']:.4f}",
            "test HR@10": f"{s['test HR@10']['mean']:.4f} ± {s['test HR@10']['std']:.4f}",
            "NDCG@10 vs no KD": "-" if name == BASELINE else f"{rel:+.1f}%",
            "NDCG@20 vs no KD": "-" if name == BASELINE else f"{rel20:+.1f}%",
            "epochs": ",".join(map(str, s["best_epoch"])),
            "s/run": f"{s['train_seconds']:.0f}",
        }
    table = format_table(rows)
    header = (f"{split.data.name}, student {base}, {args.seeds} seed(s), teachers {teachers}; full ranking, "
              f"validation-selected, test read once per run; mean ± std over seeds")
    print(header)
    print(table)
    _write(args, split, base, shards, teachers, embeddings, results, t_all, table=table)
    print(f"wrote {args.out} ({time.perf_counter() - t_all:.0f}s)")
    return 0


def earlier_baseline(paths: str | list[str], dataset: str, config: str, seeds: list[int]) -> dict:
    """The no-distillation runs of ``seeds`` from earlier reports (one, or several that each hold some of the seeds:
    lanes that split the baseline's seeds); ValueError naming the file and what does not match (another dataset or
    base config, other baseline overrides, a seed run differently in two of them, or a seed none of them has)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    by_seed: dict[int, dict] = {}
    where: dict[int, str] = {}
    overrides = None
    for path in paths:
        report = json.loads(Path(path).read_text())
        for key, want in (("dataset", dataset), ("config", config)):
            if report.get(key) != want:
                raise ValueError(f"{path}: its {key} is {report.get(key)!r}, this run's is {want!r}")
        earlier = report.get("results", {}).get(BASELINE)
        if earlier is None:
            raise ValueError(f"{path}: no {BASELINE!r} results in it")
        # reports written before quality.py recorded per-variant overrides: the baseline's are fixed (variants())
        ov = earlier.get("overrides", variants([], False, 0.0, 0)[BASELINE])
        if overrides is not None and ov != overrides:
            raise ValueError(f"{path}: its {BASELINE!r} overrides are {ov!r}, {paths[0]}'s are {overrides!r}")
        overrides = ov
        for run in earlier["runs"]:
            seed = run["seed"]
            if seed in by_seed and by_seed[seed] != run:
                raise ValueError(f"{path}: its {BASELINE!r} seed {seed} differs from {where[seed]}'s")
            by_seed.setdefault(seed, run)
            where.setdefault(seed, path)
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"{', '.join(paths)}: no {BASELINE!r} run for seed(s) {missing} (they have {sorted(by_seed)})")
    runs = [by_seed[s] for s in seeds]
    return {"overrides": overrides, "runs": runs, "summary": summarise(runs), "from": ", ".join(paths)}


def run_variant(name: str, seeds: list[int], kept: dict[int, dict], train_one, after_run, kept_from: str = "") -> list[dict]:
    """One variant's runs in seed order: a kept run (``--resume``) as it was, the others trained by
    ``train_one(seed)``, with ``after_run(runs so far)`` after each trained one. Kept runs of seeds outside
    ``seeds`` stay too (a ``--first-seed`` call adds seeds to a report, it does not replace them)."""
    runs = []
    for seed in sorted(set(seeds) | set(kept)):
        if seed in kept:
            runs.append(kept[seed])
            print(f"[quality] {name} seed {seed}: kept from {kept_from}", flush=True)
            continue
        runs.append(train_one(seed))
        after_run(runs)
    return runs


def finished_runs(path: str, dataset: str, config: str, shards: str, embeddings: list[str],
                  overrides: list[str], digests: dict | None = None) -> dict[str, dict[int, dict]]:
    """``{variant: {seed: run}}`` of the runs an earlier (maybe unfinished) report at ``path`` finished, for
    ``--resume``; ValueError naming the file and the field when it was made with other settings, whose runs would
    not be comparable with the ones still to come. ``digests`` (the shards' and embeddings' content digests) must
    match the report's too; a report written before they were recorded is resumed with a warning on stderr."""
    report = json.loads(Path(path).read_text())
    for key, want in (("dataset", dataset), ("config", config), ("shards", shards),
                      ("teacher_embeddings", embeddings), ("overrides", overrides)):
        if report.get(key) != want:
            raise ValueError(f"{path}: cannot resume, its {key} is {report.get(key)!r}, this run's is {want!r}")
    if digests is not None:
        earlier = report.get("content_digests")
        if earlier is None:
            print(f"[quality] warning: {path} records no content digests of its shards (written before they were "
                  f"recorded): cannot check that {shards} still holds the teachers its runs distilled from",
                  file=sys.stderr, flush=True)
        else:
            for key in ("shards", "teacher_embeddings"):
                if earlier.get(key) != digests.get(key):
                    raise ValueError(f"{path}: cannot resume, its runs distilled from {key} with content digest "
                                     f"{earlier.get(key)!r}, the files at the same path now have {digests.get(key)!r} "
                                     f"(rebuilt teachers: start a new --out)")
    return {name: {r["seed"]: r for r in res["runs"]}
            for name, res in report.get("results", {}).items() if "from" not in res}


def in_report_order(results: dict[str, dict], order: list[str]) -> dict[str, dict]:
    """``results`` in variants() order (calls and lanes finish in any order); names it does not know last, as they came."""
    return {k: results[k] for k in sorted(results, key=lambda k: order.index(k) if k in order else len(order))}


def carried_over(path: str, done: dict[str, dict[int, dict]], running: list[str]) -> dict[str, dict]:
    """The variants of the resumed report at ``path`` that this call does not run (not in ``running``): kept as
    they were, so that one report can be filled by several ``--only`` calls."""
    earlier = json.loads(Path(path).read_text())["results"]
    out = {}
    for name, by_seed in done.items():
        if name not in running:
            runs = [by_seed[s] for s in sorted(by_seed)]
            out[name] = {**earlier[name], "runs": runs, "summary": summarise(runs)}
    return out


def earlier_seeds(path: str) -> list[int]:
    """The seeds the report at ``path`` was asked for so far (a resumed report is filled by several calls)."""
    return list(json.loads(Path(path).read_text()).get("seeds") or [])


def earlier_commands(path: str) -> list[str]:
    """The commands that filled the report at ``path`` so far (a resumed report is filled by several calls)."""
    report = json.loads(Path(path).read_text())
    return list(report.get("commands") or ([report["command"]] if report.get("command") else []))


def _write(args, split, base, shards, teachers, embeddings, results, t_all, table) -> None:
    """The JSON report; ``complete`` is false (and ``table`` null) while runs are still to come."""
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    # atomic: another lane may read this report (--baseline-from) while runs still come
    write_json_atomic(args.out, {
        "dataset": split.data.name, "config": base, "seeds": args.report_seeds,
        "shards": shards, "teachers": teachers, "teacher_embeddings": embeddings, "overrides": args.set,
        "content_digests": getattr(args, "report_digests", None),
        "results": results, "table": table, "complete": table is not None,
        "seconds": time.perf_counter() - t_all, "command": args.command,
        "commands": [*getattr(args, "commands", []), args.command]})


if __name__ == "__main__":
    sys.exit(main())
