"""prepare_dataset / load_split and the `prmkd-dist data prepare|stats` commands, end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prmkd_dist.cli import main
from prmkd_dist.data.dataset import DatasetFormatError, InteractionData
from prmkd_dist.data.prepare import (
    OutputDirError,
    builtin_datasets,
    load_split,
    prepare_dataset,
    read_provenance,
)
from prmkd_dist.data.readers import ReaderConfigError


@pytest.fixture
def artifacts(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "artifacts"
    monkeypatch.setenv("PRMKD_ARTIFACTS", str(root))
    return root


@pytest.fixture
def own_csv(tmp_path) -> Path:
    """A user's own dataset: a CSV plus its reader config (paths relative to the config)."""
    rows = ["user,item,ts"] + [f"u{u},{i},{10 * k}" for u in range(4) for k, i in enumerate(range(u, u + 5))]
    rows.append("u9,99,0")  # an item and a user with one interaction only (removed by a 2-core)
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "own.yaml"
    cfg.write_text("name: own\ninteractions: {path: events.csv, user: user, item: item, timestamp: ts}\n")
    return cfg


def test_builtins_listed():
    assert {"ml-latest-small", "amazon-games"} <= set(builtin_datasets())


def test_prepare_writes_then_reuses_then_rebuilds(own_csv, artifacts):
    data = prepare_dataset(own_csv)
    out = artifacts / "data" / "own"
    assert {p.name for p in out.iterdir()} == {"meta.json", "items.parquet", "users.parquet", "prepare.json"}
    meta = json.loads((out / "meta.json").read_text())
    prov = read_provenance(out)
    assert meta["source"].startswith("sha256:") and prov["source"] == meta["source"] == data.source
    assert prov["report"]["rows_read"] == 21 and prov["inputs"][0]["path"] == str(own_csv.parent / "events.csv")
    stamp = (out / "meta.json").stat().st_mtime_ns

    again = prepare_dataset(str(own_csv))  # identical inputs: loaded, not rebuilt
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    assert np.array_equal(again.items, data.items) and again.fingerprint == data.fingerprint

    prepare_dataset(own_csv, force=True)
    assert (out / "meta.json").stat().st_mtime_ns != stamp
    stamp = (out / "meta.json").stat().st_mtime_ns

    events = own_csv.parent / "events.csv"
    events.write_text(events.read_text() + "u9,0,5\n")  # the input changed: rebuilt
    changed = prepare_dataset(own_csv)
    assert changed.num_interactions == 22 and changed.source != data.source
    assert (out / "meta.json").stat().st_mtime_ns != stamp


def test_kcore_override_gets_its_own_name(own_csv, artifacts):
    data = prepare_dataset(own_csv, kcore=2)
    assert data.name == "own-2core" and data.kcore == 2
    # u9 and item 99 have one row each; items 0 and 7 too (only u0 / u3 has them)
    assert data.user_raw_ids.tolist() == ["u0", "u1", "u2", "u3"] and data.num_interactions == 18
    assert data.item_raw_ids.tolist() == ["1", "2", "3", "4", "5", "6"]
    assert (artifacts / "data" / "own-2core" / "meta.json").is_file()


def test_load_split_accepts_dir_config_and_prepared_name(own_csv, artifacts, tmp_path):
    data = prepare_dataset(own_csv, out_dir=tmp_path / "mine")
    d1, split = load_split(tmp_path / "mine")
    assert d1.fingerprint == data.fingerprint
    assert split.test_target.tolist() == [4, 5, 6, 7, -1]  # last item of each user; u9 too short
    d2, _ = load_split(str(own_csv))  # a reader config: prepared into artifacts on first use
    assert (artifacts / "data" / "own" / "meta.json").is_file()
    d3, _ = load_split("own")  # by the name of a dataset prepared under artifacts
    assert d2.fingerprint == d3.fingerprint == data.fingerprint
    with pytest.raises(DatasetFormatError, match="'nothing-here' is not a prepared dataset directory"):
        load_split("nothing-here")
    with pytest.raises(ReaderConfigError, match="missing.yaml: reader config file not found"):
        prepare_dataset(tmp_path / "missing.yaml")


def test_refuses_to_overwrite_a_foreign_directory(own_csv, tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not a prepared dataset; refusing to overwrite"):
        prepare_dataset(own_csv, out_dir=foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.multiproc
def test_concurrent_prepares_of_one_dataset(own_csv, tmp_path):
    """Ranks of one job preparing the same dataset at once: both succeed, one directory results."""
    out = tmp_path / "shared-out"
    code = "import sys; from prmkd_dist.data.prepare import prepare_dataset; print(prepare_dataset(sys.argv[1], out_dir=sys.argv[2]).fingerprint)"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(own_csv), str(out)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    prints = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert prints[0] == prints[1] == InteractionData.load(str(out)).fingerprint
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".shared-out.")) == [".shared-out.lock"]


