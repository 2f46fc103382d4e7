"""benchmarks/distill_step.py times real steps of the configured objectives on real shards."""
from __future__ import annotations

import pytest

from .test_distill_trainer import distill_cfg, embeddings, shards, small_split  # noqa: F401  (fixtures)


def test_distill_step_times_each_variant_and_tables_them(small_split, shards, embeddings, tmp_path, load_benchmark):
    bench = load_benchmark("distill_step")
    configs = {
        "plain": distill_cfg(tmp_path, shards),
        "MKD": distill_cfg(tmp_path, shards, distill={"teacher_embeddings": [embeddings],
                                                      "mkd": {"nkd": True, "cpd": 0.5, "sld": 0.5}}),
    }
    results = bench.measure(configs, small_split, steps=3, warmup=1)
    for r in results.values():
        assert len(r["loss_s"]) == len(r["step_s"]) == 3
        assert all(t > 0 for t in r["loss_s"] + r["step_s"])
        assert r["median_s"] <= r["p90_s"] and r["batches_per_epoch"] >= 4
    text = bench.table(results)
    assert text.count("\n") == 3 and "| plain |" in text and "| 1.00x |" in text and "| MKD |" in text


def test_distill_step_refuses_more_steps_than_an_epoch_has(small_split, shards, tmp_path, load_benchmark):
    bench = load_benchmark("distill_step")
    cfg = distill_cfg(tmp_path, shards, batch_size=4096)  # the whole slice in one or two batches
    with pytest.raises(SystemExit, match="batches an epoch"):
        bench.time_steps(cfg, small_split, steps=50, warmup=0)
