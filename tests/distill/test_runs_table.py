"""benchmarks/runs_table.py: variants of finished runs summarised from their own results.json / config.yaml."""
from __future__ import annotations

import json

import pytest
import yaml


def _run(path, seed, valid, test, best_epoch=5):
    path.mkdir(parents=True)
    metrics = lambda v: {"NDCG@10": v, "NDCG@20": v + 0.01, "HR@10": 2 * v, "MRR": v / 2}  # noqa: E731
    (path / "results.json").write_text(json.dumps({
        "best_epoch": best_epoch, "valid": metrics(valid), "test": metrics(test),
        "test_sampled": {"HR@10": 0.7, "NDCG@10": 0.5}}))
    (path / "config.yaml").write_text(yaml.safe_dump({"run": {"seed": seed}}))


def test_table_means_and_relative_gain(tmp_path, load_benchmark, capsys):
    rt = load_benchmark("runs_table")
    _run(tmp_path / "base-s0", 0, 0.05, 0.04)
    _run(tmp_path / "base-s1", 1, 0.07, 0.06)
    _run(tmp_path / "kd-s1", 1, 0.08, 0.07)
    _run(tmp_path / "kd-s0", 0, 0.06, 0.05)
    out = tmp_path / "t.json"
    rt.main(["--variant", f"base={tmp_path}/base-s*", "--variant", f"kd={tmp_path}/kd-s*", "--baseline", "base",
             "--command", "kd=prmkd-dist train --config x", "--out", str(out)])
    table = capsys.readouterr().out
    # base test NDCG@20 mean 0.06, kd 0.07: +16.7 %; per-seed values in seed order
    assert "| kd | 2 (0, 1) |" in table and "+16.7 %" in table
    assert "0.0700 ± 0.0141 (0.0600, 0.0800)" in table
    saved = json.loads(out.read_text())
    assert [r["seed"] for r in saved["variants"]["kd"]["runs"]] == [0, 1]
    assert saved["variants"]["kd"]["command"] == "prmkd-dist train --config x" and saved["baseline"] == "base"


def test_unfinished_run_is_an_error_naming_it(tmp_path, load_benchmark):
    rt = load_benchmark("runs_table")
    _run(tmp_path / "a-s0", 0, 0.05, 0.04)
    (tmp_path / "a-s1").mkdir()
    with pytest.raises(SystemExit, match="a-s1: no results.json"):
        rt.main(["--variant", f"a={tmp_path}/a-s*"])
    with pytest.raises(SystemExit, match="no run directory matches"):
        rt.main(["--variant", f"b={tmp_path}/none-*"])
