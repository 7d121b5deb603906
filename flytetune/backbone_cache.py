"""Backbones in object storage: a model folder with a manifest.json, fetched into a local cache.

A remote backbone (`s3://`, `gs://` or `file://`) is a folder written by `python -m flytetune.backbone
publish` or a published run folder (flytetune/artifacts.py): both end with a manifest.json whose `files`
map every file to its SHA-256 and size. Only the files it lists are fetched, each checked against it;
the `resolve` step checks them too (`check`), so that a folder changed after it was published is
refused before a GPU is asked for, also when a cached prepare means training would fetch it first.

The cache is $FLYTETUNE_BACKBONE_CACHE, else `flytetune-backbone-cache-<uid>` in the temp directory
(TMPDIR), where scratch folders go too: writable in a Flyte pod that runs as uid 1000 with a read-only
home. A copy is `<cache>/<name>-<key>`, the key a hash of the URI and of the manifest's bytes, so a
folder published again under the same URI is fetched again. It is written in a scratch folder inside
the cache, its manifest.json last, then renamed into place: a killed fetch leaves a scratch folder
that is never used and is removed by the next fetch (flytetune/scratch.py), never a half copy.
"""

import concurrent.futures
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from flytetune import artifacts, scratch, storage
from flytetune.config import ConfigError
from flytetune.storage.checksums import file_sha256
from flytetune.storage.uri import StorageError, safe_relative

log = logging.getLogger(__name__)

ENV = "FLYTETUNE_BACKBONE_CACHE"
MANIFEST = artifacts.MANIFEST
SCHEMES = ("s3://", "gs://", "file://")
BACKBONE_FORMAT = 1
FETCH_CONCURRENCY = 8
# Weights do not change how text is tokenised; everything else in a model folder may (vocab, tokenizer config).
WEIGHTS = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")
# The largest folder the pre-flight check (`check`, in the `resolve` step) fetches into the cache:
# seconds for the default MiniLM backbone (91 MB), well within resolve's disk (configs/resources.yaml).
# A larger one's weights are streamed through SHA-256 there instead: network time, no disk.
PREFLIGHT_FETCH_BYTES = 256 << 20

# Copies fetched by this process: (cache root, URI) -> folder. Every step of one process sees one version.
_fetched: dict[tuple[str, str], Path] = {}


def is_remote(name: str) -> bool:
    return name.startswith(SCHEMES)


def _error(message: str) -> ConfigError:
    return ConfigError(f"model.backbone: {message}")


def publish_hint(uri: str) -> str:
    return f"upload the model folder with: python -m flytetune.backbone publish LOCAL_FOLDER {uri}"


def read_manifest(uri: str) -> tuple[dict, bytes]:
    """The folder's manifest, checked to be a model's (config.json listed, safe names), and its bytes."""
    if any(part in (".", "..") for part in uri.split("://", 1)[1].split("/")):
        raise _error(f"{uri}: '.' or '..' in the path; give the folder's own URI")
    manifest_uri = artifacts.join(uri, MANIFEST)
    try:
        raw = storage.read_bytes(manifest_uri) if storage.stat(manifest_uri) else None
    except StorageError as e:
        raise _error(str(e)) from None
    if raw is None:
        raise _error(f"{uri}: no {MANIFEST} (nothing there, or not uploaded with one); {publish_hint(uri)}")
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        for name, entry in files.items():
            safe_relative(name, manifest_uri)
            if name == MANIFEST or not isinstance(entry["bytes"], int) or not re.fullmatch(r"[0-9a-f]{64}",
                                                                                            entry["sha256"]):
                raise ValueError(name)
    except StorageError as e:
        raise _error(str(e)) from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _error(f"{manifest_uri}: not a flytetune manifest (a `files` map of path -> sha256, bytes)") from None
    if "config.json" not in files:
        raise _error(f"{uri}: {MANIFEST} lists no config.json; not a model folder")
    return manifest, raw


