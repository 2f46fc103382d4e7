"""benchmarks/serving.py runs end to end at a tiny setting and reports consistent figures."""
from __future__ import annotations

import importlib.util
import json

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_serving_benchmark_small(artifacts, ml_small, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("serving_bench", PROJECT_ROOT / "benchmarks" / "serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ml_small.save(str(tmp_path / "data"))
    out = tmp_path / "serving.json"
    assert bench.main(["--artifact", str(artifacts["sasrec"]), "--dataset", str(tmp_path / "data"),
                       "--stage", "valid", "--requests", "5", "--users", "40", "--batch", "16",
                       "--nprobe-fractions", "1.0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    exact, ivf = result["rows"]
    assert exact["mode"] == "exact" and 0.0 <= exact["NDCG@10 (valid)"] <= 1.0
    assert ivf["recall@10 vs exact"] == 1.0  # probing every cluster is exact search
    for row in result["rows"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["users_per_s"] > 0 and row["params"] > 0
    assert "| student sasrec" in capsys.readouterr().out
