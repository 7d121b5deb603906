"""Full-state training checkpoints: atomic, self-describing, durable, and safe to load.

A checkpoint is a folder `step-000600/` holding

    model.safetensors     model weights
    optimizer.pt          optimizer, LR scheduler and grad-scaler state (tensors and numbers only)
    rng.pt                python, numpy, torch CPU and CUDA RNG states
    trainer_state.json    step, data position (epoch, next batch, sampler seed), history, config
    manifest.json         SHA-256 and size of every file above; written last

Only folders with a manifest whose checksums match are ever resumed from. Files are written to a
local staging folder and uploaded in a background thread through `flytetune.storage`, the
manifest last, so the training loop only waits for the copy of the state to host memory.
Loading uses safetensors and `torch.load(weights_only=True)`: a checkpoint cannot run code.
"""

import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import random
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flytetune import scratch, storage

# Finding checkpoints needs no torch (the config checks run in the light image); re-exported here.
from flytetune.checkpoint_paths import (  # noqa: F401
    FORMAT,
    MANIFEST,
    REQUIRED_FILES,
    CheckpointError,
    complete_checkpoints,
    latest,
    object_size,
    read_manifest,
    resolve,
    resolve_resume,
)
from flytetune.storage.checksums import CHUNK, file_sha256

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
@dataclass
class TrainingProgress:
    """Where training stands: enough to continue exactly where it stopped."""

    global_step: int = 0
    epoch: int = 0
    # Next batch to run within `epoch`; batches before it were already trained on.
    batch_in_epoch: int = 0
    sampler_seed: int = 0
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    best_val_accuracy: float | None = None
    # The best evaluation by train.best_metric so far, its step, and evaluations since (flytetune/selection.py).
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    history: list[dict] = field(default_factory=list)
    # The metrics stream and the timeline travel with the checkpoint, so a resumed run reports the
    # whole run, attempt by attempt (flytetune.train.TrainResult.steps and .events).
    steps: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    # Seconds spent training, summed over attempts (not counting the time between them).
    elapsed_s: float = 0.0


