"""Finding complete checkpoints in storage: `step-NNNNNN/` folders whose manifest was written last.

No torch here: the first task checks `--from_checkpoint` in the light image, before any GPU starts.
Checkpoints live in a bucket others can write, so every manifest is treated as untrusted: its size
is bounded, its shape checked and its file names checked before use, and a folder whose manifest
does not pass is skipped with a warning when searching (and refused, in one line, when named).
"""

import datetime as dt
import json
import logging
import re

from flytetune import storage
from flytetune.storage.transfer import backend
from flytetune.storage.uri import StorageError, safe_relative

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1
# What `checkpoint.load` reads; a manifest without them is not a checkpoint of this format.
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")
MAX_MANIFEST_BYTES = 1 << 20  # ours are under 1 KiB
# Far above any checkpoint file of the supported backbones; a larger declared size is refused
# rather than downloaded onto the pod's disk.
MAX_FILE_BYTES = 20 << 30
_STEP_DIR = re.compile(r"(?:^|/)step-(\d{6,})$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A run id (`--from_checkpoint <run id>`): one name under checkpoint.uri, as artifacts.new_version makes.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the run."""


def object_size(uri: str) -> int | None:
    """Size in bytes of one object or file, or None when there is none."""
    loc = storage.parse(uri)
    info = backend(loc).stat(loc)
    return None if info is None else info.size


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_file_name(name: str, where: str) -> str:
    """A file name from a manifest, refused unless it stays inside the step folder."""
    try:
        safe_relative(name, where)
    except StorageError:
        raise CheckpointError(f"{where}: unsafe file name {name!r} (absolute, '..', '.', backslash or empty); "
                              "refusing the checkpoint") from None
    if "/" in name:  # checkpoint files are flat: no folder inside a step folder to follow or create
        raise CheckpointError(f"{where}: unsafe file name {name!r} (a subfolder); refusing the checkpoint")
    return name


def parse_manifest(data: bytes, uri: str) -> dict:
    """The manifest of step folder `uri`, shape-checked; CheckpointError (one line) when it is not one."""
    where = f"{uri}/{MANIFEST}"
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    if manifest.get("format") != FORMAT or not _is_int(manifest.get("format")):
        raise CheckpointError(f"{where}: format {manifest.get('format')!r} is not {FORMAT}, the one this code reads")
    step = manifest.get("step")
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"{where}: 'step' must be a non-negative integer, not {step!r}")
    named = _STEP_DIR.search(uri)
    if named and int(named.group(1)) != step:
        raise CheckpointError(f"{where}: says step {step}, but the folder is {named.group(0).lstrip('/')}")
    created = manifest.get("created_at")
    try:
        created_at = dt.datetime.fromisoformat(created) if isinstance(created, str) else None
    except ValueError:
        created_at = None
    if created_at is None or created_at.tzinfo is None:
        raise CheckpointError(f"{where}: 'created_at' must be an ISO 8601 time with a UTC offset, not {created!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{where}: 'files' must be a non-empty object of name -> {{sha256, bytes}}")
    for name, entry in files.items():
        check_file_name(name, where)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.fullmatch(entry["sha256"]) or not _is_int(entry.get("bytes")):
            raise CheckpointError(f"{where}: files[{name!r}] must be {{\"sha256\": 64 hex digits, \"bytes\": int}}")
        if not 0 <= entry["bytes"] <= MAX_FILE_BYTES:
            raise CheckpointError(f"{where}: files[{name!r}] declares {entry['bytes']} bytes, outside 0.."
                                  f"{MAX_FILE_BYTES}; refusing the checkpoint")
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise CheckpointError(f"{where}: lists no {', '.join(missing)}; not a checkpoint of this format")
    return {**manifest, "created_at": created_at}


