"""benchmarks/quality_merge.py joins lanes of one quality grid and refuses runs that are not comparable."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _lane(path: Path, variants: dict[str, list[int]], complete=True, **changes) -> str:
    report = {"dataset": "ml-latest-small", "config": "distill-sasrec-ml", "shards": "s", "teacher_embeddings": ["e"],
              "overrides": ["run.num_threads=1"], "seeds": [0, 1], "teachers": ["a", "b"], "complete": complete,
              "seconds": 10.0, "command": f"quality.py --out {path.name}",
              "results": {"no distillation": {"runs": [{"seed": 0, "v": 1}], "from": "base.json"},
                          **{k: {"runs": [{"seed": s} for s in seeds]} for k, seeds in variants.items()}}}
    report.update(changes)
    path.write_text(json.dumps(report))
    return str(path)


def test_merge_joins_lanes_in_order(tmp_path, load_benchmark):
    m = load_benchmark("quality_merge")
    a = _lane(tmp_path / "a.json", {"+ embedding distillation": [0, 1], "a name of its own": [0]})
    b = _lane(tmp_path / "b.json", {"all teachers, uniform": [0]}, complete=False)
    out = tmp_path / "grid.json"
    assert m.main([a, b, "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    # quality.py's report order, whichever lane ran what; a name it does not know comes last
    assert list(got["results"]) == ["no distillation", "all teachers, uniform", "+ embedding distillation",
                                    "a name of its own"]
    assert got["results"]["all teachers, uniform"]["runs"] == [{"seed": 0}]
    assert not got["complete"] and got["merged_from"] == [a, b] and got["seconds"] == 20.0
    assert got["shards"] == "s" and got["overrides"] == ["run.num_threads=1"]


@pytest.mark.parametrize("field, value", [("overrides", ["run.num_threads=2"]), ("shards", "t"), ("seeds", [0]),
                                          ("teacher_embeddings", [])])
def test_merge_refuses_reports_made_with_other_settings(tmp_path, field, value, load_benchmark):
    m = load_benchmark("quality_merge")
    a = _lane(tmp_path / "a.json", {"x": [0]})
    b = _lane(tmp_path / "b.json", {"y": [0]}, **{field: value})
    with pytest.raises(ValueError, match=f"its {field} is") as err:
        m.merge([a, b])
    assert b in str(err.value)


def test_merge_refuses_a_variant_with_two_different_run_sets(tmp_path, load_benchmark):
    m = load_benchmark("quality_merge")
    a = _lane(tmp_path / "a.json", {"x": [0, 1]})
    b = _lane(tmp_path / "b.json", {"x": [0]})
    with pytest.raises(ValueError, match="variant 'x' is also in .*a.json with other runs"):
        m.merge([a, b])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "ml-latest-small"}))
    with pytest.raises(ValueError, match="bad.json: no 'config' field"):
        m.merge([a, str(bad)])


def test_merge_checks_the_content_digests(tmp_path, capsys, load_benchmark):
    """Lanes at the same paths but over other files are refused; a lane without digests leaves the merge unchecked."""
    m = load_benchmark("quality_merge")
    d = {"shards": "aa", "teacher_embeddings": ["ee"]}
    a = _lane(tmp_path / "a.json", {"x": [0]}, content_digests=d)
    b = _lane(tmp_path / "b.json", {"y": [0]}, content_digests=dict(d))
    assert m.merge([a, b])["content_digests"] == d
    c = _lane(tmp_path / "c.json", {"z": [0]}, content_digests={**d, "shards": "bb"})
    with pytest.raises(ValueError, match="c.json: its content_digests are .*bb.*a.json's are"):
        m.merge([a, c])
    legacy = _lane(tmp_path / "legacy.json", {"z": [0]})
    assert m.merge([a, legacy])["content_digests"] is None
    assert "legacy.json record no content digests" in capsys.readouterr().err
