from pathlib import Path

import pytest

from flytetune.config import ConfigError, FinetuneConfig, load_config, parse_overrides

# Training configs; configs/resources.yaml sizes the tasks' pods (tests/test_cluster.py).
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if p.name != "resources.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, FinetuneConfig)
    assert path.read_text().startswith("#"), "config files start with a usage header"


def test_defaults_without_a_file():
    assert load_config(None) == FinetuneConfig()


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epoch: unknown key \(did you mean train.epochs\?\)"):
        load_config(path)


def test_unknown_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="trainer: unknown key"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "train.epochs: expected int, got 'three'"),
        ("train.learning_rate=true", "train.learning_rate: expected float"),
        ("data.max_rows=-5", "data.max_rows: must be positive"),
        ("train.batch_size=0", "train.batch_size: must be >= 1"),
        ("data.test_fraction=1.5", "data.test_fraction: must be in"),
        ("model.name=a/b", "model.name: must be non-empty"),
        ("train.deterministic=1", "train.deterministic: expected bool"),
    ],
)
def test_invalid_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_overrides_dotted_and_bare():
    cfg = load_config(None, ["train.epochs=2", "learning_rate=1e-4", "max_rows=300", "data.max_rows=null"])
    assert cfg.train.epochs == 2
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.data.max_rows is None


def test_override_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match=r"unknown key \(did you mean train.epochs\?\)"):
        load_config(None, ["epoch=2"])


def test_parse_overrides_string():
    assert parse_overrides("train.epochs=2, lr=1 ,x=y  z=w") == ["train.epochs=2", "lr=1", "x=y", "z=w"]
    assert parse_overrides("") == []


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["epochs=5", "max_rows=100"])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")
