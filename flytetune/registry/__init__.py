"""A model registry on object storage, with no service of its own.

Under `<output_uri>/<name>/`:

    <version>/manifest.json     published run folders (flytetune.artifacts.publish; no manifest: incomplete)
    production.json             the pointer: which version serves, why, who, when, its metrics
    promotions/<UTC time>-<random>.json   append-only log, one new object per promote or rollback

The pointer is replaced by compare-and-swap (`storage.write_bytes_if`), so two runs promoting at
once never overwrite each other silently: the loser re-reads and tries again on top of the winner.
Each pointer carries a counter `seq` and the whole event that set it; the event is then appended
to the log as a new object (no read-modify-write of a shared log file). The registry is
consistent when the pointer's version is the `to` of the log's event with the highest `seq`, and
every event's `from` is the `to` of the one before. A writer that dies between the swap and the
append leaves only the newest event unlogged; it is in the pointer, and the next promote or
rollback (and `history`) restores it.

CLI: python -m flytetune.registry list|show|history|promote|rollback --output_uri URI --name NAME
"""

import contextlib
import datetime as dt
import getpass
import json
import os
import random
import socket
import time

from flytetune import artifacts, storage

POINTER = "production.json"
PROMOTIONS = "promotions"
MAX_ATTEMPTS = 20  # compare-and-swap rounds before giving up; each loss means another writer made progress


class RegistryError(ValueError):
    """Bad input or a state that forbids the request: one line naming the model and the version."""


class ProductionMoved(RegistryError):
    """Production is no longer the version a decision was made against (another run promoted meanwhile)."""


# `promote(..., replaces=ANY)`: whatever serves now.
ANY = object()


def _model_uri(output_uri: str, name: str) -> str:
    return artifacts.join(output_uri, name)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def current_actor() -> str:
    """The Flyte execution when run by Flyte, else user@host."""
    execution = os.environ.get("FLYTE_INTERNAL_EXECUTION_ID")
    if execution:
        return execution
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# --- reading ---------------------------------------------------------------------------------------

def _read_pointer(output_uri: str, name: str) -> tuple[dict | None, str | None]:
    """The pointer and its version token; (None, None) before the first promotion."""
    found = storage.read_with_token(artifacts.join(_model_uri(output_uri, name), POINTER))
    if found is None:
        return None, None
    data, token = found
    return json.loads(data), token


def production(output_uri: str, name: str) -> dict | None:
    """The production pointer (version, run_uri, metrics, promoted_at, by, reason, seq, event), or None."""
    return _read_pointer(output_uri, name)[0]


def _versions(output_uri: str, name: str) -> dict[str, bool]:
    """version -> complete (has a manifest), from one listing of the model's prefix."""
    model_uri = _model_uri(output_uri, name)
    versions: dict[str, bool] = {}
    for uri in storage.ls(model_uri):
        relative = uri[len(model_uri.rstrip("/")) + 1:]
        if "/" not in relative or relative.startswith(f"{PROMOTIONS}/"):
            continue  # production.json, the log
        version, rest = relative.split("/", 1)
        versions[version] = versions.get(version, False) or rest == artifacts.MANIFEST
    return versions


def _manifest(run_uri: str) -> dict:
    return json.loads(storage.read_bytes(artifacts.join(run_uri, artifacts.MANIFEST)))


def list_versions(output_uri: str, name: str) -> list[dict]:
    """Every published version, oldest first: version, created_at, metrics, complete, production."""
    pointer = production(output_uri, name)
    serving = pointer["version"] if pointer else None
    out = []
    for version, complete in sorted(_versions(output_uri, name).items()):
        manifest = _manifest(artifacts.join(_model_uri(output_uri, name), version)) if complete else {}
        out.append({"version": version, "created_at": manifest.get("created_at"),
                    "metrics": manifest.get("metrics"), "complete": complete, "production": version == serving})
    return out


def show(output_uri: str, name: str, version: str | None = None) -> dict:
    """One version (production by default): its run URI, whether it serves, and its manifest."""
    pointer = production(output_uri, name)
    if version is None:
        if pointer is None:
            raise RegistryError(f"{_model_uri(output_uri, name)}: no production version yet; name one with --version")
        version = pointer["version"]
    complete = _require_version(output_uri, name, version)
    run_uri = artifacts.join(_model_uri(output_uri, name), version)
    return {"version": version, "run_uri": run_uri, "complete": complete,
            "production": bool(pointer and pointer["version"] == version),
            "pointer": pointer if pointer and pointer["version"] == version else None,
            "manifest": _manifest(run_uri) if complete else None}


def _require_version(output_uri: str, name: str, version: str) -> bool:
    versions = _versions(output_uri, name)
    if version not in versions:
        known = ", ".join(sorted(versions)[-5:]) or "none"
        raise RegistryError(f"{_model_uri(output_uri, name)}: no version {version!r} (latest: {known})")
    return versions[version]


def _event_uri(output_uri: str, name: str, event_id: str) -> str:
    return artifacts.join(_model_uri(output_uri, name), PROMOTIONS, f"{event_id}.json")


def history(output_uri: str, name: str) -> list[dict]:
    """Every promote and rollback, oldest first (by `seq`), including one whose append was interrupted."""
    prefix = artifacts.join(_model_uri(output_uri, name), PROMOTIONS)
    events = {}
    for uri in storage.ls(prefix):
        if uri.endswith(".json"):
            event = json.loads(storage.read_bytes(uri))
            events[event["id"]] = event
    pointer = production(output_uri, name)
    if pointer is not None:
        events.setdefault(pointer["event"]["id"], pointer["event"])
    return sorted(events.values(), key=lambda e: (e["seq"], e["when"], e["id"]))