def read_manifest(uri: str) -> dict:
    """Read and check the manifest of step folder `uri` (see `parse_manifest`); `created_at` is a datetime."""
    uri = uri.rstrip("/")
    where = f"{uri}/{MANIFEST}"
    if storage.is_local(where) and storage.local_path(where).is_symlink():
        raise CheckpointError(f"{where}: is a symbolic link; refusing the checkpoint")
    try:
        size = object_size(where)
        if size is None:
            raise CheckpointError(f"{uri}: not a complete checkpoint (no {MANIFEST})")
        if size > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{where}: {size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
        data = storage.read_bytes(where)
    except StorageError as e:
        raise CheckpointError(f"{uri}: not a complete checkpoint ({e})") from None
    if len(data) > MAX_MANIFEST_BYTES:  # it grew since the size check
        raise CheckpointError(f"{where}: over the {MAX_MANIFEST_BYTES}-byte limit for a manifest")
    return parse_manifest(data, uri)


def _readable(uri: str, *, run: bool) -> list[tuple[str, dict]]:
    """(step folder, manifest) of each checkpoint under `uri` whose manifest passes; with `run`, only
    the step folders right under `uri`, else those at any depth. The others are skipped with a warning."""
    uri = uri.rstrip("/")
    found = []
    for obj in storage.ls(uri):
        folder, _, name = obj.rpartition("/")
        if name != MANIFEST or not _STEP_DIR.search(folder) or (run and folder.rpartition("/")[0] != uri):
            continue
        try:
            found.append((folder, read_manifest(folder)))
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", folder, e)
    return found


def complete_checkpoints(uri: str) -> dict[int, str]:
    """Step number -> folder URI of every checkpoint under `uri` (one level) with a well-formed manifest.

    Files are not verified here (that needs a download): `checkpoint.load` does it.
    """
    return {manifest["step"]: folder for folder, manifest in _readable(uri, run=True)}


def latest(uri: str) -> str | None:
    """The newest complete checkpoint folder under a run prefix, or None."""
    found = complete_checkpoints(uri)
    return found[max(found)] if found else None


def _latest_of_newest_run(base_uri: str) -> str:
    # Run prefix -> its newest `created_at` (when the run was last active) and its step folders.
    active: dict[str, dt.datetime] = {}
    steps: dict[str, dict[int, str]] = {}
    for folder, manifest in _readable(base_uri, run=False):
        run = folder.rpartition("/")[0]
        active[run] = max(active.get(run, manifest["created_at"]), manifest["created_at"])
        steps.setdefault(run, {})[manifest["step"]] = folder
    if not active:
        raise CheckpointError(f"--from_checkpoint latest: no complete checkpoint under {base_uri}")
    run = max(active, key=active.get)
    step = max(steps[run])
    log.info("--from_checkpoint latest: run %s (last checkpoint written %s), step %d, out of %d run(s) under %s",
             run.rpartition("/")[2], active[run].isoformat(timespec="seconds"), step, len(active), base_uri)
    return steps[run][step]


def resolve(spec: str, base_uri: str | None) -> str:
    """Turn `--from_checkpoint` into a step folder URI. `spec` is one of

    - `latest`: the newest complete checkpoint (highest step) of the most recently active run under
      `base_uri` (the run whose newest manifest was written last); the log names the run and step;
    - a run id, i.e. a run prefix name right under `base_uri`: that run's newest complete checkpoint;
    - a step folder URI (`.../step-000600`): that checkpoint;
    - a run prefix URI: its newest complete checkpoint.

    Raises CheckpointError (one line) when nothing complete is there or a named manifest is malformed.
    Folders with malformed manifests are skipped, with a warning, when searching.
    """
    if spec == "latest":
        if not base_uri:
            raise CheckpointError("--from_checkpoint latest: no checkpoint.uri is configured to search")
        return _latest_of_newest_run(base_uri)
    spec = spec.rstrip("/")
    if _STEP_DIR.search(spec):
        read_manifest(spec)  # missing or malformed: one line naming the folder
        return spec
    if base_uri and _RUN_ID.fullmatch(spec):
        found = latest(f"{base_uri.rstrip('/')}/{spec}")
        if found is not None:
            log.info("--from_checkpoint %s: run %s under %s, %s", spec, spec, base_uri, found.rpartition("/")[2])
            return found
    found = latest(spec)
    if found is None:
        raise CheckpointError(f"--from_checkpoint {spec}: no complete checkpoint (step-*/{MANIFEST}) there"
                              + (f" nor under {base_uri.rstrip('/')}/{spec}" if base_uri and _RUN_ID.fullmatch(spec)
                                 else ""))
    return found


def resolve_resume(cfg, from_checkpoint: str | None) -> str | None:
    """Check `--from_checkpoint` before any work: it must name a complete checkpoint."""
    return resolve(from_checkpoint, cfg.checkpoint.uri) if from_checkpoint else None
