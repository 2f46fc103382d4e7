"""benchmarks/quality_grid.py: reports side by side, goals checked on validation-selected variants."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def _runs(valid: list[float], test: list[float]) -> list[dict]:
    return [{"seed": i, "valid": {"NDCG@10": v}, "test": {"NDCG@20": t, "NDCG@10": t / 2}, "best_epoch": 3}
            for i, (v, t) in enumerate(zip(valid, test))]


def _report(path: Path, results: dict, seeds=(0, 1), teachers=("a", "b"), config="distill-caser-ml") -> str:
    path.write_text(json.dumps({"dataset": "ml-latest-small", "config": config, "teachers": list(teachers),
                                "seeds": list(seeds), "results": {k: {"runs": r} for k, r in results.items()}}))
    return str(path)


def _grid_report(path: Path) -> str:
    return _report(path, {
        "no distillation": _runs([0.04, 0.06], [0.04, 0.06]),      # mean 0.05
        "teacher a alone": _runs([0.07, 0.07], [0.058, 0.062]),    # best single on validation, test 0.06
        "teacher b alone": _runs([0.05, 0.05], [0.07, 0.07]),      # best single on test, not on validation
        "all teachers, uniform": _runs([0.08, 0.08], [0.062, 0.064]),  # best multi on validation, test 0.063
        "+ ranking distillation": _runs([0.06], [0.09]),           # best on test, 1 of 2 seeds
    })


def test_cells_and_changes_against_the_same_report(tmp_path, load_benchmark):
    g = load_benchmark("quality_grid")
    path = _grid_report(tmp_path / "r.json")
    col = g.column(path, g.load_report(path), "test NDCG@20")
    assert col["student"] == "caser" and col["teachers"] == ["a", "b"]
    base = col["cells"]["no distillation"]
    assert base["mean"] == pytest.approx(0.05) and base["std"] == pytest.approx(0.01 * 2 ** 0.5)
    assert base["change_pct"] is None
    assert col["cells"]["teacher b alone"]["change_pct"] == pytest.approx(40.0)
    assert g._cell_text(col["cells"]["+ ranking distillation"]).endswith("(+80.0 %) [1 of 2 seeds]")


def test_goal_picks_are_made_on_validation_not_test(tmp_path, load_benchmark):
    g = load_benchmark("quality_grid")
    path = _grid_report(tmp_path / "r.json")
    col = g.column(path, g.load_report(path), "test NDCG@20")
    # the test-best variants (teacher b alone, + ranking) lose the pick to the validation-best ones
    assert col["best_single"] == "teacher a alone" and col["best_multi"] == "all teachers, uniform"
    got = g.goals(col, {"a": 0.0625, "b": 0.1})
    assert got["multi_change_pct"] == pytest.approx(26.0) and got["gain_goal_met"]
    assert got["multi_vs_single_pct"] == pytest.approx(5.0) and got["multi_above_single"]
    assert got["best_teacher"] == "b" and not got["student_reaches_best_teacher"]
    assert got["student_vs_best_teacher_pct"] == pytest.approx(-37.0)


def test_the_single_teacher_embedding_control_counts_as_single(tmp_path, load_benchmark):
    """One teacher's lists + item embeddings is the single-teacher side of the goal, even when it beats the mix."""
    g = load_benchmark("quality_grid")
    path = _report(tmp_path / "r.json", {
        "no distillation": _runs([0.04], [0.05]),
        "teacher a alone": _runs([0.05], [0.06]),
        "+ embedding distillation": _runs([0.07], [0.08]),
        "teacher a alone + embedding distillation": _runs([0.09], [0.088]),
    })
    col = g.column(path, g.load_report(path), "test NDCG@20")
    assert col["best_single"] == "teacher a alone + embedding distillation"
    assert col["best_multi"] == "+ embedding distillation"
    got = g.goals(col, {})
    assert got["multi_vs_single_pct"] == pytest.approx(-100 / 11) and not got["multi_above_single"]
    assert g.is_single_teacher("teacher a alone") and not g.is_single_teacher("all teachers, uniform")


