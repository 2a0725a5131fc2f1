from pathlib import Path

import pytest

from lacy.core.config import ConfigError, LacyConfig, config_hash, help_text, load_config, save_config

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
    with pytest.raises(ConfigError, match="eval.big_fill"):
        load_config(None, ["--eval.big_fill", "1.5"])


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


def test_every_field_is_documented():
    """`--help` is the reference: a field without the string literal under it fails here."""
    import dataclasses
    import typing

    from lacy.core.config import field_docs

    missing = []

    def walk(cls, prefix=""):
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            elif not docs.get(f.name):
                missing.append(prefix + f.name)

    walk(LacyConfig)
    assert missing == []


def test_the_default_config_is_valid_and_late_failures_are_refused_at_load():
    LacyConfig()  # the defaults must work as they are (they used to name rules that could not train)
    with pytest.raises(ConfigError, match="experiment.rules/score.reference"):
        load_config(None, ["--experiment.rules", "[plain, rho]"])
    with pytest.raises(ConfigError, match="labels.rule/score.judge"):
        load_config(None, ["--labels.rule", "judge"])
    load_config(None, ["--experiment.rules", "[plain, rho]", "--score.reference", "smollm2"])
    with pytest.raises(ConfigError, match="score.model_actor_gpus"):
        load_config(None, ["--score.model_actor_gpus", "1"])
    with pytest.raises(ConfigError, match="experiment.headline_rate/eval.call_rates"):
        load_config(None, ["--eval.call_rates", "[0.1, 0.35]"])
    with pytest.raises(ConfigError, match="eval.call_rates"):
        load_config(None, ["--eval.call_rates", "[0.22, 1.5]"])
    with pytest.raises(ConfigError, match="experiment.triggers"):
        load_config(None, ["--experiment.triggers", "[p_call, entropy]"])


def test_moved_config_takes_derived_paths_along_and_keeps_given_ones(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["--run_dir", str(tmp_path / "a"),
                                            "--knowledge.db_path", str(tmp_path / "store.sqlite")])
    moved = cfg.moved(tmp_path / "b")
    assert moved.run_dir == str(tmp_path / "b")
    assert moved.score.output_dir == str(tmp_path / "b" / "shards")
    assert moved.train.output_dir == str(tmp_path / "b" / "train")
    assert moved.knowledge.db_path == str(tmp_path / "store.sqlite")  # given explicitly: stays
    assert cfg.score.output_dir == str(tmp_path / "a" / "shards")  # the original is untouched


def test_a_config_inherits_its_base_and_states_only_what_differs(tmp_path):
    (tmp_path / "a.yaml").write_text("run_dir: runs/a\ntrain: {lr: 0.5, max_steps: 7}\neval: {entities: 9}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {max_steps: 3}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text("base: ../b.yaml\neval: {entities: 2}\n")
    cfg = load_config(tmp_path / "sub" / "c.yaml", ["--train.lr", "0.25"])
    # Sections merge field by field, the nearest file wins, overrides win over every file.
    assert (cfg.train.max_steps, cfg.train.lr, cfg.eval.entities) == (3, 0.25, 2)
    assert cfg.run_dir.endswith("runs/a")
    (tmp_path / "a.yaml").write_text("base: sub/c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: no such config file .the base of"):
        load_config(tmp_path / "d.yaml")
    # The synthetic configs share synthbio.yaml's benchmark and say only what differs.
    quick, full = load_config("configs/synthbio-quick.yaml"), load_config("configs/synthbio.yaml")
    same = lambda section: {**vars(getattr(quick, section)), "output_dir": 0} == {**vars(getattr(full, section)),  # noqa: E731
                                                                               "output_dir": 0}
    assert same("train") and quick.model == full.model and quick.cascade == full.cascade
    assert (quick.eval.entities, full.eval.entities) == (160, 200)


def test_an_optional_field_added_later_keeps_every_content_key():
    """A field added with the default None (unused: `train.init_from`, `eval.people_file`) must not change
    the keys of what older code finished, or a new release retrains and re-evaluates every run folder."""
    from lacy.core.config import config_hash

    before = {"train": {"lr": 0.002, "steps": [1, 2]}, "eval": {"entities": 160}}
    after = {"train": {"lr": 0.002, "steps": [1, 2], "init_from": None}, "eval": {"entities": 160, "people_file": None}}
    assert config_hash(after) == config_hash(before)
    assert config_hash({**after, "train": {**after["train"], "init_from": "runs/x"}}) != config_hash(before)
    assert config_hash([None, 1]) != config_hash([1])  # positions in a list are content
