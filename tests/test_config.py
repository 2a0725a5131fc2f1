from pathlib import Path

import pytest

from lacy.config import ConfigError, LacyConfig, config_hash, help_text, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, LacyConfig)


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML"


def test_dotted_overrides_and_types():
    cfg = load_config(None, ["--train.lr", "3e-4", "--labels.rule", "loss", "data.max_docs=10"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.labels.rule == "loss"
    assert cfg.data.max_docs == 10


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="labels.rule"):
        load_config(None, ["--labels.rule", "nonsense"])
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(None, ["--train.nope", "1"])
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["--train.lr", "fast"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(None, ["--train.max_steps", "7"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["--train.max_steps", "8"])) != config_hash(cfg)


def test_help_lists_documented_fields():
    text = help_text()
    assert "--train.max_supervised_tokens" in text
    assert "token equalisation" in text
