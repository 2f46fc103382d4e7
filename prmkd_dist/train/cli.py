"""`prmkd-dist train | eval | quickstart` sub-commands."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prmkd_dist.train.config import ConfigError, load_config
from prmkd_dist.train.utils import format_table

TABLE_COLUMNS = ["HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR"]


def result_rows(name: str, valid: dict, test: dict) -> dict[str, dict]:
    """Two table rows (``name (valid)``, ``name (test)``) of the standard columns."""
    return {f"{name} (valid)": {c: valid.get(c) for c in TABLE_COLUMNS},
            f"{name} (test)": {c: test.get(c) for c in TABLE_COLUMNS}}


# ---- train ------------------------------------------------------------------------------------------
def _user_error(e: ValueError) -> int:
    """Bad input (config, checkpoint, dataset): one clear line on stderr, exit code 2, no traceback."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace) -> int:
    from prmkd_dist.train.trainer import train

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        return _user_error(e)
    if args.out_dir:
        cfg.run.out_dir = args.out_dir
    if args.no_progress:
        cfg.run.progress = False
    if cfg.distill.enabled:  # a config with distill.shards trains on the teachers' shards
        from prmkd_dist.data.shards import ShardFormatError
        from prmkd_dist.distill.trainer import train_distilled

        try:
            result = train_distilled(cfg)
        except (ConfigError, ShardFormatError, FileNotFoundError) as e:
            return _user_error(e)
    else:
        result = train(cfg)
    print(f"best epoch {result.best_epoch} of {result.epochs_run}, train {result.train_seconds:.1f}s, "
          f"checkpoint {result.checkpoint_dir}")
    print(format_table(result_rows(cfg.model.name, result.valid, result.test), TABLE_COLUMNS))
    if result.test_sampled is not None:
        print(f"sampled protocol ({cfg.eval.num_negatives} negatives), test: "
              f"HR@10 {result.test_sampled['HR@10']:.4f}  NDCG@10 {result.test_sampled['NDCG@10']:.4f}")
    return 0


# ---- eval -------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from prmkd_dist.train.evaluate import evaluate, evaluate_sampled
    from prmkd_dist.train.trainer import CheckpointError, load_checkpoint, load_split_for

    try:
        if not (Path(args.checkpoint) / "config.yaml").is_file():
            raise CheckpointError(f"{args.checkpoint}: not a student checkpoint (no config.yaml); "
                                  "pass the checkpoint/ directory written by `prmkd-dist train`")
        cfg = load_config(Path(args.checkpoint) / "config.yaml")
        split = load_split_for(args.dataset or cfg.data.dataset)
        model, cfg, meta = load_checkpoint(args.checkpoint, split)
    except (ConfigError, CheckpointError) as e:
        return _user_error(e)
    metrics = evaluate(model, split, args.stage, ks=tuple(cfg.eval.ks), batch_size=cfg.eval.batch_size,
                       exclude_history=cfg.eval.exclude_history, max_len=cfg.data.max_len,
                       progress=not args.no_progress)
    name = f"{cfg.model.name} ({args.stage})"
    print(format_table({name: metrics}, [c for c in TABLE_COLUMNS if c in metrics] + ["users"]))
    if args.sampled:
        s = evaluate_sampled(model, split, args.stage, num_negatives=cfg.eval.num_negatives, seed=args.seed,
                             max_len=cfg.data.max_len, batch_size=cfg.eval.batch_size, progress=not args.no_progress)
        print(f"sampled protocol ({cfg.eval.num_negatives} negatives): HR@10 {s['HR@10']:.4f}  NDCG@10 {s['NDCG@10']:.4f}")
    return 0


# ---- quickstart -------------------------------------------------------------------------------------
@dataclass
class QuickstartResult:
    rows: dict[str, dict] = field(default_factory=dict)  # table rows, in print order
    seconds: float = 0.0
    train_result: object = None
    distill_results: dict = field(default_factory=dict)  # {"no distillation" | "distilled": TrainResult}

    def table(self) -> str:
        return format_table(self.rows, TABLE_COLUMNS)