@dataclass
class Snapshot:
    """Training state copied to host memory: the only part of a save the training loop waits for."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def rng_state() -> dict[str, Any]:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(model: torch.nn.Module, optimizer, scheduler, scaler, progress: TrainingProgress,
            extra: dict[str, Any]) -> Snapshot:
    """Copy the whole training state to host memory (blocking; everything after runs in background)."""
    model_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    return Snapshot(
        step=progress.global_step,
        model=model_state,
        optimizer={"optimizer": _to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict() if scaler is not None else None},
        rng=rng_state(),
        state={"format": FORMAT, "progress": dataclasses.asdict(progress), **extra},
    )


def write_files(snapshot: Snapshot, folder: Path) -> dict:
    """Write the checkpoint files (not the manifest) into `folder`; return the manifest to write."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(snapshot.model, folder / "model.safetensors")
    torch.save(snapshot.optimizer, folder / "optimizer.pt")
    torch.save(snapshot.rng, folder / "rng.pt")
    (folder / STATE).write_text(json.dumps(snapshot.state, indent=2) + "\n")
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}
    return {"format": FORMAT, "step": snapshot.step, "files": files,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")}


class CheckpointWriter:
    """Saves snapshots to `uri` (a run-scoped prefix) in one background thread, keeping the newest `keep`.

    `on_saved(step, uri, seconds)`, if given, is called in that thread once a save is complete.
    """

    def __init__(self, uri: str, keep: int = 2, on_saved: Callable[[int, str, float], None] | None = None):
        self.uri = uri.rstrip("/")
        self.keep = keep
        self._on_saved = on_saved
        self._staging = scratch.make("ckpt")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: concurrent.futures.Future | None = None
        # Seconds the last complete save took end to end; the SIGTERM handler budgets with it.
        self.last_save_s: float | None = None
        self.last_uri: str | None = None
        self.last_step: int | None = None
        # The step of the newest save asked for, complete or still in flight.
        self.queued_step: int | None = None
        # Never pruned: the best weights so far (flytetune/selection.py).
        self.protected_step: int | None = None

    def save(self, snapshot: Snapshot) -> None:
        """Queue a save; waits for the previous one first, so at most one upload is in flight."""
        self.wait()
        self.queued_step = snapshot.step
        self._pending = self._pool.submit(self._write, snapshot, time.monotonic())

    def save_now(self, snapshot: Snapshot) -> str:
        self.save(snapshot)
        self.wait()
        return self.last_uri

    def wait(self) -> None:
        """Block until the queued save is durable; re-raise its error, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
            shutil.rmtree(self._staging, ignore_errors=True)

    def _write(self, snapshot: Snapshot, queued_at: float) -> None:
        name = step_name(snapshot.step)
        local = self._staging / name
        shutil.rmtree(local, ignore_errors=True)
        manifest = write_files(snapshot, local)
        remote = f"{self.uri}/{name}"
        storage.sync(str(local), remote)
        # The manifest goes up last: until it exists the folder is invisible to resume.
        storage.write_bytes(f"{remote}/{MANIFEST}", (json.dumps(manifest, indent=2) + "\n").encode())
        shutil.rmtree(local, ignore_errors=True)
        self.last_uri, self.last_step = remote, snapshot.step
        self.last_save_s = time.monotonic() - queued_at
        log.info("checkpoint %s saved in %.1fs", remote, self.last_save_s)
        if self._on_saved is not None:
            self._on_saved(snapshot.step, remote, self.last_save_s)
        self._prune()

    def _prune(self) -> None:
        complete = sorted(complete_checkpoints(self.uri))
        for step in complete[:-self.keep]:
            if step != self.protected_step:
                storage.remove(f"{self.uri}/{step_name(step)}")


@dataclass
class Restored:
    uri: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]

    @property
    def progress(self) -> TrainingProgress:
        return TrainingProgress(**self.state["progress"])


def _fetch_verified(uri: str, dest: Path, expected: dict) -> None:
    """Copy one checkpoint file to `dest`, reading at most its declared size, and check its SHA-256.

    A local file is opened without following a symbolic link; a remote object's size is checked
    before its download starts (storage then verifies the download against that size).
    """
    declared = expected["bytes"]
    if storage.is_local(uri):
        try:
            fd = os.open(storage.local_path(uri), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise CheckpointError(f"{uri}: missing, though {MANIFEST} lists it; checkpoint is corrupt") from None
        except OSError as e:  # ELOOP: a symbolic link
            raise CheckpointError(f"{uri}: cannot be opened without following links ({e.strerror}); "
                                  "refusing the checkpoint") from None
        with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"{uri}: not a regular file; refusing the checkpoint")
            sha, size = hashlib.sha256(), 0
            while chunk := src.read(min(CHUNK, declared + 1 - size)):
                size += len(chunk)
                if size > declared:
                    raise CheckpointError(f"{uri}: larger than the {declared} bytes {MANIFEST} says; "
                                          "checkpoint is corrupt")
                sha.update(chunk)
                out.write(chunk)
        digest = sha.hexdigest()
    else:
        size = object_size(uri)
        if size is None:
            raise CheckpointError(f"{uri}: missing, though {MANIFEST} lists it; checkpoint is corrupt")
        if size > declared:
            raise CheckpointError(f"{uri}: larger than the {declared} bytes {MANIFEST} says; checkpoint is corrupt")
        storage.copy(uri, str(dest))
        digest, size = file_sha256(dest), dest.stat().st_size
    if size != declared or digest != expected["sha256"]:
        raise CheckpointError(f"{uri}: checksum does not match {MANIFEST}; checkpoint is corrupt")


def _deserialize(uri: str, name: str, read):
    try:
        return read()
    except Exception as e:  # noqa: BLE001 - whatever a hostile file makes the parser raise, one line
        first = (str(e).splitlines() or [""])[0][:160]
        raise CheckpointError(f"{uri}/{name}: cannot be loaded ({type(e).__name__}: {first})") from e


def load(uri: str) -> Restored:
    """Download a step folder, verify it against its manifest and load it without running code.

    Every failure (missing or malformed manifest, unsafe file name, wrong size or checksum, a file
    that does not deserialize) is a one-line CheckpointError naming the URI. Nothing is written
    outside a private staging folder, which is removed on return.
    """
    uri = uri.rstrip("/")
    manifest = read_manifest(uri)
    with scratch.folder("restore") as local:
        for name, expected in manifest["files"].items():
            _fetch_verified(f"{uri}/{name}", local / name, expected)
        state = _deserialize(uri, STATE, lambda: json.loads((local / STATE).read_text()))
        if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
            raise CheckpointError(f"{uri}/{STATE}: no 'progress' object")
        _deserialize(uri, STATE, lambda: TrainingProgress(**state["progress"]))  # unknown fields: one line
        return Restored(
            uri=uri,
            model=_deserialize(uri, "model.safetensors", lambda: load_file(local / "model.safetensors")),
            optimizer=_deserialize(uri, "optimizer.pt",
                                   lambda: torch.load(local / "optimizer.pt", weights_only=True, map_location="cpu")),
            rng=_deserialize(uri, "rng.pt", lambda: torch.load(local / "rng.pt", weights_only=True)),
            state=state,
        )


def restore_into(restored: Restored, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> TrainingProgress:
    """The inverse of `capture`: load a checkpoint into a freshly built model, optimizer, scheduler
    and gradient scaler (fp16; a checkpoint without one leaves it fresh), restore every RNG, and
    return where training stood."""
    model.load_state_dict(restored.model)
    optimizer.load_state_dict(restored.optimizer["optimizer"])
    scheduler.load_state_dict(restored.optimizer["scheduler"])
    if scaler is not None and restored.optimizer.get("scaler"):
        scaler.load_state_dict(restored.optimizer["scaler"])
    set_rng_state(restored.rng)
    return restored.progress


def check_compatible(restored: Restored, expected: dict[str, Any]) -> None:
    """Fail, naming the fields, when the checkpoint was made for another model shape or label map."""
    saved = restored.state.get("compat", {})
    diffs = [f"{key}: checkpoint has {saved.get(key)!r}, this run has {value!r}"
             for key, value in expected.items() if saved.get(key) != value]
    if diffs:
        raise CheckpointError(f"{restored.uri} does not fit this run: " + "; ".join(diffs))
