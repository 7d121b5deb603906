"""Local scratch folders that a killed process does not leave behind for good.

Each is named `flytetune-<kind>-<pid>-XXXX` in the temp directory; making one first removes those
whose owner process is gone (SIGKILL, OOM kill, a node shutdown), so checkpoints being staged,
transfers and work folders of a killed run are cleaned up by the next run on the machine.
"""

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_OWNED = re.compile(r"flytetune-([a-z]+)-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(tmp_dir: str | None = None) -> list[Path]:
    """Remove this user's scratch folders whose owner process is gone; return them."""
    removed = []
    root = Path(tmp_dir or tempfile.gettempdir())
    for path in root.iterdir() if root.is_dir() else []:
        match = _OWNED.match(path.name)
        if not match or int(match.group(2)) == os.getpid() or _alive(int(match.group(2))):
            continue
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left behind by process %s", path, match.group(2))
            removed.append(path)
    return removed


def make(kind: str, root: Path | None = None) -> Path:
    """A new scratch folder owned by this process (`kind`: letters only) in the temp directory, or in
    `root` (a folder to rename the result into must be on the same file system); stale ones go first."""
    remove_stale(str(root) if root else None)
    return Path(tempfile.mkdtemp(prefix=f"flytetune-{kind}-{os.getpid()}-", dir=root))


@contextlib.contextmanager
def folder(kind: str) -> Iterator[Path]:
    """`make`, removed on exit, exception or not."""
    path = make(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
