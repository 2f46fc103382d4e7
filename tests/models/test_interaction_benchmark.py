"""benchmarks/interaction_students.py --pool: reports of one experiment (other seeds) become one table; reports of
different experiments, or a seed counted twice, are refused with both files named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _report(path: Path, seeds, lr=5e-3, ndcg=(0.02, 0.03)):
    def run(seed, base):
        m = {"NDCG@10": base + 0.001 * seed, "HR@10": 2 * base, "NDCG@20": base + 0.01, "MRR": base / 2}
        return {"seed": seed, "best_epoch": 1, "epochs_run": 3, "seconds": 1.0, "valid": dict(m), "test": dict(m)}

    args = {"dataset": "amazon-games", "shards": "s", "students": ["lightgcn"], "seeds": len(seeds),
            "first_seed": seeds[0], "epochs": 8, "lr": lr, "overrides": ["distill.teacher_scale={ease: 0.3}"],
            "out": str(path), "threads": 2, "progress": False}
    runs = {"lightgcn": {"no distillation": [run(s, ndcg[0]) for s in seeds],
                         "distilled": [run(s, ndcg[1]) for s in seeds]}}
    path.write_text(json.dumps({"command": f"python x --first-seed {seeds[0]}", "args": args,
                                "hparams": {"lightgcn": {"dim": 64, "num_layers": 2}}, "runs": runs}))
    return str(path)


def test_pool_concatenates_seeds_and_recomputes_the_summary(tmp_path, load_benchmark):
    b = load_benchmark("interaction_students")
    pooled = b.pool_reports([_report(tmp_path / "a.json", [1, 2]), _report(tmp_path / "b.json", [0])])
    runs = pooled["runs"]["lightgcn"]["distilled"]
    assert [r["seed"] for r in runs] == [0, 1, 2]
    mean, std = pooled["summary"]["lightgcn / distilled"]["test NDCG@10"]
    assert mean == pytest.approx(0.031)  # 0.030, 0.031, 0.032
    assert std == pytest.approx(0.0008165, rel=1e-3)
    assert "| lightgcn | no distillation | 3 | 0.0210 ± 0.0008 |" in pooled["table"]
    assert len(pooled["pooled_from"]) == 2 and len(pooled["commands"]) == 2


def test_pool_accepts_reports_from_before_set_and_a_trailing_slash(tmp_path, load_benchmark):
    b = load_benchmark("interaction_students")
    old = json.loads(Path(_report(tmp_path / "a.json", [0])).read_text())
    del old["args"]["overrides"]  # written before --set existed: no overrides
    old["args"]["shards"] = "s/"
    (tmp_path / "a.json").write_text(json.dumps(old))
    new = _report(tmp_path / "b.json", [1])
    newer = json.loads(Path(new).read_text())
    newer["args"]["overrides"] = []
    (tmp_path / "b.json").write_text(json.dumps(newer))
    assert [r["seed"] for r in b.pool_reports([str(tmp_path / "a.json"), new])["runs"]["lightgcn"]["distilled"]] == [0, 1]


def test_pool_refuses_another_experiment_or_a_repeated_seed(tmp_path, load_benchmark):
    b = load_benchmark("interaction_students")
    first = _report(tmp_path / "a.json", [0])
    other_lr = _report(tmp_path / "b.json", [1], lr=1e-3)
    with pytest.raises(ValueError, match="lr=0.001") as err:
        b.pool_reports([first, other_lr])
    assert "b.json" in str(err.value) and "a.json" in str(err.value)
    again = _report(tmp_path / "c.json", [0])
    with pytest.raises(ValueError, match="seed 0 is in .*c.json"):
        b.pool_reports([first, again])


def test_pool_cli_writes_the_pooled_report(tmp_path, capsys, load_benchmark):
    b = load_benchmark("interaction_students")
    out = tmp_path / "pooled.json"
    assert b.main(["--pool", _report(tmp_path / "a.json", [0]), _report(tmp_path / "b.json", [1]),
                   "--out", str(out)]) == 0
    assert "| lightgcn | distilled | 2 |" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["runs"]["lightgcn"]["distilled"]) == 2
