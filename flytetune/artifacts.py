"""Publish a trained model as a versioned, verifiable run folder.

Layout: `<output_uri>/<model_name>/<version>/` holds the model files at its root (so that
`from_pretrained(<run folder>)` works), `metrics.json`, `data_meta.json`, and `manifest.json`.
The manifest is written last and lists a SHA-256 of every file: a run folder without a manifest
is incomplete and must be ignored.
"""

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from flytetune import scratch, storage
from flytetune.naming import branch_tag
from flytetune.storage.checksums import file_sha256
from flytetune.storage.uri import safe_relative

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def summary(metrics: dict) -> dict:
    """The headline test metrics a run reports (the full set is in metrics.json)."""
    return {k: metrics[k] for k in ("split", "n_examples", "accuracy", "macro_f1")}


def new_version(now: dt.datetime | None = None) -> str:
    """Sortable and unique enough for concurrent runs: UTC time plus 4 random hex digits, then the
    branch and commit when the code runs from a CI-built image."""
    now = now or dt.datetime.now(dt.timezone.utc)
    version = f"{now:%Y%m%dT%H%M%SZ}-{os.urandom(2).hex()}"
    tag = branch_tag()
    return f"{version}-{tag}" if tag else version


def code_version() -> str | None:
    """The git commit this code came from: stamped into images, or read from a checkout."""
    stamped = os.environ.get("FLYTETUNE_CODE_VERSION")
    if stamped:
        return stamped
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def publish(model_dir: Path, output_uri: str, model_name: str, *, metrics: dict, config: dict,
            data_meta: dict, version: str | None = None, extra_files: dict[str, Path] | None = None,
            gate: dict | None = None, init_from: str | None = None) -> str:
    """Upload the model folder with its metrics and lineage; return the run folder URI.

    `extra_files` (name -> local file) go next to the model, e.g. the full confusion matrix of a
    many-class evaluation that ran in another task. `gate` is the evaluation gate's decision
    (flytetune/gate.py): whether this version should replace production, and why. `init_from` is the
    published model it was warm-started from.
    """
    version = version or new_version()
    run_uri = join(output_uri, model_name, version)
    if storage.exists(join(run_uri, MANIFEST)):
        raise FileExistsError(f"{run_uri}: already published (manifest.json exists)")

    with scratch.folder("publish") as tmp:
        staging = Path(tmp) / "run"
        shutil.copytree(model_dir, staging)
        for name, path in (extra_files or {}).items():
            shutil.copy(path, staging / safe_relative(name, "extra_files"))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "data_meta.json").write_text(json.dumps(data_meta, indent=2) + "\n")
        upload_with_manifest(staging, run_uri, {
            "format": MANIFEST_FORMAT,
            "model_name": model_name,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "dataset_sha256": data_meta.get("dataset_sha256"),
            "data": {k: data_meta.get(k) for k in ("sources", "exports", "rows", "labels", "text_column",
                                                   "label_column", "prepared_uri")},
            "config": config,
            "init_from": init_from,
            "metrics": {k: metrics.get(k) for k in ("split", "n_examples", "accuracy", "macro_f1")},
            "gate": gate,
        })
    return run_uri


def publish_backbone(model_dir: Path, output_uri: str, model_name: str, *, config: dict, data_meta: dict,
                     version: str | None = None) -> str:
    """Publish a backbone pretrained by flytetune.train (train.objective mlm); return the run folder URI.

    Its metrics are the masked-token validation of the weights it kept. No gate and no production
    pointer: fine-tuning names this version's URI as `model.backbone`."""
    history = json.loads((Path(model_dir) / "train_history.json").read_text())
    kept = next((r for r in history["history"] if r["step"] == history.get("best_step")), history["history"][-1])
    metrics = {"split": "validation", "objective": "mlm", "n_examples": data_meta["rows"]["validation"],
               "accuracy": kept["val_accuracy"], "loss": kept["val_loss"], "step": kept["step"]}
    return publish(model_dir, output_uri, model_name, metrics=metrics, config=config, data_meta=data_meta,
                   version=version)


def file_entries(folder: Path) -> dict[str, dict]:
    """The manifest's `files`: relative path -> SHA-256 and size of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def upload_with_manifest(folder: Path, uri: str, fields: dict) -> dict:
    """Upload `folder` to `uri`, then its manifest (`fields` plus `files`); return the manifest.

    `folder` must not hold a manifest.json of its own: it would be uploaded before the files.
    """
    if (folder / MANIFEST).exists():
        raise FileExistsError(f"{folder / MANIFEST}: the folder to upload already has a manifest")
    manifest = {**fields, "files": file_entries(folder)}
    storage.sync(str(folder), uri)
    # Written last: its presence is the commit marker of the whole folder.
    storage.write_bytes(join(uri, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def read_manifest(run_uri: str) -> dict:
    """The manifest of a published run folder; FileNotFoundError naming the folder if it has none."""
    manifest_uri = join(run_uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"{run_uri}: no {MANIFEST}; the run folder is incomplete, or not a published model")
    return json.loads(storage.read_bytes(manifest_uri))


def fetch(run_uri: str, dest: Path) -> Path:
    """Download a published run folder to `dest` and check every file against its manifest."""
    storage.sync(run_uri, str(dest))
    verify(str(dest))
    return Path(dest)


def verify(run_uri: str) -> dict:
    """Check every file listed in the manifest against its size and SHA-256; return the manifest."""
    manifest = read_manifest(run_uri)
    for name, expected in manifest["files"].items():
        data = storage.read_bytes(join(run_uri, name))
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise ValueError(f"{join(run_uri, name)}: content does not match {MANIFEST}")
    return manifest
