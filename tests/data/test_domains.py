"""Multi-domain datasets: combining, persistence, validation, and the one rule that changes (a user is ranked
against its own domain's items) in evaluation, sampled negatives, EASE and teacher export. The domains are
small real slices of ml-latest-small (users' histories with the items renumbered densely), so EASE fits fast."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from prmkd_dist.cli import main as cli_main
from prmkd_dist.constants import PAD_ID
from prmkd_dist.data.dataset import DatasetFormatError, InteractionData, LeaveOneOutSplit
from prmkd_dist.data.domains import Domain, combine_domains, restrict_to_domains, user_domain_ids
from prmkd_dist.data.shards import ShardSet, list_parts
from prmkd_dist.teachers.ease import EASE, ease_weights, gram_matrix, item_blocks
from prmkd_dist.teachers.export import ExportError, export_teacher_shards
from prmkd_dist.train.evaluate import evaluate, evaluate_sampled, sample_negatives


def real_slice(data: InteractionData, users: range, name: str) -> InteractionData:
    """``users`` of ``data`` with their items renumbered 0..n-1 (a small, dense, real catalog)."""
    seqs = [data.sequence(u) for u in users]
    used = np.unique(np.concatenate(seqs))
    remap = np.full(data.num_items, -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    out = InteractionData.from_sequences([remap[s].tolist() for s in seqs], len(used), name)
    return out


@pytest.fixture(scope="module")
def domains(ml_small) -> tuple[InteractionData, InteractionData, InteractionData]:
    a = real_slice(ml_small, range(0, 6), "ml-a")
    b = real_slice(ml_small, range(6, 10), "ml-b")
    return a, b, combine_domains([a, b])


def test_combine_renumbers_into_blocks(domains):
    a, b, c = domains
    assert c.name == "ml-a+ml-b"
    assert c.domains == [Domain("ml-a", (0, a.num_items), (0, a.num_users)),
                         Domain("ml-b", (a.num_items, a.num_items + b.num_items), (a.num_users, a.num_users + b.num_users))]
    assert c.num_interactions == a.num_interactions + b.num_interactions
    np.testing.assert_array_equal(c.sequence(0), a.sequence(0))
    np.testing.assert_array_equal(c.sequence(a.num_users + 1), b.sequence(1) + a.num_items)
    assert c.item_raw_ids[a.num_items] == f"ml-b:{b.item_raw_ids[0]}"  # raw ids stay unique
    np.testing.assert_array_equal(user_domain_ids(c, np.array([0, a.num_users - 1, a.num_users, c.num_users - 1])),
                                  [0, 0, 1, 1])


def test_combined_dataset_round_trips(domains, tmp_path):
    _, _, c = domains
    c.save(str(tmp_path / "c"))
    back = InteractionData.load(str(tmp_path / "c"))
    assert back.domains == c.domains and back.fingerprint == c.fingerprint
    np.testing.assert_array_equal(back.items, c.items)


def test_bad_domains_are_refused_with_the_user_and_domain(domains):
    a, b, c = domains
    items = c.items.copy()
    items[0] = c.num_items - 1  # user 0 (domain ml-a) now holds an ml-b item
    with pytest.raises(DatasetFormatError, match=r"user 0 of domain 'ml-a' has item .* outside the domain's items"):
        InteractionData(c.name, c.num_users, c.num_items, c.offsets, items, c.timestamps, c.item_raw_ids,
                        c.user_raw_ids, domains=c.domains)
    gap = [Domain("ml-a", (0, a.num_items - 1), (0, a.num_users)), c.domains[1]]
    with pytest.raises(DatasetFormatError, match="must tile"):
        InteractionData(c.name, c.num_users, c.num_items, c.offsets, c.items, c.timestamps, c.item_raw_ids,
                        c.user_raw_ids, domains=gap)
    with pytest.raises(DatasetFormatError, match="distinct"):
        combine_domains([a, a])


class FavoursOtherDomain:
    """Scores every item of the other domain far above its own, and the user's eval target next."""

    needs_users = True  # score() gets the batch's users (evaluate's hook for data-bound scorers)

    def __init__(self, data: InteractionData, split: LeaveOneOutSplit, stage: str):
        self.data, self.target = data, split.target(stage)

    def score(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        users = users.numpy()
        scores = torch.zeros(len(users), self.data.num_items)
        other = restrict_to_domains(torch.ones_like(scores), self.data, users, fill=0.0) == 0
        scores[other] = 100.0
        scores[torch.arange(len(users)), torch.from_numpy(self.target[users])] = 1.0
        return scores


def test_evaluation_ranks_each_user_within_its_domain(domains):
    _, _, c = domains
    split = LeaveOneOutSplit.of(c)
    scorer = FavoursOtherDomain(c, split, "valid")
    res = evaluate(scorer, split, "valid", ks=(1, 10), progress=False)
    # other-domain items are out of the ranking: the target is first for every user
    assert res["HR@1"] == 1.0 and res["MRR"] == 1.0
    assert res["ml-a/users"] + res["ml-b/users"] == res["users"] == len(split.eval_users("valid"))
    assert res["ml-a/HR@1"] == res["ml-b/HR@1"] == 1.0
    sampled = evaluate_sampled(scorer, split, "valid", num_negatives=20, ks=(1,), progress=False)
    assert sampled["HR@1"] == 1.0


def test_sampled_negatives_come_from_the_users_domain(domains):
    _, _, c = domains
    split = LeaveOneOutSplit.of(c)
    users = split.eval_users("test")
    neg = sample_negatives(split, users, 30, seed=1)
    dom = user_domain_ids(c, users)
    lo = np.array([d.items[0] for d in c.domains])[dom]
    hi = np.array([d.items[1] for d in c.domains])[dom]
    assert ((neg >= lo[:, None]) & (neg < hi[:, None])).all()


def test_ease_fits_domain_blocks_exactly(domains):
    _, _, c = domains
    split = LeaveOneOutSplit.of(c)
    assert item_blocks(split) == [d.items for d in c.domains]
    blocked = EASE.fit(split, l2=20.0)
    whole = ease_weights(gram_matrix(split, (0, c.num_items)), 20.0)  # one C x C inverse, the textbook fit
    assert blocked.info["item_blocks"] == 2
    torch.testing.assert_close(blocked.B, whole, rtol=1e-3, atol=1e-5)
    lo, hi = c.domains[1].items
    assert blocked.B[:lo, lo:hi].abs().max() == 0 and blocked.B[lo:hi, :lo].abs().max() == 0


def test_export_keeps_lists_and_domain_ids_within_the_users_domain(domains, tmp_path):
    _, _, c = domains
    split = LeaveOneOutSplit.of(c)
    teacher = EASE.fit(split, l2=20.0, name="ease")
    export_teacher_shards(teacher, split, tmp_path / "ease", k=40, progress=False)
    ss = ShardSet.open(str(tmp_path / "ease"))
    table = pa.concat_tables([t for _, _, t in ss.iter_row_groups()])
    users = table.column("user_id").to_numpy()
    dom = table.column("domain_id").to_numpy()
    np.testing.assert_array_equal(dom, user_domain_ids(c, users))
    assert set(dom) == {0, 1}
    off, ids = list_parts(table.column("teacher.ease.ids"))
    row = np.repeat(np.arange(len(users)), np.diff(off))
    lo = np.array([d.items[0] for d in c.domains])[dom][row]
    hi = np.array([d.items[1] for d in c.domains])[dom][row]
    assert ((ids >= lo) & (ids < hi)).all() and (ids != PAD_ID).all()
    with pytest.raises(ExportError, match="multi-domain dataset"):
        export_teacher_shards(teacher, split, tmp_path / "bad", k=5, domain_id=1, progress=False)


def test_data_combine_cli(ml_small, tmp_path, capsys):
    a, b = real_slice(ml_small, range(0, 3), "ml-a"), real_slice(ml_small, range(3, 5), "ml-b")
    a.save(str(tmp_path / "a"))
    b.save(str(tmp_path / "b"))
    out = tmp_path / "ab"
    assert cli_main(["data", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert "domain ml-b: items" in capsys.readouterr().out
    assert InteractionData.load(str(out)).domains[1].name == "ml-b"
    assert cli_main(["data", "combine", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert "already combined" in capsys.readouterr().out
    assert cli_main(["data", "combine", str(tmp_path / "b"), str(tmp_path / "a"), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err


def test_a_plus_b_names_combine_on_first_use(ml_small, tmp_path, monkeypatch):
    from prmkd_dist.data.prepare import load_dataset

    monkeypatch.setenv("PRMKD_ARTIFACTS", str(tmp_path))
    real_slice(ml_small, range(0, 3), "ml-a").save(str(tmp_path / "data" / "ml-a"))
    real_slice(ml_small, range(3, 5), "ml-b").save(str(tmp_path / "data" / "ml-b"))
    first = load_dataset("ml-a+ml-b")
    assert [d.name for d in first.domains] == ["ml-a", "ml-b"]
    assert (tmp_path / "data" / "ml-a+ml-b" / "meta.json").is_file()
    again = load_dataset("ml-a+ml-b")  # now read back from disk
    assert again.fingerprint == first.fingerprint and again.domains == first.domains
    with pytest.raises(DatasetFormatError, match="ml-c"):
        load_dataset("ml-a+ml-c")
    # a part prepared again from other data: the combination is rebuilt, not served stale
    real_slice(ml_small, range(3, 8), "ml-b").save(str(tmp_path / "data" / "ml-b"))
    rebuilt = load_dataset("ml-a+ml-b")
    assert rebuilt.domains[1].users == (3, 8) and rebuilt.fingerprint != first.fingerprint


def test_one_student_distils_on_two_domains(domains, tmp_path):
    """teacher (EASE, per-domain blocks) -> shards with per-row domain ids -> one SASRec over both domains ->
    metrics per domain, on the window-packed and the streaming trainer."""
    from prmkd_dist.distill.trainer import train_distilled
    from prmkd_dist.train.config import config_from_dict

    _, _, c = domains
    split = LeaveOneOutSplit.of(c)
    export_teacher_shards(EASE.fit(split, l2=20.0, name="ease"), split, tmp_path / "ease", k=20, progress=False)
    for packing in ("window", "example"):
        cfg = config_from_dict({
            "data": {"dataset": "unused", "max_len": 20},
            "model": {"name": "sasrec", "hparams": {"dim": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.1}},
            "optim": {"epochs": 2, "batch_size": 64, "lr": 5e-3, "patience": 0},
            "run": {"seed": 0, "out_dir": str(tmp_path / packing), "tensorboard": False, "progress": False},
            "distill": {"shards": str(tmp_path / "ease"), "packing": packing, "teacher_scale": {"ease": 0.3}},
        })
        res = train_distilled(cfg, split)
        for stage in (res.valid, res.test):
            assert stage["ml-a/users"] + stage["ml-b/users"] == stage["users"] > 0
            overall = (stage["ml-a/NDCG@10"] * stage["ml-a/users"] + stage["ml-b/NDCG@10"] * stage["ml-b/users"]) / stage["users"]
            assert stage["NDCG@10"] == pytest.approx(overall)
