"""write_json_atomic: the one way the project writes a JSON file that another process may read meanwhile."""
import json
import os

import pytest

from prmkd_dist.data.paths import write_json_atomic


def test_writes_and_replaces_without_leaving_temporary_files(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(str(path), {"a": 2, "b": [1.5, None]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1.5, None]}
    assert path.read_text().startswith("{\n  ")  # indent 2 by default
    assert os.listdir(tmp_path) == ["report.json"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"rows": 3})
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, {"rows": object()})
    assert json.loads(path.read_text()) == {"rows": 3}
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_dump_options_pass_through(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"p": tmp_path}, default=str, indent=None)
    assert path.read_text() == json.dumps({"p": str(tmp_path)})