def test_main_prints_the_grid_and_writes_json(tmp_path, load_benchmark, capsys):
    g = load_benchmark("quality_grid")
    first = _grid_report(tmp_path / "caser.json")
    second = _report(tmp_path / "sasrec.json", {"no distillation": _runs([0.05], [0.05]),
                                                "all teachers, uniform": _runs([0.06], [0.055])},
                     seeds=(0,), config="distill-sasrec-ml")
    out = tmp_path / "grid.json"
    # teacher c is not in any column's shards: no column is compared with it
    assert g.main([first, second, "--teacher", "ml-latest-small:a=0.06", "--teacher", "ml-latest-small:c=0.5",
                   "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # single-teacher rows by the teacher's place in each report's list, the cell naming the teacher
    assert "| teacher #2 alone | b: 0.0700 ± 0.0000 (+40.0 %) | not run |" in printed
    assert "| all teachers, uniform | 0.0630 ± 0.0014 (+26.0 %) | 0.0550 ± 0.0000 (+10.0 %) |" in printed
    report = json.loads(out.read_text())
    assert [c["student"] for c in report["columns"]] == ["caser", "sasrec"]
    assert report["goals"][0]["best_teacher"] == "a" and report["goals"][0]["student_reaches_best_teacher"]
    assert not report["goals"][1]["gain_goal_met"] and "multi_vs_single_pct" not in report["goals"][1]


def test_bad_input_is_refused_with_the_file_or_spec(tmp_path, load_benchmark):
    g = load_benchmark("quality_grid")
    no_base = _report(tmp_path / "nobase.json", {"teacher a alone": _runs([0.1], [0.1])})
    with pytest.raises(ValueError, match="nobase.json: no 'no distillation' variant"):
        g.load_report(no_base)
    (tmp_path / "other.json").write_text(json.dumps({"dataset": "x"}))
    with pytest.raises(ValueError, match="other.json: no 'config' field"):
        g.load_report(str(tmp_path / "other.json"))
    for spec in ("a=0.1", "ml:a", "ml:a=nan", "ml:a=-1", ":a=0.1"):
        with pytest.raises(ValueError, match="DATASET:NAME=VALUE"):
            g.parse_teachers([spec])
    with pytest.raises(ValueError, match="has a run without 'test MRR'"):
        path = _grid_report(tmp_path / "r.json")
        g.column(path, g.load_report(path), "test MRR")


def test_single_teacher_rows_line_up_across_teacher_sets(tmp_path, capsys, load_benchmark):
    """Two reports with other second teachers: their "alone" rows share a row, each cell naming its teacher."""
    g = load_benchmark("quality_grid")
    ml = _report(tmp_path / "ml.json", {"no distillation": _runs([0.05], [0.05]),
                                        "teacher slist alone": _runs([0.06], [0.06]),
                                        "teacher unisrec alone": _runs([0.055], [0.055]),
                                        "teacher unisrec alone + embedding distillation": _runs([0.07], [0.07])},
                 seeds=(0,), teachers=("slist", "unisrec"))
    games = _report(tmp_path / "games.json", {"no distillation": _runs([0.04], [0.04]),
                                              "teacher id-transformer alone": _runs([0.05], [0.05])},
                    seeds=(0,), teachers=("slist", "id-transformer"))
    assert g.main([ml, games]) == 0
    printed = capsys.readouterr().out
    assert "| teacher #1 alone | slist: 0.0600 ± 0.0000 (+20.0 %) | not run |" in printed
    assert "| teacher #2 alone | unisrec: 0.0550 ± 0.0000 (+10.0 %) | id-transformer: 0.0500 ± 0.0000 (+25.0 %) |" in printed
    assert "| teacher #2 alone + embedding distillation | unisrec: 0.0700" in printed
    rows = [line.split(" | ")[0] for line in printed.splitlines() if line.startswith("| ")]
    assert rows[1:5] == ["| no distillation", "| teacher #1 alone", "| teacher #2 alone",
                         "| teacher #2 alone + embedding distillation"]  # quality.py's order, whichever column has what
    assert g.row_label("teacher zz alone", ["a"]) == "teacher zz alone"  # not among its teachers: as it is
    assert g.row_label("all teachers, uniform", ["a"]) == "all teachers, uniform"
