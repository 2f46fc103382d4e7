"""``run.resume``: a run interrupted at any epoch and started again ends with exactly the numbers and weights of an
uninterrupted one (real SASRec with dropout on ml-latest-small; the distillation objectives are in
tests/distill/test_distill_trainer.py)."""
from __future__ import annotations

import pytest
import torch

from prmkd_dist.train.config import ConfigError, config_from_dict
from prmkd_dist.train.trainer import RESUME_FILE, load_checkpoint, train

from ..conftest import TrainingInterrupted


def cfg_of(out_dir, **optim):
    return config_from_dict({
        "data": {"dataset": "ml-latest-small", "max_len": 10},
        "model": {"name": "sasrec", "hparams": {"dim": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.2}},
        "optim": {"epochs": 3, "batch_size": 32, "lr": 5e-3, "patience": 0, **optim},
        "run": {"seed": 5, "out_dir": str(out_dir), "tensorboard": False, "progress": False, "num_threads": 1,
                "resume": True},
    })


def same_run(a, b, split):
    assert a.valid == b.valid and a.test == b.test and a.best_epoch == b.best_epoch and a.epochs_run == b.epochs_run
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    wa, wb = (load_checkpoint(r.checkpoint_dir, split)[0].state_dict() for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(ml_split, tmp_path_factory):
    return {every: train(cfg_of(tmp_path_factory.mktemp(f"whole{every}"), eval_every=every), ml_split)
            for every in (1, 2)}


@pytest.mark.parametrize("every", [1, 2])
def test_a_run_interrupted_in_epoch_2_resumes_to_the_same_numbers(ml_split, uninterrupted, interrupt_training,
                                                                    tmp_path, every):
    """Killed in epoch 2 (its validation; with eval_every 2, the first one): epoch 1's state is on disk, epoch 2 is
    redone from it, with the shuffling and dropout draws an uninterrupted run makes."""
    interrupt_training("valid", 2 if every == 1 else 1)
    with pytest.raises(TrainingInterrupted):
        train(cfg_of(tmp_path, eval_every=every), ml_split)
    saved = torch.load(tmp_path / RESUME_FILE, weights_only=False)
    assert saved["loop"]["epoch"] == 1 and not saved["loop"]["finished"]
    interrupt_training(None)
    resumed = train(cfg_of(tmp_path, eval_every=every), ml_split)
    same_run(resumed, uninterrupted[every], ml_split)
    assert not (tmp_path / RESUME_FILE).exists()  # finished: the state is removed


def test_interrupted_after_the_last_epoch_only_reads_the_test(ml_split, uninterrupted, interrupt_training, tmp_path):
    interrupt_training("test")
    with pytest.raises(TrainingInterrupted):
        train(cfg_of(tmp_path), ml_split)
    assert torch.load(tmp_path / RESUME_FILE, weights_only=False)["loop"]["finished"]
    interrupt_training("valid")  # any further training epoch would be an error now
    same_run(train(cfg_of(tmp_path), ml_split), uninterrupted[1], ml_split)


def test_a_state_of_other_settings_is_refused_and_off_means_start_over(ml_split, interrupt_training, tmp_path):
    interrupt_training("valid", 2)
    with pytest.raises(TrainingInterrupted):
        train(cfg_of(tmp_path), ml_split)
    interrupt_training(None)
    with pytest.raises(ConfigError, match=rf"{RESUME_FILE}: saved by a run with other settings \(optim.lr: 0.005 -> 0.001\)"):
        train(cfg_of(tmp_path, lr=1e-3), ml_split)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / RESUME_FILE).write_bytes(b"not a state")
    with pytest.raises(ConfigError, match="not a readable resume state"):
        train(cfg_of(tmp_path / "garbage"), ml_split)
    off = cfg_of(tmp_path)
    off.run.resume = False  # starts over, and leaves the old state alone
    assert train(off, ml_split).epochs_run == 3 and (tmp_path / RESUME_FILE).exists()
