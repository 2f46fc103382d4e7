"""`prmkd-dist teachers train | export | eval | pipeline`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _user_error(e: Exception) -> int:
    """Bad input (config, teacher directory, dataset): one line on stderr, exit code 2."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[Exception], ...]:
    from prmkd_dist.data.dataset import DatasetFormatError
    from prmkd_dist.data.shards import ShardFormatError
    from prmkd_dist.teachers.base import TeacherError
    from prmkd_dist.teachers.export import ExportError
    from prmkd_dist.teachers.pipeline import TeacherConfigError

    return (TeacherConfigError, TeacherError, ExportError, ShardFormatError, DatasetFormatError, FileNotFoundError)


def cmd_train(args: argparse.Namespace) -> int:
    from prmkd_dist.data.paths import artifacts_root
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers.pipeline import load_teacher_config, measure_teacher, train_teacher

    try:
        cfg = load_teacher_config(args.config, fast=args.fast)
        data, split = load_split(args.dataset or cfg.dataset)
        out = Path(args.out) if args.out else artifacts_root() / "teachers" / data.name / "models" / cfg.name
        t0 = time.perf_counter()
        teacher = train_teacher(cfg, split, progress=not args.no_progress)
    except _user_errors() as e:
        return _user_error(e)
    teacher.save(out)
    print(f"{cfg.name} ({cfg.kind}): trained in {time.perf_counter() - t0:.1f}s, saved to {out}")
    _print_measure(cfg.name, measure_teacher(teacher, split, progress=not args.no_progress))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers.base import load_teacher
    from prmkd_dist.teachers.export import export_teacher_shards

    try:
        data, split = load_split(args.dataset)
        teacher = load_teacher(args.teacher, fingerprint=data.fingerprint)
        report = export_teacher_shards(teacher, split, args.out, name=args.name, k=args.k, max_history=args.max_history,
                                       batch_size=args.batch_size, domain_id=args.domain_id,
                                       resume=not args.overwrite, progress=not args.no_progress)
    except _user_errors() as e:
        return _user_error(e)
    print(f"{report['teacher']}: {report['num_rows']} examples, top-{report['k']} ({report['score_semantics']}), "
          f"{report['num_parts']} part(s) ({len(report['parts_skipped'])} already done) in {report['seconds']:.1f}s "
          f"-> {report['out_dir']}" + (f"; embeddings -> {report['embeddings']}" if report["embeddings"] else ""))
    return 0


def cmd_from_student(args: argparse.Namespace) -> int:
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers.pipeline import measure_teacher
    from prmkd_dist.teachers.student import StudentTeacher

    try:
        teacher = StudentTeacher.from_checkpoint(args.checkpoint, name=args.name)
        if args.dataset:
            data, split = load_split(args.dataset)
            teacher.check_compatible(data.fingerprint)
    except _user_errors() as e:
        return _user_error(e)
    teacher.save(args.out)
    print(f"{teacher.name} ({teacher.kind}: {teacher.model_name}, {teacher.num_parameters():,} weights) from "
          f"{args.checkpoint} -> {args.out}")
    if args.dataset:
        _print_measure(teacher.name, measure_teacher(teacher, split, progress=not args.no_progress))
    return 0


def _print_measure(name: str, m: dict) -> None:
    from prmkd_dist.train.utils import format_table

    cols = ["HR@10", "HR@20", "NDCG@10", "NDCG@20", "MRR"]
    print(format_table({f"{name} (valid)": m["valid"], f"{name} (test)": m["test"]}, cols))
    print(f"parameters {m['params']:,}; inference {m['ms_per_1k_users']:.1f} ms per 1,000 users "
          f"(score + top-10, {m['threads']} thread(s))")


