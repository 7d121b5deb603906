"""Finding complete checkpoints in storage: `step-NNNNNN/` folders whose manifest was written last.

No torch here: the first task checks `--from_checkpoint` in the light image, before any GPU starts.
"""

import json
import re

from flytetune import storage

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"(?:^|/)step-(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the run."""


def complete_checkpoints(uri: str) -> dict[int, str]:
    """Step number -> folder URI of every checkpoint under `uri` (one level) that has a manifest."""
    uri = uri.rstrip("/")
    found = {}
    for obj in storage.ls(uri):
        folder, _, name = obj.rpartition("/")
        match = _STEP_DIR.search(folder)
        if name == MANIFEST and match and folder.rpartition("/")[0] == uri:
            found[int(match.group(1))] = folder
    return found


def latest(uri: str) -> str | None:
    """The newest complete checkpoint folder under a run prefix, or None."""
    found = complete_checkpoints(uri)
    return found[max(found)] if found else None


def resolve(spec: str, base_uri: str | None) -> str:
    """Turn `--from_checkpoint` (`latest`, a step folder or a run prefix) into a step folder URI.

    `latest` means the most recently written complete checkpoint under `base_uri`, across runs.
    Raises CheckpointError when nothing complete is there.
    """
    if spec == "latest":
        if not base_uri:
            raise CheckpointError("--from_checkpoint latest: no checkpoint.uri is configured to search")
        newest: tuple[str, str] | None = None
        for obj in storage.ls(base_uri):
            folder, _, name = obj.rpartition("/")
            if name == MANIFEST and _STEP_DIR.search(folder):
                created = json.loads(storage.read_bytes(obj))["created_at"]
                if newest is None or created > newest[0]:
                    newest = (created, folder)
        if newest is None:
            raise CheckpointError(f"--from_checkpoint latest: no complete checkpoint under {base_uri}")
        return newest[1]
    spec = spec.rstrip("/")
    if _STEP_DIR.search(spec):
        if not storage.exists(f"{spec}/{MANIFEST}"):
            raise CheckpointError(f"--from_checkpoint {spec}: not a complete checkpoint (no {MANIFEST})")
        return spec
    found = latest(spec)
    if found is None:
        raise CheckpointError(f"--from_checkpoint {spec}: no complete checkpoint (step-*/{MANIFEST}) there")
    return found


def resolve_resume(cfg, from_checkpoint: str | None) -> str | None:
    """Check `--from_checkpoint` before any work: it must name a complete checkpoint."""
    return resolve(from_checkpoint, cfg.checkpoint.uri) if from_checkpoint else None
