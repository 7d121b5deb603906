"""Scratch folders of killed processes (work, transfers, publish, checkpoint staging) are removed by the next one."""

import os
import subprocess
import sys
from pathlib import Path

from flytetune import scratch
from tests.conftest import REPO


def test_a_killed_runs_work_folder_is_removed_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    code = ("import time; from flytetune import scratch; p = scratch.make('work'); (p / 'model.safetensors')"
            ".write_bytes(b'x' * 1000); print(p, flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        left = Path(proc.stdout.readline().strip())
        assert left.parent == tmp_path and left.name.startswith(f"flytetune-work-{proc.pid}-")
    finally:
        proc.kill()
        proc.wait()
    live = tmp_path / f"flytetune-xfer-{os.getppid()}-abcd"  # a live process's folder stays
    live.mkdir()
    other = tmp_path / "flytetune-notes"  # not a scratch folder
    other.mkdir()
    with scratch.folder("publish") as mine:
        assert not left.exists()
        assert sorted(tmp_path.iterdir()) == sorted([live, other, mine])
    assert not mine.exists()