# ---- CLI ----------------------------------------------------------------------------------------------
def _table(text: str) -> dict[str, str]:
    return {line[:20].strip(): line[20:].strip() for line in text.splitlines()}


def test_cli_prepare_ml_latest_small(shared_data, tmp_path, capsys):
    out = tmp_path / "ml"
    assert main(["data", "prepare", "--dataset", "ml-latest-small", "--out", str(out)]) == 0
    table = _table(capsys.readouterr().out)
    assert table["dataset"] == "ml-latest-small" and table["directory"] == str(out)
    assert (table["users"], table["items"], table["interactions"]) == ("610", "9,724", "100,836")
    assert table["train interactions"] == f"{100836 - 2 * 610:,}"
    assert table["valid users"] == table["test users"] == "610"
    assert table["items with text"] == "9,724" and table["status"].startswith("prepared in")
    assert table["sequence length"].startswith("min 20  median 70.5")

    assert main(["data", "prepare", "--dataset", "ml-latest-small", "--out", str(out)]) == 0
    assert _table(capsys.readouterr().out)["status"].startswith("already prepared from identical inputs")
    assert main(["data", "stats", str(out)]) == 0
    stats = _table(capsys.readouterr().out)
    assert stats["interactions"] == "100,836" and "status" not in stats


def test_cli_prepare_own_config_with_kcore(own_csv, artifacts, capsys):
    assert main(["data", "prepare", "--config", str(own_csv), "--kcore", "2"]) == 0
    table = _table(capsys.readouterr().out)
    assert (table["dataset"], table["users"], table["items"], table["interactions"]) == ("own-2core", "4", "6", "18")
    assert table["k-core"] == "2" and table["rows read"].startswith("21 (below min_rating 0, removed by k-core 3)")
    assert main(["data", "stats", "own-2core"]) == 0  # by name, under $PRMKD_ARTIFACTS
    assert _table(capsys.readouterr().out)["users"] == "4"


def test_cli_errors_exit_nonzero_with_the_reason(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ninteractions: {path: r.csv, user: u}\n")
    assert main(["data", "prepare", "--config", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert f"error: {bad}: missing required key 'interactions.item'" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 1
    assert "no meta.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --dataset and --config are exclusive
        main(["data", "prepare", "--dataset", "x", "--config", "y"])


# ---- paths ---------------------------------------------------------------------------------------------
def test_paths_shared_data_root_and_artifacts_root(monkeypatch, tmp_path):
    from prmkd_dist.data.paths import SharedDataNotFoundError, artifacts_root, shared_data_root

    monkeypatch.setenv("PRMKD_SHARED_DATA", str(tmp_path))
    assert shared_data_root() == tmp_path.resolve()
    monkeypatch.setenv("PRMKD_SHARED_DATA", str(tmp_path / "absent"))
    with pytest.raises(SharedDataNotFoundError, match=r"\$PRMKD_SHARED_DATA=.*absent.* is not a directory"):
        shared_data_root()
    monkeypatch.delenv("PRMKD_SHARED_DATA")
    (tmp_path / "proj" / "pkg").mkdir(parents=True)
    monkeypatch.setattr("prmkd_dist.data.paths.PROJECT_ROOT", tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj" / "pkg")
    (tmp_path / "proj" / "shared" / "data").mkdir(parents=True)  # <cwd>/../shared/data
    assert shared_data_root() == (tmp_path / "proj" / "shared" / "data").resolve()
    (tmp_path / "shared" / "data").mkdir(parents=True)  # <project root>/../shared/data comes first
    assert shared_data_root() == (tmp_path / "shared" / "data").resolve()
    (tmp_path / "shared" / "data").rmdir()
    (tmp_path / "proj" / "shared" / "data").rmdir()
    with pytest.raises(SharedDataNotFoundError, match=r"looked at \$PRMKD_SHARED_DATA \(unset\), .*shared/data, .*shared/data"):
        shared_data_root()
    monkeypatch.delenv("PRMKD_ARTIFACTS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert artifacts_root() == tmp_path.resolve() / "artifacts"
    monkeypatch.setenv("PRMKD_ARTIFACTS", str(tmp_path / "a"))
    assert artifacts_root() == tmp_path.resolve() / "a"
