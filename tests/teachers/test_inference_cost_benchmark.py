"""benchmarks/inference_cost.py measures teachers and students through the same scoring call."""
from __future__ import annotations

from prmkd_dist.models import ItemKNN, build_student

from ..distill.test_distill_trainer import small_split  # noqa: F401  (fixture)


def test_inference_cost_measures_each_model_in_turn(small_split, load_benchmark):
    bench = load_benchmark("inference_cost")
    student = build_student("sasrec", small_split.data.num_items, dim=16, num_layers=1, num_heads=1, max_len=10).eval()
    models = {"ItemKNN": ("teacher", ItemKNN.fit(small_split, k=20)), "SASRec": ("student", student)}
    res = bench.measure(models, small_split, users=64, repeats=2)
    assert res["SASRec"]["params"] == sum(p.numel() for p in student.state_dict().values())
    for r in res.values():
        assert len(r["ms_per_1k_users"]) == 2 and all(t > 0 for t in r["ms_per_1k_users"])
        assert min(r["ms_per_1k_users"]) <= r["median_ms_per_1k_users"] <= max(r["ms_per_1k_users"])
    text = bench.table(res)
    assert "| ItemKNN | teacher |" in text and "| SASRec | student |" in text and "| 1.0x |" in text
