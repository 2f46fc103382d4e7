"""Shared fixtures. Tests read the real datasets from ../shared/data (next to the project root) or
from $PRMKD_SHARED_DATA; they never use copies committed to the repository."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton decorates its own language helpers (tl.zeros, ...) when it is FIRST imported, and torchrec/fbgemm
# and deepspeed import it while pytest collects other test modules. So the interpreter switch must be set
# here, before anything else: on a machine without a CUDA driver the Triton kernels run in the interpreter.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from prmkd_dist.data.dataset import InteractionData, LeaveOneOutSplit
from prmkd_dist.data.paths import SharedDataNotFoundError, shared_data_root

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real datasets (fails, never skips, when they are missing)."""
    try:
        root = shared_data_root()
    except SharedDataNotFoundError as e:
        pytest.fail(str(e))
    if not (root / "ml-latest-small" / "ratings.csv").exists():
        pytest.fail(f"shared datasets not found at {root} (set PRMKD_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def ml_small(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> InteractionData:
    """ml-latest-small in canonical form, prepared once per session into a pytest tmp dir (about 1 s).
    Shared by many tests: do not mutate its arrays."""
    from prmkd_dist.data.prepare import prepare_dataset

    return prepare_dataset("ml-latest-small", out_dir=tmp_path_factory.mktemp("data") / "ml-latest-small")


@pytest.fixture(scope="session")
def ml_small_split(ml_small: InteractionData) -> LeaveOneOutSplit:
    """Leave-one-out split of ``ml_small``."""
    return LeaveOneOutSplit.of(ml_small)


@pytest.fixture(scope="session")
def ml_tiny(ml_small: InteractionData) -> InteractionData:
    """The first 12 real users of ml-latest-small over only the items they interacted with (1,004; ids 0..C'-1 in
    raw-id order): closed-form teachers fit in well under a second. Do not mutate its arrays."""
    import numpy as np

    num_users = 12
    end = int(ml_small.offsets[num_users])
    kept = np.unique(ml_small.items[:end])
    remap = np.full(ml_small.num_items, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    return InteractionData(name="ml-tiny", num_users=num_users, num_items=len(kept),
                           offsets=ml_small.offsets[:num_users + 1].copy(), items=remap[ml_small.items[:end]],
                           timestamps=ml_small.timestamps[:end], item_raw_ids=ml_small.item_raw_ids[kept],
                           user_raw_ids=ml_small.user_raw_ids[:num_users],
                           item_text=[ml_small.item_text[i] for i in kept] if ml_small.item_text is not None else None)


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("quality")``: the module of ``benchmarks/quality.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_bench", PROJECT_ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


class TrainingInterrupted(Exception):
    """Raised by the ``interrupt_training`` fixture in place of a killed process."""


@pytest.fixture
def interrupt_training(monkeypatch):
    """``interrupt_training(stage, call)``: the trainer's ``call``-th evaluation of ``stage`` ("valid" or "test")
    raises TrainingInterrupted, as a kill at that point would stop the run (after that epoch's training, before its
    end-of-epoch state); ``interrupt_training(None)`` restores the real evaluation."""
    import prmkd_dist.train.trainer as trainer

    real = trainer.evaluate

    def arm(stage, call: int = 1):
        if stage is None:
            monkeypatch.setattr(trainer, "evaluate", real)
            return
        seen = {"n": 0}

        def evaluate(model, split, which, **kw):
            if which == stage:
                seen["n"] += 1
                if seen["n"] == call:
                    raise TrainingInterrupted(f"{stage} evaluation {call}")
            return real(model, split, which, **kw)

        monkeypatch.setattr(trainer, "evaluate", evaluate)

    return arm


@pytest.fixture
def resumed_twin(interrupt_training):
    """``resumed_twin(train_fn, make_cfg, root)``: (uninterrupted result, result of a run interrupted in epoch 2 and
    started again); asserts that they are the same run (metrics, losses) and that the resume state is gone.
    ``make_cfg(out_dir)`` must give a config with ``run.resume`` on and >= 2 epochs evaluated every epoch."""
    from prmkd_dist.train.trainer import RESUME_FILE

    def run(train_fn, make_cfg, root):
        whole = train_fn(make_cfg(root / "whole"))
        interrupt_training("valid", 2)
        with pytest.raises(TrainingInterrupted):
            train_fn(make_cfg(root / "cut"))
        assert (root / "cut" / RESUME_FILE).exists()
        interrupt_training(None)
        resumed = train_fn(make_cfg(root / "cut"))
        assert resumed.valid == whole.valid and resumed.test == whole.test and resumed.best_epoch == whole.best_epoch
        assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]
        assert not (root / "cut" / RESUME_FILE).exists()
        return whole, resumed

    return run