def run_quickstart(fast: bool = False, out_dir: str | None = None, overrides: list[str] | None = None,
                   progress: bool = True, distill: bool = False) -> QuickstartResult:
    """Prepare ml-latest-small, fit Popularity and ItemKNN, train SASRec (configs/quickstart.yaml); with
    ``distill``, also train the teachers, export their shards and train SASRec on them with and without
    distillation (configs/distill-quickstart.yaml); return the validation/test table. ``fast`` trains a
    few epochs only and the teachers' fast settings (smoke run).

    ``distill`` is off by default: training the three teachers takes far longer than the README's
    minutes-long main command allows on a 2-core CPU (see benchmarks/RESULTS.md)."""
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.models import ItemKNN, Popularity
    from prmkd_dist.train.evaluate import evaluate
    from prmkd_dist.train.trainer import train

    t0 = time.perf_counter()
    ov = list(overrides or [])
    if fast:
        ov = ["optim.epochs=4", "optim.eval_every=2", *ov]
    if out_dir:
        ov.append(f"run.out_dir={out_dir}")
    cfg = load_config("quickstart", ov)
    cfg.run.progress = progress
    _, split = load_split(cfg.data.dataset)
    result = QuickstartResult()
    ev = dict(ks=tuple(cfg.eval.ks), batch_size=cfg.eval.batch_size, exclude_history=cfg.eval.exclude_history,
              max_len=cfg.data.max_len, progress=progress)
    for name, baseline in (("Popularity", Popularity.fit(split)), ("ItemKNN", ItemKNN.fit(split))):
        result.rows.update(result_rows(name, evaluate(baseline, split, "valid", **ev),
                                       evaluate(baseline, split, "test", **ev)))
    tr = train(cfg, split)
    result.rows.update(result_rows(f"SASRec (epoch {tr.best_epoch})", tr.valid, tr.test))
    result.train_result = tr
    if distill:
        result.distill_results = _distillation_stage(result, cfg.data.dataset, split, fast, cfg.run.out_dir, progress)
    result.seconds = time.perf_counter() - t0
    Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run.out_dir) / "quickstart.json").write_text(json.dumps({"rows": result.rows, "seconds": result.seconds}, indent=2))
    return result


def _distillation_stage(result: QuickstartResult, dataset: str, split, fast: bool, out_dir: str,
                        progress: bool) -> dict:
    """Teachers -> shards -> SASRec trained on the shards twice from the same seed: without
    distillation (lambda_kd = lambda_rank = 0: CE on the same examples) and distilled from all teachers
    (configs/distill-quickstart.yaml). Adds the teachers' and both students' rows to ``result``."""
    from prmkd_dist.distill.trainer import train_distilled
    from prmkd_dist.teachers.pipeline import run_teacher_pipeline

    report = run_teacher_pipeline(dataset, Path(out_dir) / "teachers", fast=fast, progress=progress)
    for name, t in report["teachers"].items():
        result.rows.update(result_rows(f"teacher {name}", t["metrics"]["valid"], t["metrics"]["test"]))
    # --fast: a smoke run: a small SASRec, one epoch of 100 batches (25.6k of the ~99k training prefixes)
    smoke = ["optim.epochs=1", "distill.max_batches_per_epoch=100", "data.max_len=20",
             "model.hparams={dim: 32, num_layers: 1, num_heads: 1, dropout: 0.2}"]
    common = [f"distill.shards={report['shards']['out_dir']}", *(smoke if fast else [])]
    runs = {"no distillation": ["distill.lambda_kd=0", "distill.lambda_rank=0"], "distilled": []}
    out = {}
    for label, extra in runs.items():
        dcfg = load_config("distill-quickstart", [*common, *extra,
                                                  f"run.out_dir={Path(out_dir) / ('distill-' + label.replace(' ', '-'))}"])
        dcfg.run.progress = progress
        tr = train_distilled(dcfg, split)
        out[label] = tr
        name = "SASRec on shards, CE only" if label == "no distillation" else "SASRec distilled (all teachers)"
        result.rows.update(result_rows(f"{name} (epoch {tr.best_epoch})", tr.valid, tr.test))
    return out


def cmd_quickstart(args: argparse.Namespace) -> int:
    res = run_quickstart(fast=args.fast, out_dir=args.out_dir, overrides=args.set, progress=not args.no_progress,
                         distill=args.distill)
    print(f"ml-latest-small, full ranking over the catalog (history excluded), {res.seconds:.0f}s")
    print(res.table())
    return 0


# ---- registration -----------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a student from a YAML config")
    p.add_argument("--config", required=True, help="YAML file, or a packaged config name (e.g. sasrec-ml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--out-dir", help="shortcut for --set run.out_dir=DIR")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("eval", help="evaluate a trained student checkpoint (full ranking)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by `train`")
    p.add_argument("--stage", choices=["valid", "test"], default="test")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the one in the checkpoint's config)")
    p.add_argument("--sampled", action="store_true", help="also report the 100-sampled-negatives protocol")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("quickstart", help="ml-latest-small: baselines, SASRec, teachers, distilled SASRec: table")
    p.add_argument("--fast", action="store_true", help="a few epochs only (smoke run)")
    p.add_argument("--distill", action="store_true",
                   help="also train the teachers, export shards and train a distilled SASRec (long on CPU)")
    p.add_argument("--out-dir", help="run directory (default from configs/quickstart.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override quickstart.yaml")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quickstart)