# --- writing ---------------------------------------------------------------------------------------

def _append(output_uri: str, name: str, event: dict) -> None:
    """Write the event as a new object; it may already be there (a retried or repaired append)."""
    # Already there: the same id is the same event, written by an earlier attempt or a repair.
    with contextlib.suppress(storage.PreconditionFailed):
        storage.write_bytes_if(_event_uri(output_uri, name, event["id"]),
                               (json.dumps(event, indent=2) + "\n").encode(), None)


def _check_promotable(output_uri: str, name: str, version: str) -> dict:
    """The manifest of a complete version whose files all match it; RegistryError otherwise."""
    if not _require_version(output_uri, name, version):
        raise RegistryError(f"{artifacts.join(_model_uri(output_uri, name), version)}: incomplete "
                            f"(no {artifacts.MANIFEST}); only a finished publish can be promoted")
    try:
        return artifacts.verify(artifacts.join(_model_uri(output_uri, name), version))
    except (FileNotFoundError, ValueError, storage.StorageError) as e:
        raise RegistryError(f"{e}; refusing to promote it") from None


def _swap(output_uri: str, name: str, choose, action: str, reason: str, by: str | None) -> dict:
    """Compare-and-swap loop: read the pointer, let `choose(pointer)` name the target version, write the
    new pointer only if nobody changed it meanwhile, then append the event. Returns the new pointer."""
    if not reason or not reason.strip():
        raise RegistryError(f"{_model_uri(output_uri, name)}: a reason is required (--reason TEXT)")
    by = by or current_actor()
    pointer_uri = artifacts.join(_model_uri(output_uri, name), POINTER)
    event_ids: set[str] = set()
    for attempt in range(MAX_ATTEMPTS):
        pointer, token = _read_pointer(output_uri, name)
        if pointer is not None:
            if pointer["event"]["id"] in event_ids:
                break  # our write went through although its answer was lost (a retried request saw 412)
            _append(output_uri, name, pointer["event"])  # repair an append interrupted after its swap
        version, manifest = choose(pointer)
        now = _utc_now()
        event_id = f"{now:%Y%m%dT%H%M%S.%fZ}-{os.urandom(4).hex()}"
        event_ids.add(event_id)
        event = {"id": event_id, "event": action, "from": pointer["version"] if pointer else None, "to": version,
                 "by": by, "when": now.isoformat(timespec="microseconds"), "why": reason,
                 "seq": (pointer["seq"] if pointer else 0) + 1}
        new_pointer = {"version": version, "run_uri": artifacts.join(_model_uri(output_uri, name), version),
                       "metrics": manifest.get("metrics"), "promoted_at": event["when"], "by": by, "reason": reason,
                       "seq": event["seq"], "event": event}
        try:
            storage.write_bytes_if(pointer_uri, (json.dumps(new_pointer, indent=2) + "\n").encode(), token)
        except storage.PreconditionFailed:
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # someone else promoted: re-read, go again
            continue
        _append(output_uri, name, event)
        return new_pointer
    else:
        raise RegistryError(f"{pointer_uri}: changed by other writers on each of {MAX_ATTEMPTS} attempts; try again")
    _append(output_uri, name, pointer["event"])
    return pointer


def promote(output_uri: str, name: str, version: str, reason: str, by: str | None = None,
            replaces: object = ANY) -> dict:
    """Make `version` the production version; return the new pointer.

    Refuses a version that is unknown, incomplete, fails `artifacts.verify`, or already serves.
    Safe against concurrent promotions: each one lands in the log, in `seq` order, and the pointer
    ends at the last one. `replaces` (a version, or None for "no production yet") makes the swap
    conditional on what serves: a gate's decision against version X must not replace Y
    (ProductionMoved).
    """
    manifest = _check_promotable(output_uri, name, version)

    def choose(pointer: dict | None) -> tuple[str, dict]:
        serving = pointer["version"] if pointer else None
        if serving == version:
            raise RegistryError(f"{_model_uri(output_uri, name)}: {version} is already in production")
        if replaces is not ANY and serving != replaces:
            raise ProductionMoved(f"{_model_uri(output_uri, name)}: production moved to {serving} after this run "
                                  f"was compared with {replaces or 'no production'}; not promoting {version} "
                                  "(compare again, or promote by hand)")
        return version, manifest

    return _swap(output_uri, name, choose, "promote", reason, by)


def _previous(events: list[dict]) -> str | None:
    """The version before the current one: replay the log as a stack (promote pushes, rollback pops),
    so a second rollback goes further back rather than undoing the first."""
    stack: list[str] = []
    for event in events:
        if event["event"] == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != event["to"]:
            stack.append(event["to"])
    return stack[-2] if len(stack) >= 2 else None


def rollback(output_uri: str, name: str, reason: str, by: str | None = None) -> dict:
    """Point production back at the version it served before the current one; return the new pointer."""

    def choose(pointer: dict | None) -> tuple[str, dict]:
        model_uri = _model_uri(output_uri, name)
        if pointer is None:
            raise RegistryError(f"{model_uri}: no production version yet; nothing to roll back")
        target = _previous(history(output_uri, name))
        if target is None:
            raise RegistryError(f"{model_uri}: production ({pointer['version']}) has no earlier version "
                                "to roll back to")
        return target, _check_promotable(output_uri, name, target)

    return _swap(output_uri, name, choose, "rollback", reason, by)
