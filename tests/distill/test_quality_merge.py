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


@pytest.mark.parametrize("field, value", [("overrides", ["run.num_threads=1", "distill.temperature=2"]),
                                          ("shards", "t"), ("teacher_embeddings", ["f"]),
                                          ("config", "distill-caser-ml")])
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
    report = json.loads(Path(b).read_text())
    report["results"]["x"]["runs"][0]["v"] = 2  # seed 0 of x run again, differently
    Path(b).write_text(json.dumps(report))
    with pytest.raises(ValueError, match=r"variant 'x' is also in .*a.json with other runs \(seed 0\)"):
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


def test_merge_joins_lanes_that_ran_different_seeds(tmp_path, load_benchmark):
    """One lane stopped at two seeds, the other went on to three: the merged report has seeds 0-2, the borrowed
    baseline every seed either lane holds (summary recomputed), each variant the seeds its lane ran."""
    m = load_benchmark("quality_merge")

    def run(seed, v):
        metrics = {k: v for k in ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")}
        return {"seed": seed, "valid": metrics, "test": metrics, "best_epoch": seed + 1, "train_seconds": 1.0}

    base = [run(0, 0.1), run(1, 0.2), run(2, 0.3)]
    a = _lane(tmp_path / "a.json", {"x": [0, 1, 2]}, seeds=[0, 1, 2])
    b = _lane(tmp_path / "b.json", {"y": [0, 1]}, seeds=[0, 1])
    for path, n in ((a, 3), (b, 2)):
        report = json.loads(Path(path).read_text())
        report["results"]["no distillation"] = {"runs": base[:n], "summary": {"stale": True}, "from": "base.json"}
        Path(path).write_text(json.dumps(report))
    got = m.merge([b, a])
    assert got["seeds"] == [0, 1, 2]
    baseline = got["results"]["no distillation"]
    assert [r["seed"] for r in baseline["runs"]] == [0, 1, 2]
    assert baseline["summary"]["test NDCG@20"]["mean"] == pytest.approx(0.2) and baseline["summary"]["best_epoch"] == [1, 2, 3]
    assert [r["seed"] for r in got["results"]["y"]["runs"]] == [0, 1]


def test_merge_allows_other_thread_counts_and_a_kl_only_lane_without_embeddings(tmp_path, load_benchmark):
    """The thread count is not part of the experiment (listed under execution_overrides); a lane given no embeddings
    joins lanes given them when none of its variants uses them, and is refused when one does."""
    m = load_benchmark("quality_merge")
    d = {"shards": "aa", "teacher_embeddings": ["ee"]}
    a = _lane(tmp_path / "a.json", {"MKD (NKD + CPD + SLD)": [0]}, content_digests=d)
    b = _lane(tmp_path / "b.json", {"all teachers, conf+cons": [0]}, overrides=["run.num_threads=2"],
              teacher_embeddings=[], content_digests={"shards": "aa", "teacher_embeddings": []})
    got = m.merge([b, a])
    assert got["teacher_embeddings"] == ["e"] and got["content_digests"] == d
    assert got["execution_overrides"] == {b: ["run.num_threads=2"], a: ["run.num_threads=1"]}
    assert list(got["results"]) == ["no distillation", "all teachers, conf+cons", "MKD (NKD + CPD + SLD)"]
    assert "execution_overrides" not in m.merge([a, a])
    # the lane without embeddings over other shards is still refused
    c = _lane(tmp_path / "c.json", {"all teachers, uniform": [0]}, teacher_embeddings=[],
              content_digests={"shards": "bb", "teacher_embeddings": []})
    with pytest.raises(ValueError, match="c.json: its content_digests are .*bb"):
        m.merge([a, c])
    # a lane without embeddings that holds an embedding variant did not run what the others did
    e = _lane(tmp_path / "e.json", {"+ embedding distillation": [0]}, teacher_embeddings=[])
    with pytest.raises(ValueError,
                       match="e.json: its teacher_embeddings is \\[\\] but it holds '\\+ embedding distillation'"):
        m.merge([a, e])
