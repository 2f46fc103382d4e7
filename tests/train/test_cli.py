import json

import pytest

from prmkd_dist.cli import main


@pytest.fixture(scope="module")
def prepared_ml(ml_split, tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared") / "ml"
    ml_split.data.save(str(d))
    return d


def test_cli_train_then_eval(prepared_ml, tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"data: {{dataset: '{prepared_ml}', max_len: 5}}\n"
        "model: {name: gru4rec, hparams: {dim: 16, dropout: 0.0}}\n"
        "optim: {epochs: 1, batch_size: 64, lr: 0.005}\n"
        "run: {tensorboard: false}\n"
    )
    out_dir = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--set", "run.seed=1", "--out-dir", str(out_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| gru4rec (valid) |" in printed and "| gru4rec (test) |" in printed and "NDCG@10" in printed
    results = json.loads((out_dir / "results.json").read_text())
    assert results["best_epoch"] == 1 and results["test"]["users"] == 610

    assert main(["eval", "--checkpoint", str(out_dir / "checkpoint"), "--stage", "valid", "--no-progress"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gru4rec (valid)")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) == pytest.approx(results["valid"]["NDCG@10"], abs=1e-4)  # HR@10, HR@20, NDCG@10


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["train", "--config", "sasrec-ml", "--set", "optim.learning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key optim.learning_rate" in err
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "not a student checkpoint" in capsys.readouterr().err