def cmd_eval(args: argparse.Namespace) -> int:
    from prmkd_dist.data.prepare import load_split
    from prmkd_dist.teachers.base import load_teacher
    from prmkd_dist.teachers.pipeline import measure_teacher

    try:
        data, split = load_split(args.dataset)
        teacher = load_teacher(args.teacher, fingerprint=data.fingerprint)
    except _user_errors() as e:
        return _user_error(e)
    _print_measure(teacher.name, measure_teacher(teacher, split, progress=not args.no_progress))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    import torch

    from prmkd_dist.teachers.pipeline import format_report, run_teacher_pipeline

    if args.threads is not None:
        if args.threads < 1:
            return _user_error(ValueError(f"--threads {args.threads}: expected >= 1"))
        torch.set_num_threads(args.threads)  # float sums depend on it: the report records it
    folds = args.cross_fit_folds
    if folds is not None and folds != ["auto"]:
        if not all(f.isdigit() for f in folds):
            return _user_error(ValueError(f"--cross-fit-folds {' '.join(folds)}: expected fold numbers (1-based) "
                                          "or 'auto'"))
        folds = [int(f) for f in folds]
    elif folds is not None:
        folds = "auto"
    pretrained = {}
    for item in args.use_trained or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            return _user_error(ValueError(f"--use-trained {item!r}: expected NAME=DIR"))
        pretrained[name] = path
    try:
        report = run_teacher_pipeline(args.dataset, args.out, fast=args.fast, teachers=args.teachers,
                                      pretrained=pretrained, progress=not args.no_progress,
                                      cross_fit_folds=folds)
    except _user_errors() as e:
        return _user_error(e)
    if folds is not None:  # a fold worker: no teachers to show yet
        for name, c in report["cross_fit"].items():
            done = f"fold(s) {', '.join(map(str, c['fitted']))}" if c["fitted"] else "no fold"
            print(f"{name}: {done} of {c['folds']} fitted here in {c['seconds']:.0f}s"
                  + ("; every fold is finished: run the pipeline without --cross-fit-folds to export and merge"
                     if c["complete"] else "; other folds not finished yet"))
    else:
        print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("teachers", help="train, export, evaluate the teachers; the one-command teacher pipeline")
    sub = p.add_subparsers(dest="teachers_command", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="train one teacher from a teacher config and save it")
    t.add_argument("--config", required=True, help="teacher YAML, or a builtin name (e.g. id_transformer-ml)")
    t.add_argument("--dataset", default=None, help="override the config's dataset")
    t.add_argument("--out", default=None, help="default: artifacts/teachers/<dataset>/models/<name>")
    t.add_argument("--fast", action="store_true", help="apply the config's `fast` overrides (smoke run)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="write a saved teacher's top-K over the training examples as shards")
    e.add_argument("--teacher", required=True, help="saved teacher directory (Teacher.save)")
    e.add_argument("--dataset", required=True, help="builtin name, reader YAML or prepared directory")
    e.add_argument("--out", required=True, help="shard directory for this teacher (resumed if interrupted)")
    e.add_argument("--name", default=None, help="teacher name in the shards (default: the teacher's)")
    e.add_argument("--k", type=int, default=50)
    e.add_argument("--max-history", type=int, default=200)
    e.add_argument("--batch-size", type=int, default=512)
    e.add_argument("--domain-id", type=int, default=None,
                   help="domain_id of every row (default 0; a multi-domain dataset takes each user's domain)")
    e.add_argument("--overwrite", action="store_true", help="discard a previous export in --out instead of resuming")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("from-student", help="save a trained student checkpoint as a teacher (born-again distillation)")
    s.add_argument("--checkpoint", required=True, help="student checkpoint directory (model.pt, config.yaml, meta.json)")
    s.add_argument("--out", required=True, help="teacher directory to write")
    s.add_argument("--name", default=None, help="teacher name in the shards (default: student-<model>)")
    s.add_argument("--dataset", default=None, help="also check the item space and print the teacher's metrics and cost")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_from_student)

    v = sub.add_parser("eval", help="full-ranking metrics, parameters and inference cost of a saved teacher")
    v.add_argument("--teacher", required=True)
    v.add_argument("--dataset", required=True)
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_eval)

    pl = sub.add_parser("pipeline", help="train + export + merge + validate + compare a dataset's teachers")
    pl.add_argument("--dataset", required=True, help="ml-latest-small | amazon-games (or a prepared dir with --teachers)")
    pl.add_argument("--out", default=None, help="default: artifacts/teachers/<dataset>")
    pl.add_argument("--fast", action="store_true", help="tiny teachers, one epoch: a smoke run")
    pl.add_argument("--teachers", nargs="+", default=None, help="teacher configs (default: the dataset's set)")
    pl.add_argument("--use-trained", action="append", metavar="NAME=DIR",
                    help="use this saved teacher for NAME instead of training it (repeatable)")
    pl.add_argument("--cross-fit-folds", nargs="+", default=None, metavar="F",
                    help="fold worker: fit only these folds (1-based) of the cross-fitted teachers and stop; run "
                         "workers for the other folds beside it (same --out), then the pipeline without this flag; "
                         "'auto': fit every fold no other live worker has claimed (start N identical workers)")
    pl.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); e.g. 1 for each of several fold workers")
    pl.add_argument("--json", action="store_true", help="also print the whole report as JSON")
    pl.add_argument("--no-progress", action="store_true")
    pl.set_defaults(func=cmd_pipeline)
