"""Training of the neural teachers: the project's trainer (``prmkd_dist.train.trainer.train``: full-softmax
CE on the training split, early stopping on validation NDCG@10, best weights restored, test read once)
applied to the teacher's network. Nothing here re-implements a loop; this only maps teacher settings to a
TrainConfig and records the outcome in ``teacher.info`` (saved with the teacher)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.teachers.base import SequentialModelTeacher, TeacherError
from prmkd_dist.train.config import (DataConfig, DistillConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig,
                                     TrainConfig)
from prmkd_dist.train.trainer import TrainResult, train


def fit_teacher(teacher: SequentialModelTeacher, split: LeaveOneOutSplit, *, lr: float = 1e-3,
                batch_size: int = 128, epochs: int = 200, patience: int = 5, eval_every: int = 1,
                weight_decay: float = 0.0, grad_clip: float = 0.0, seed: int = 0, num_threads: int = 0,
                windows: str = "last", distill: DistillConfig | None = None, out_dir: str | Path | None = None,
                progress: bool = False, tensorboard: bool = False, resume: bool = False) -> TrainResult:
    """Train ``teacher`` in place on ``split``'s training prefixes; returns the trainer's TrainResult and
    stores its summary (best epoch, validation/test metrics, seconds) in ``teacher.info``.
    ``windows``: the trainer's ``data.windows`` ("all" trains on every training interaction of long
    histories, see ``prmkd_dist.train.trainer.training_examples``).
    ``distill``: train on the CE target plus another teacher's exported top-K (``distill.shards``), through the
    students' distillation trainer (``prmkd_dist.distill.trainer.train_distilled``): a teacher distilled from a
    stronger one (on Games the large ID transformer learns from SLIST, issue 4). Plain KD/ranking terms only:
    the item-table extensions of embedding distillation and MKD would change the teacher's network.

    ``out_dir``: where the trainer writes its checkpoint/results (default: a temporary directory); ``resume``: keep
    its state after every epoch there and continue an interrupted training (the trainer's ``run.resume``)."""
    teacher.check_compatible(split.data.fingerprint)
    if teacher.num_items != split.data.num_items:
        raise TeacherError(f"teacher {teacher.name!r} has {teacher.num_items} items, dataset {split.data.name!r} has {split.data.num_items}")
    cfg = TrainConfig(
        data=DataConfig(dataset=split.data.name, max_len=teacher.max_len, windows=windows),
        model=ModelConfig(name=f"teacher:{teacher.kind}", hparams=teacher.config()),
        optim=OptimConfig(lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, patience=patience,
                          eval_every=eval_every, grad_clip=grad_clip),
        eval=EvalConfig(ks=(10, 20)),
        run=RunConfig(seed=seed, out_dir="", num_threads=num_threads, tensorboard=tensorboard, progress=progress,
                      resume=resume and out_dir is not None),
    )
    if distill is not None:
        if not distill.enabled:
            raise TeacherError(f"teacher {teacher.name!r}: distill.shards names no shard directory")
        if distill.embedding.enabled or distill.mkd.nkd or distill.mkd.cpd > 0:
            raise TeacherError(f"teacher {teacher.name!r}: a teacher distils with the KD and ranking terms only "
                               "(embedding distillation and MKD change the network; turn them off)")
        cfg.distill = distill
    with tempfile.TemporaryDirectory(prefix=f"teacher-{teacher.kind}-") as tmp:
        cfg.run.out_dir = str(out_dir) if out_dir is not None else tmp
        if distill is not None:
            from prmkd_dist.distill.trainer import train_distilled

            result = train_distilled(cfg, split, model=teacher.model)
        else:
            result = train(cfg, split, model=teacher.model)
    teacher.eval()
    teacher.info.update({
        "dataset": split.data.name,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": round(result.train_seconds, 2),
        "valid": result.valid,
        "test": result.test,
        "optim": {"lr": lr, "batch_size": batch_size, "epochs": epochs, "patience": patience,
                  "weight_decay": weight_decay, "seed": seed, "windows": windows},
    })
    if distill is not None:
        teacher.info["distilled_from"] = distill.shards
    return result