def check(uri: str) -> dict:
    """What the `resolve` step checks before a GPU is asked for; returns the manifest.

    Prepare is cached by the manifest's hashes, so on a re-run the training pod would be the first to
    fetch the folder: anything in it that no longer matches the manifest is refused here, in one line
    naming the file and the manifest. Every file is there at its size (a HEAD each, in parallel); the
    files other than weights (config, tokenizer, vocabulary: a few MB, what prepared data depends on)
    match their SHA-256, downloaded from storage whatever the cache holds; and so do the weights:
    when the whole folder is at most PREFLIGHT_FETCH_BYTES it is fetched into the cache as `fetch`
    does, for the steps that share this cache; larger weights are read as a stream through SHA-256
    (storage.sha256), never written to the pod's disk.
    """
    manifest, _ = read_manifest(uri)
    files = manifest["files"]
    _check_sizes(uri, files)
    with scratch.folder("check") as tmp:
        _copy_verified(uri, files, sorted(name for name in files if not name.endswith(WEIGHTS)), tmp)
        refuse_custom_code((tmp / "config.json").read_bytes(), artifacts.join(uri, "config.json"))
    if sum(entry["bytes"] for entry in files.values()) <= PREFLIGHT_FETCH_BYTES:
        fetch(uri)
    else:
        _stream_verified(uri, files, sorted(name for name in files if name.endswith(WEIGHTS)))
    return manifest


def _changed(where: str, what: str, entry: dict, uri: str) -> ConfigError:
    return _error(f"{where}: {what} {artifacts.join(uri, MANIFEST)} ({entry['bytes']} bytes, sha256 "
                  f"{entry['sha256'][:12]}); the folder was changed after it was published")


def _check_sizes(uri: str, files: dict) -> None:
    """Every file the manifest lists is in storage at the size it lists (a HEAD each, no download)."""
    def size(name: str) -> int | None:
        info = storage.stat(artifacts.join(uri, name))
        return None if info is None else info.size

    with concurrent.futures.ThreadPoolExecutor(FETCH_CONCURRENCY) as pool:
        try:
            sizes = dict(zip(files, pool.map(size, files), strict=True))
        except StorageError as e:
            raise _error(str(e)) from None
    for name in sorted(files):
        where, entry = artifacts.join(uri, name), files[name]
        if sizes[name] is None:
            raise _changed(where, "missing from storage, but listed in", entry, uri)
        if sizes[name] != entry["bytes"]:
            raise _changed(where, f"size ({sizes[name]} bytes) does not match", entry, uri)


def _stream_verified(uri: str, files: dict, names: list[str]) -> None:
    """Each of `names` read through SHA-256 (in parallel, nothing on disk), checked against the manifest."""
    def one(name: str) -> None:
        where = artifacts.join(uri, name)
        sha, size = storage.sha256(where)
        _check_digest(size, sha, files[name], where, uri)

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(FETCH_CONCURRENCY) as pool:
        for done in [pool.submit(one, name) for name in names]:
            try:
                done.result()
            except StorageError as e:
                raise _error(str(e)) from None
    log.info("%s: %d weight file(s), %.1f MB, read through SHA-256 in %.1fs", uri, len(names),
             sum(files[n]["bytes"] for n in names) / 1e6, time.monotonic() - started)


def _copy_verified(uri: str, files: dict, names: list[str], dest: Path) -> None:
    """Download `names` from the folder `uri` into `dest` in parallel, each checked against the manifest."""
    def one(name: str) -> None:
        storage.copy(artifacts.join(uri, name), str(dest / name))
        _verify(dest / name, files[name], artifacts.join(uri, name), uri)

    with concurrent.futures.ThreadPoolExecutor(FETCH_CONCURRENCY) as pool:
        for done in [pool.submit(one, name) for name in names]:
            try:
                done.result()
            except StorageError as e:
                raise _error(str(e)) from None


def refuse_custom_code(config: bytes, where: str) -> None:
    """A config.json with `auto_map` names Python code shipped beside the weights: transformers runs it
    only with trust_remote_code, which flytetune never passes; refuse it here, in one line, instead."""
    try:
        parsed = json.loads(config)
    except ValueError:
        raise _error(f"{where}: not valid JSON") from None
    if isinstance(parsed, dict) and "auto_map" in parsed:
        raise _error(f"{where}: needs custom model code (auto_map); only architectures that transformers "
                     "ships can be a backbone")


