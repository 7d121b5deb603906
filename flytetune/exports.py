"""Dated exports: a prefix of `dt=` folders, each complete once its `_SUCCESS` marker exists.

A scheduled retraining is given a prefix rather than a file, so that every run picks up the newest
data without anyone editing the launch plan:

    s3://flytetune-data/transactions/exports/
        dt=2026-11-16/part-0000.parquet, part-0001.parquet, _SUCCESS
        dt=2026-11-23/part-0000.parquet, _SUCCESS
        dt=2026-11-30/part-0000.parquet                  <- still being written: no marker yet

Conventions (those of Hive partitions and of Spark/Hadoop's output committer, so an export written
by Spark, dbt or a `COPY INTO` job needs no adapter):

- A folder name is `dt=YYYY-MM-DD` (midnight UTC of that day) or `dt=YYYY-MM-DDTHH:MM:SSZ` (UTC), the
  colons optionally escaped as `%3A` as Hive and Spark write them. Other entries under the prefix are
  ignored; a `dt=` folder whose value is no such date is skipped with a warning.
- An export is complete when the empty object `_SUCCESS` sits directly in its folder. The writer
  creates it last (Hadoop's FileOutputCommitter does), so a listing that shows the marker shows
  every part. A folder without it is being written, or its writer died: it is skipped, with a log
  line naming it, never read half-written.
- The data files are the folder's direct children whose names do not start with `_` or `.`
  (Hadoop's hidden files: `_SUCCESS`, `_committed_*`, `.part-0000.crc`, `_temporary/`), in name
  order. A complete export with nested folders of data or without any data file is an error: the
  marker says it is finished, so falling back to an older one would hide a broken export.
- `pick_export(prefix, at)` takes the newest complete export dated at or before `at` (a scheduled
  run's kickoff time), so re-running an old execution trains on the data it saw. `NO_CUTOFF` (the
  workflow's default for hand-started runs) means the newest complete export.
"""

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flytetune import storage

log = logging.getLogger(__name__)

MARKER = "_SUCCESS"
PARTITION_KEY = "dt"
# The largest time a protobuf Timestamp (a Flyte datetime literal) holds: "no cutoff, take the newest".
NO_CUTOFF = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# How many candidates a "none qualifies" error names, to keep it one readable line.
_NAMED = 5


class ExportError(ValueError):
    """No usable export under a prefix, or a complete export that cannot be used; one line naming it."""


@dataclass(frozen=True)
class Export:
    """One complete dated export: `uri` is its `dt=` folder (ending in `/`), `date` its UTC time,
    `files` the URIs of its data files in name order, `marker` the URI of its `_SUCCESS`."""

    uri: str
    date: datetime
    files: tuple[str, ...]
    marker: str

    def lineage(self) -> dict:
        """What a run records about the data it trained on (JSON-ready)."""
        return {"uri": self.uri, "date": _format(self.date), "marker": self.marker, "files": list(self.files)}


def parse_date(value: str) -> datetime | None:
    """The UTC time a `dt=` value names, or None if it names none."""
    value = value.replace("%3A", ":").replace("%3a", ":")
    try:
        if _DATE.fullmatch(value):
            return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        if _TIMESTAMP.fullmatch(value):
            return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:  # 2026-13-01, 2026-02-30
        return None
    return None


def _format(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _folders(prefix_uri: str) -> dict[str, list[str]]:
    """`dt=` folder name -> the paths below it (relative to the folder), from one recursive listing."""
    base = prefix_uri.rstrip("/") + "/"
    folders: dict[str, list[str]] = {}
    for uri in storage.ls(prefix_uri):
        relative = uri[len(base):]
        head, sep, rest = relative.partition("/")
        if sep and head.startswith(f"{PARTITION_KEY}="):
            folders.setdefault(head, []).append(rest)
    return folders


def is_export_prefix(uri: str) -> bool:
    """True when `uri` ends in `/` and holds at least one `dt=` folder: a prefix of dated exports
    rather than one data file. A URI without the trailing `/` is never one, and costs no listing."""
    return uri.endswith("/") and bool(_folders(uri))


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def pick_export(prefix_uri: str, at: datetime = NO_CUTOFF) -> Export:
    """The newest complete export under `prefix_uri` dated at or before `at` (naive means UTC).

    Incomplete exports (no `_SUCCESS`) that would otherwise have been picked are skipped with a
    warning naming them. Raises ExportError naming the prefix when none qualifies, and naming the
    export when the newest complete one has no data files or nested data folders.
    """
    at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at
    base = prefix_uri.rstrip("/") + "/"
    dated, after = [], []
    for name, paths in _folders(prefix_uri).items():
        when = parse_date(name.partition("=")[2])
        if when is None:
            log.warning("%s%s/: not a date (use dt=YYYY-MM-DD or dt=YYYY-MM-DDTHH:MM:SSZ); skipped", base, name)
        elif when > at:
            after.append(name)
        else:
            dated.append((when, name, paths))
    if after:
        log.info("%s: ignoring %d export(s) dated after %s, e.g. %s", prefix_uri, len(after), _format(at),
                 ", ".join(sorted(after)[:_NAMED]))
    incomplete = []
    for when, name, paths in sorted(dated, reverse=True):
        folder = f"{base}{name}/"
        if MARKER not in paths:
            log.warning("%s: incomplete export (no %s), skipped", folder, MARKER)
            incomplete.append(name)
            continue
        nested = sorted(p for p in paths if "/" in p and not _hidden(p))
        if nested:
            raise ExportError(f"{folder}: has {MARKER} but also nested data ({nested[0]}); "
                              "an export must hold its data files directly in its dt= folder")
        files = tuple(folder + p for p in sorted(paths) if "/" not in p and not _hidden(p))
        if not files:
            raise ExportError(f"{folder}: has {MARKER} but no data files")
        log.info("%s: using export %s (%d file(s))", prefix_uri, folder, len(files))
        return Export(uri=folder, date=when, files=files, marker=folder + MARKER)
    cutoff = "" if at >= NO_CUTOFF else f" dated at or before {_format(at)}"
    found = [f"{n} (no {MARKER})" for n in incomplete[:_NAMED]] + [f"{n} (after)" for n in sorted(after)[:_NAMED]]
    seen = f"; found {', '.join(found)}" if found else ""
    raise ExportError(f"{prefix_uri}: no complete export ({PARTITION_KEY}=... folder with {MARKER}){cutoff}{seen}")


def copy_export(export: Export, dest_dir: Path, *, concurrency: int = 8) -> dict:
    """Copy the export's data files into `dest_dir` (flat, their own names, in parallel, each verified
    by storage.copy); return its lineage with the local names: `{"uri", "date", "marker", "files":
    [{"uri", "file"}, ...]}`, ready to merge into sources.json."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    names = [uri.rpartition("/")[2] for uri in export.files]
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(names)))) as pool:
        # list() re-raises the first copy's StorageError here.
        list(pool.map(lambda uri, name: storage.copy(uri, str(dest_dir / name)), export.files, names))
    record = export.lineage()
    record["files"] = [{"uri": uri, "file": name} for uri, name in zip(export.files, names, strict=True)]
    return record
