from pathlib import Path

import pytest

from prmkd_dist.train.config import CONFIG_DIR, ConfigError, TrainConfig, load_config
from prmkd_dist.train.trainer import configured_stride


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


BASE = "data: {dataset: ml-latest-small, max_len: 50}\nmodel: {name: sasrec, hparams: {dim: 32}}\n"


def test_load_types_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "optim: {lr: 1e-3, epochs: 3}\neval: {ks: [5, 10]}\n"),
                      ["optim.batch_size=32", "model.hparams.num_layers=1", "run.tensorboard=false"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string: still a float
    assert cfg.optim.epochs == 3 and cfg.optim.batch_size == 32 and cfg.optim.patience == 5
    assert cfg.eval.ks == (5, 10) and cfg.eval.exclude_history is True
    assert cfg.model.hparams == {"dim": 32, "num_layers": 1}
    assert cfg.run.tensorboard is False and cfg.data.max_len == 50


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = write(tmp_path, BASE + "optim: {lr: 0.001, learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml.*unknown key optim\.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match="unknown key bogus_section"):
        load_config(write(tmp_path, BASE + "bogus_section: {}\n"))
    with pytest.raises(ConfigError, match="unknown key optim.lrr"):
        load_config(write(tmp_path, BASE), ["optim.lrr=1"])


def test_wrong_type_names_key_and_expectation(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: optim\.batch_size: expected an integer, got str 'big'"):
        load_config(write(tmp_path, BASE + "optim: {batch_size: big}\n"))
    with pytest.raises(ConfigError, match=r"run\.tensorboard: expected a boolean"):
        load_config(write(tmp_path, BASE), ["run.tensorboard=1"])
    with pytest.raises(ConfigError, match=r"eval\.ks\[1\]: expected an integer"):
        load_config(write(tmp_path, BASE + "eval: {ks: [10, x]}\n"))
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number"):
        load_config(write(tmp_path, BASE + "optim: {lr: fast}\n"))
    with pytest.raises(ConfigError, match=r"optim\.epochs=0: expected a value >= 1"):
        load_config(write(tmp_path, BASE), ["optim.epochs=0"])
    with pytest.raises(ConfigError, match=r"data\.window_stride.*expected 0 \(= max_len\) or 1\.\.max_len"):
        load_config(write(tmp_path, BASE), ["data.windows=all", "data.max_len=10", "data.window_stride=11"])
    # a stride with one window per user is refused when the next-item objective is built
    with pytest.raises(ConfigError, match=r"data\.window_stride=2: only applies to data\.windows: all"):
        configured_stride(load_config(write(tmp_path, BASE), ["data.windows=last", "data.window_stride=2"]))
    assert configured_stride(load_config(write(tmp_path, BASE), ["data.windows=all", "data.window_stride=2"])) == 2


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key model\b"):
        load_config(write(tmp_path, "data: {dataset: x}\n"))
    with pytest.raises(ConfigError, match=r"missing required key data\.dataset"):
        load_config(write(tmp_path, "data: {max_len: 5}\nmodel: {name: sasrec}\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["optim.lr"])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_load_and_build(path):
    from prmkd_dist.train.trainer import build_model

    cfg = load_config(path)
    if path.stem.endswith(("-ml", "-games")):
        assert cfg.data.max_len == 50  # the length the RESULTS rows were measured with
    if path.stem.endswith("-ml"):
        # ml histories (165 ratings on average) are far longer than 50: every training interaction is a
        # target, either as its own window (students) or as a packed position (distillation)
        if path.stem.startswith("distill-"):
            assert cfg.distill.packing == "window"
        else:
            assert cfg.data.windows == "all"
    model = build_model(cfg, num_items=100)
    assert model.num_items == 100