def _verify(data_or_path: bytes | Path, entry: dict, where: str, uri: str) -> None:
    if isinstance(data_or_path, Path):
        size, sha = data_or_path.stat().st_size, file_sha256(data_or_path)
    else:
        size, sha = len(data_or_path), hashlib.sha256(data_or_path).hexdigest()
    _check_digest(size, sha, entry, where, uri)


def _check_digest(size: int, sha: str, entry: dict, where: str, uri: str) -> None:
    if size != entry["bytes"] or sha != entry["sha256"]:
        raise _changed(where, f"content ({size} bytes, sha256 {sha[:12]}) does not match", entry, uri)


def cache_root() -> Path:
    """The cache folder, made if missing; refused if another user owns it (their files would be loaded)."""
    root = Path(os.environ.get(ENV) or Path(tempfile.gettempdir()) / f"flytetune-backbone-cache-{os.getuid()}")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        owner = root.stat().st_uid
    except OSError as e:
        raise _error(f"cannot create the backbone cache {root} ({e.strerror}); set {ENV} to a writable "
                     "folder") from None
    if owner != os.getuid():
        raise _error(f"the backbone cache {root} belongs to uid {owner}, not this user; set {ENV} to a folder "
                     "of your own")
    return root


def _complete(folder: Path, digest: str, files: dict) -> bool:
    """A copy is complete when its marker (the manifest, written last) is this manifest and every file is there."""
    marker = folder / MANIFEST
    if not marker.is_file() or hashlib.sha256(marker.read_bytes()).hexdigest() != digest:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == entry["bytes"]
               for name, entry in files.items())


def fetch(uri: str) -> Path:
    """The local copy of the remote model folder `uri`, fetched and verified unless the cache has it."""
    root = cache_root()
    known = _fetched.get((str(root), uri))
    if known is not None and (known / MANIFEST).is_file():
        return known
    manifest, raw = read_manifest(uri)
    digest = hashlib.sha256(raw).hexdigest()
    files = manifest["files"]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(uri.rstrip("/").split("/")[-2:]))[-60:]
    key = hashlib.sha256(f"{uri}\0{digest}".encode()).hexdigest()[:20]
    folder = root / f"{tail}-{key}"
    if not _complete(folder, digest, files):
        if folder.exists():
            log.warning("%s: incomplete copy of %s (no marker or missing files); fetching again", folder, uri)
            shutil.rmtree(folder)
        _download(uri, manifest, raw, folder, root)
    _fetched[(str(root), uri)] = folder
    return folder


def _download(uri: str, manifest: dict, raw: bytes, folder: Path, root: Path) -> None:
    files = manifest["files"]
    log.info("fetching backbone %s (%d files, %.1f MB) into %s", uri, len(files),
             sum(e["bytes"] for e in files.values()) / 1e6, folder)
    tmp = scratch.make("fetch", root)
    try:
        _copy_verified(uri, files, list(files), tmp)
        refuse_custom_code((tmp / "config.json").read_bytes(), artifacts.join(uri, "config.json"))
        (tmp / MANIFEST).write_bytes(raw)  # the marker, last
        try:
            tmp.rename(folder)
        except OSError:
            # Another process fetched the same version first: its copy is as good as ours.
            if not _complete(folder, hashlib.sha256(raw).hexdigest(), files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(folder: Path, uri: str) -> dict:
    """Upload a local model folder to `uri` with a manifest, written last; return the manifest."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json; not a model folder")
    refuse_custom_code((folder / "config.json").read_bytes(), str(folder / "config.json"))
    if storage.exists(artifacts.join(uri, MANIFEST)):
        raise FileExistsError(f"{uri}: already published ({MANIFEST} exists)")
    # A snapshot: the files cannot change between being hashed and uploaded. A manifest of the folder's
    # own (a fetched copy, a downloaded run folder) is not carried: the new one lists these files.
    with scratch.folder("publish") as tmp:
        staging = tmp / "model"
        shutil.copytree(folder, staging, ignore=lambda d, names: [MANIFEST] if Path(d) == folder else [])
        return artifacts.upload_with_manifest(staging, uri, {
            "format": BACKBONE_FORMAT,
            "kind": "backbone",
            "source": folder.name,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": artifacts.code_version(),
        })
