"""Cross-fitted (out-of-fold) teacher lists: each training example's top-K comes from a teacher fitted without that
example's user.

Why: a teacher exported on its own training examples ranks what it memorised. SLIST on amazon-games puts the
training target in its top-50 for 97 % of the examples (median slot 2) while its validation HR@20 is 0.17
(benchmarks/RESULTS.md, "Caser on Games"): its lists repeat the label the student already has, and the per-example
confidence weights (which favour the teacher that ranks the target higher) hand it the larger weight for being
memorised, not for being right. Out-of-fold lists show the student how the teacher ranks a history it has not seen,
which is what it does at serving time. The same device as stacking's out-of-fold predictions.

Folds are over users (a user's transitions are what a sequential teacher memorises): a seeded permutation of the
user ids cut into ``folds`` parts. For fold f the teacher is fitted on the split with fold f's users removed (their
training sequences and their validation/test targets, so an early-stopping neural teacher does not evaluate them
either) and exports the examples of fold f's users; the histories and exclusion rules are the full split's (the
exporter's, unchanged). Each fold teacher sees (folds - 1) / folds of the users, so its lists are slightly weaker than
the full teacher's on unseen users; the full teacher still gives the pipeline's metrics and item embeddings.

Cost: ``folds`` extra fits (closed-form teachers: minutes each on amazon-games; a neural teacher: folds times its
training). The lists are held in memory (amazon-games, K = 50: 194k rows x 50 x 12 bytes = 117 MB) and each fold's are
kept in ``work_dir`` so an interrupted run refits only the missing folds, and several workers sharing ``work_dir``
can fit different folds at once (``only``; the pipeline's ``--cross-fit-folds``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from typing import Callable, Collection

import numpy as np
import torch

from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import LeaveOneOutSplit
from prmkd_dist.data.paths import write_json_atomic

FOLD_FORMAT = "prmkd-dist/cross-fit-fold"


class CrossFitError(ValueError):
    """Cross-fitting cannot run as asked (fold count, cached folds of other settings, lists that do not match)."""


def user_folds(num_users: int, folds: int, seed: int = 0) -> np.ndarray:
    """[num_users] int64: the fold of each user, a seeded permutation cut into ``folds`` near-equal parts."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise CrossFitError(f"cross_fit: folds must be an int >= 2, got {folds!r}")
    if folds > num_users:
        raise CrossFitError(f"cross_fit: {folds} folds for {num_users} users; at most one fold per user")
    out = np.empty(num_users, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(num_users)] = np.arange(num_users, dtype=np.int64) % folds
    return out


def without_users(split: LeaveOneOutSplit, drop: np.ndarray) -> LeaveOneOutSplit:
    """``split`` with the users of the bool mask ``drop`` removed: empty training sequences, no validation or test
    target. User ids and the catalog are unchanged, so a teacher fitted on it scores the same item space."""
    drop = np.asarray(drop, dtype=bool)
    if drop.shape != (split.data.num_users,):
        raise CrossFitError(f"drop mask has shape {drop.shape}, expected ({split.data.num_users},)")
    lengths = np.diff(split.train_offsets)
    keep_positions = np.repeat(~drop, lengths)
    offsets = np.zeros_like(split.train_offsets)
    np.cumsum(np.where(drop, 0, lengths), out=offsets[1:])
    valid = np.where(drop, PAD_ID, split.valid_target)
    test = np.where(drop, PAD_ID, split.test_target)
    return dataclasses.replace(split, train_offsets=offsets, train_items=split.train_items[keep_positions],
                               valid_target=valid, test_target=test)


@dataclasses.dataclass
class CrossFittedLists:
    """Every training example's top-``k`` (ids/scores rows in key order), each from a teacher fitted without the
    example's user: an exportable teacher (``export_teacher_shards`` looks the lists up through ``example_topk``)."""

    name: str
    num_items: int
    item_fingerprint: str
    score_semantics: str
    keys: np.ndarray  # [N] int64, ascending: the example keys of the split
    ids: np.ndarray  # [N, k] int64, PAD_ID past a row's candidates
    scores: np.ndarray  # [N, k] float32
    folds: int
    seed: int = 0
    embeddings: torch.Tensor | None = None  # the full teacher's item embeddings (exported beside the lists)

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def digest(self) -> str:
        """sha256 of the lists: a resumed export refuses to mix parts of two cross-fits."""
        h = hashlib.sha256(f"cross-fit {self.folds} {self.seed}".encode())
        for a in (self.keys, self.ids, self.scores):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def example_topk(self, keys: np.ndarray, starts: np.ndarray, split: LeaveOneOutSplit, k: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        if k > self.k:
            raise CrossFitError(f"{self.name}: cross-fitted lists hold the top-{self.k}, top-{k} asked")
        idx = np.searchsorted(self.keys, keys)
        bad = (idx >= len(self.keys)) | (self.keys[np.minimum(idx, len(self.keys) - 1)] != keys)
        if bad.any():
            raise CrossFitError(f"{self.name}: example_key {int(keys[np.flatnonzero(bad)[0]])} has no cross-fitted list "
                                "(lists of another split?)")
        return self.ids[idx, :k], self.scores[idx, :k]

    def item_embeddings(self) -> torch.Tensor | None:
        return self.embeddings


def _fold_path(work_dir: str, fold: int) -> tuple[str, str]:
    return os.path.join(work_dir, f"fold-{fold:02d}.npz"), os.path.join(work_dir, f"fold-{fold:02d}.json")


@contextlib.contextmanager
def _fold_claim(work_dir: str, fold: int):
    """Yields True while this process holds fold ``fold``'s claim in ``work_dir`` (an exclusive ``flock`` on
    ``fold-NN.lock``), False when another process holds it. The kernel drops the lock when its holder exits, killed
    or not, so a dead worker's fold is free for the next one. The lock files stay (removing one under a waiting
    opener would let two processes lock different files of the same name)."""
    fd = os.open(os.path.join(work_dir, f"fold-{fold:02d}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True  # closing the descriptor releases the lock
    finally:
        os.close(fd)


def cross_fit_lists(fit: Callable[[LeaveOneOutSplit, int], object], split: LeaveOneOutSplit, *, name: str, folds: int,
                    k: int = 50, max_history: int = 200, batch_size: int = 512, seed: int = 0,
                    work_dir: str | os.PathLike | None = None, fit_key: str = "", log=print,
                    embeddings: torch.Tensor | None = None, only: Collection[int] | None = None,
                    claim: bool = False, fitted: list[int] | None = None) -> CrossFittedLists | None:
    """Fit ``fit(split without fold f's users, f)`` for each fold f and keep its top-``k`` of fold f's examples
    (module doc). ``work_dir``: each finished fold's lists are saved there and reused by a later call with the same
    settings (``fit_key`` names what decides the fitted weights, e.g. the teacher config; a change refits every fold).

    ``only``: fit just these folds (0-based), a fold worker: processes or machines sharing ``work_dir`` each fit some
    folds at once (the folds are independent; a neural teacher's fold is an hour on amazon-games). Folds outside
    ``only`` are read back when finished in ``work_dir``; while any is missing the call returns None.

    ``claim``: workers split the folds by themselves: each unfinished fold (of ``only``, default all) is fitted under
    a claim in ``work_dir`` (``_fold_claim``), and a fold another live process is fitting is left to it (missing), so
    N identical workers fit each fold once. ``fitted``: a list the folds this call fitted are appended to."""
    from prmkd_dist.teachers.export import (_check_teacher, _device_of, _input_length, example_index,
                                            first_occurrences, score_topk)

    data = split.data
    fold_of = user_folds(data.num_users, folds, seed)
    keys, users, starts, _ = example_index(split)
    ids = np.full((len(keys), k), PAD_ID, dtype=np.int64)
    scores = np.zeros((len(keys), k), dtype=np.float32)
    settings = {"format": FOLD_FORMAT, "name": name, "folds": folds, "seed": seed, "k": int(k),
                "max_history": int(max_history), "item_fingerprint": data.fingerprint, "num_examples": int(len(keys)),
                "fit_key": fit_key}
    if only is not None:
        only = sorted({int(f) for f in only})
        if not only or only[0] < 0 or only[-1] >= folds:
            raise CrossFitError(f"{name}: folds to fit {only} must be in 0..{folds - 1}")
        if work_dir is None:
            raise CrossFitError(f"{name}: fitting some folds only needs a work_dir to keep them in")
    if claim and work_dir is None:
        raise CrossFitError(f"{name}: claiming folds needs a work_dir shared by the workers")
    if work_dir is not None:
        work_dir = os.fspath(work_dir)
        os.makedirs(work_dir, exist_ok=True)
    state = {"semantics": None}

    def reuse(f: int, rows: np.ndarray) -> bool:
        """Read fold f's lists back from work_dir when a run of the same settings finished it."""
        cached = _fold_path(work_dir, f) if work_dir is not None else None
        if not (cached and os.path.exists(cached[1]) and os.path.exists(cached[0])):
            return False
        with open(cached[1]) as fh:
            meta = json.load(fh)
        if meta.get("settings") != {**settings, "fold": f}:
            return False
        with np.load(cached[0]) as z:
            if not np.array_equal(z["keys"], keys[rows]):
                raise CrossFitError(f"{cached[0]}: its example keys differ from fold {f}'s; delete {work_dir}")
            ids[rows], scores[rows] = z["ids"], z["scores"]
        state["semantics"] = state["semantics"] or meta["score_semantics"]
        log(f"[cross-fit] {name}: fold {f + 1}/{folds} reused from {cached[0]}")
        return True

    def fit_fold(f: int, rows: np.ndarray) -> None:
        """Fit fold f's teacher without its users, list their examples, keep the lists in work_dir."""
        t0 = time.perf_counter()
        log(f"[cross-fit] {name}: fold {f + 1}/{folds}: fit without {int((fold_of == f).sum())} users, "
            f"list their {len(rows)} examples")
        teacher = fit(without_users(split, fold_of == f), f)
        _check_teacher(teacher, split, name, k)
        fold_semantics = getattr(teacher, "score_semantics", "logit")
        if state["semantics"] is not None and fold_semantics != state["semantics"]:
            raise CrossFitError(f"{name}: fold teachers disagree on score semantics ({state['semantics']} vs "
                                f"{fold_semantics})")
        state["semantics"] = fold_semantics
        input_len = _input_length(teacher, max_history)
        first = first_occurrences(split) if callable(getattr(teacher, "additive_rows", None)) else None
        device = _device_of(teacher)
        module = teacher if isinstance(teacher, torch.nn.Module) else None
        if module is not None:
            module.eval()
        fit_s = time.perf_counter() - t0
        with torch.no_grad():
            for lo in range(0, len(rows), batch_size):
                r = rows[lo:lo + batch_size]
                ids[r], scores[r] = score_topk(teacher, keys[r], starts[r], split, k, input_len, device, first)
        del teacher, module  # a closed-form teacher on amazon-games is 2.2 GB: one at a time
        if work_dir is not None:  # the lists, then the record that names them finished: a reader never sees a torn fold
            npz, record = _fold_path(work_dir, f)
            tmp = f"{npz}.{os.getpid()}.tmp.npz"
            np.savez(tmp, keys=keys[rows], ids=ids[rows], scores=scores[rows])
            os.replace(tmp, npz)
            write_json_atomic(record, {"settings": {**settings, "fold": f}, "score_semantics": state["semantics"],
                                       "fit_seconds": round(fit_s, 2), "seconds": round(time.perf_counter() - t0, 2)})
        if fitted is not None:
            fitted.append(f)
        log(f"[cross-fit] {name}: fold {f + 1}/{folds} done in {time.perf_counter() - t0:.0f}s (fit {fit_s:.0f}s)")

    fold_rows = [np.flatnonzero(fold_of[users] == f) for f in range(folds)]
    missing = []
    for f, rows in enumerate(fold_rows):
        if reuse(f, rows):
            continue
        if only is not None and f not in only:
            missing.append(f)
        elif not claim:
            fit_fold(f, rows)
        else:
            with _fold_claim(work_dir, f) as mine:
                if not mine:
                    log(f"[cross-fit] {name}: fold {f + 1}/{folds} is being fitted by another worker")
                    missing.append(f)
                elif not reuse(f, rows):  # under the claim: a fold another worker finished meanwhile is read back
                    fit_fold(f, rows)
    # folds other workers finished while this one fitted its own: of several workers, the last to end assembles
    missing = [f for f in missing if not reuse(f, fold_rows[f])]
    if missing:
        log(f"[cross-fit] {name}: fold(s) {', '.join(str(f + 1) for f in missing)} of {folds} not finished in "
            f"{work_dir} (left to another worker)")
        return None
    return CrossFittedLists(name, data.num_items, data.fingerprint, state["semantics"] or "logit", keys, ids, scores,
                            folds, seed, embeddings)
