import datetime as dt
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flytetune import checkpoint
from flytetune.checkpoint import CheckpointError, CheckpointWriter, TrainingProgress
from flytetune.storage.checksums import file_sha256
from tests.conftest import REPO


def tiny_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def save(uri, step, keep=2, compat=None):
    model, optimizer, scheduler = tiny_training()
    progress = TrainingProgress(global_step=step, epoch=1, batch_in_epoch=4, sampler_seed=7)
    writer = CheckpointWriter(uri, keep=keep)
    try:
        return writer.save_now(checkpoint.capture(model, optimizer, scheduler, None, progress,
                                                  {"compat": compat or {"labels": ["a", "b", "c"]}})), model
    finally:
        writer.close()


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = tiny_training()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    progress = TrainingProgress(global_step=30, epoch=1, batch_in_epoch=4, sampler_seed=7)
    writer = CheckpointWriter(str(tmp_path / "run"))
    uri = writer.save_now(checkpoint.capture(model, optimizer, scheduler, None, progress, {}))
    writer.close()
    expected = draws()
    assert uri.endswith("/run/step-000030")

    restored = checkpoint.load(uri)
    assert restored.progress == progress
    assert all(torch.equal(restored.model[k], v) for k, v in model.state_dict().items())
    fresh, opt, sched = tiny_training()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert checkpoint.restore_into(restored, fresh, opt, sched) == progress
    assert draws() == expected, "python, numpy and torch continue exactly where they were"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert sched.last_epoch == 3
    assert all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], optimizer.state_dict()["state"][i]["exp_avg"])
               for i in optimizer.state_dict()["state"])


def test_manifest_lists_checksums_and_is_last(tmp_path):
    uri, _ = save(str(tmp_path / "run"), 5)
    manifest = json.loads((tmp_path / "run/step-000005/manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"]
    newest_file = max((tmp_path / "run/step-000005").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert newest_file.name == "manifest.json"


def test_incomplete_checkpoint_is_ignored(tmp_path):
    save(str(tmp_path / "run"), 5)
    save(str(tmp_path / "run"), 10)
    os.remove(tmp_path / "run/step-000010/manifest.json")  # as if killed before the manifest landed
    assert checkpoint.latest(str(tmp_path / "run")).endswith("step-000005")
    with pytest.raises(CheckpointError, match="step-000010: not a complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "run/step-000010"), None)


def test_corrupt_file_is_detected(tmp_path):
    uri, _ = save(str(tmp_path / "run"), 5)
    path = tmp_path / "run/step-000005/model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: checksum does not match"):
        checkpoint.load(uri)


def test_keeps_newest_k(tmp_path):
    for step in (5, 10, 15, 20):
        save(str(tmp_path / "run"), step, keep=2)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-000015", "step-000020"]


def test_resolve_latest_run_prefix_and_errors(tmp_path):
    save(str(tmp_path / "ckpt/run-a"), 40)
    newest, _ = save(str(tmp_path / "ckpt/run-b"), 10)
    assert checkpoint.resolve("latest", str(tmp_path / "ckpt")) == newest, "latest = most recently written"
    assert checkpoint.resolve(str(tmp_path / "ckpt/run-a"), None).endswith("run-a/step-000040")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.resolve(str(tmp_path / "nothing-here"), None)
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        checkpoint.resolve("latest", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match="no checkpoint.uri is configured"):
        checkpoint.resolve("latest", None)


def test_incompatible_checkpoint_names_fields(tmp_path):
    uri, _ = save(str(tmp_path / "run"), 5, compat={"labels": ["a", "b"], "model.backbone": "x"})
    restored = checkpoint.load(uri)
    with pytest.raises(CheckpointError, match=r"labels: checkpoint has \['a', 'b'\], this run has \['a', 'c'\]"):
        checkpoint.check_compatible(restored, {"labels": ["a", "c"], "model.backbone": "x"})
    checkpoint.check_compatible(restored, {"labels": ["a", "b"], "model.backbone": "x"})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, _ = save(str(tmp_path / "run"), 5)
    folder = tmp_path / "run/step-000005"
    (folder / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": _Exploit()}, protocol=2))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = {"sha256": file_sha256(folder / "optimizer.pt"),
                                         "bytes": (folder / "optimizer.pt").stat().st_size}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"optimizer.pt: cannot be loaded \(UnpicklingError: "):
        checkpoint.load(uri)
    assert not (tmp_path / "pwned").exists()


# A checkpoint comes from a bucket others can write: whatever its manifest says, loading it writes
# nothing outside its private staging folder and fails in one line naming the checkpoint.

def files_under(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def list_file(folder, name, content=None):
    """Add `name` to the manifest of `folder` with the SHA-256 and size of `content` (written where
    `folder/name` resolves to, so the checksum a naive loader computes would match)."""
    target = Path(os.path.normpath(f"{folder}/{name}"))
    if content is not None and name:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = ({"sha256": file_sha256(target), "bytes": target.stat().st_size} if name
                               else {"sha256": "0" * 64, "bytes": 1})
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temp directory staging folders go to, inside this test's folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.mark.parametrize("name", ["../evil.txt", "../../evil.txt", "sub/../../evil.txt", "./evil.txt",
                                  "ABSOLUTE", "..\\evil.txt", ""])
def test_manifest_file_names_cannot_leave_the_restore_folder(tmp_path, private_tmp, name):
    uri, _ = save(str(tmp_path / "run"), 5)
    folder = tmp_path / "run/step-000005"
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside" / "evil.txt")
        (folder / name.lstrip("/")).parent.mkdir(parents=True)
        (folder / name.lstrip("/")).write_bytes(b"owned")
        list_file(folder, name.lstrip("/"))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][name] = manifest["files"].pop(name.lstrip("/"))
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        list_file(folder, name, b"owned")
    before = files_under(tmp_path)
    with pytest.raises(CheckpointError, match=r"step-000005/manifest.json: unsafe file name "):
        checkpoint.load(uri)
    assert files_under(tmp_path) == before, "nothing written anywhere, inside or outside the restore folder"
    assert not list(private_tmp.iterdir()), "the staging folder is removed on failure"


def test_symlinked_checkpoint_file_is_not_followed(tmp_path, private_tmp):
    uri, _ = save(str(tmp_path / "run"), 5)
    folder = tmp_path / "run/step-000005"
    # The link points at a file with exactly the listed content, so only the link itself is wrong.
    os.replace(folder / "optimizer.pt", tmp_path / "elsewhere.pt")
    os.symlink(tmp_path / "elsewhere.pt", folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"step-000005/optimizer.pt: cannot be opened without following links"):
        checkpoint.load(uri)


def test_file_larger_than_its_manifest_says_is_refused(tmp_path, private_tmp):
    uri, _ = save(str(tmp_path / "run"), 5)
    with open(tmp_path / "run/step-000005/model.safetensors", "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(CheckpointError, match=r"model.safetensors: larger than the \d+ bytes manifest.json says"):
        checkpoint.load(uri)


def test_declared_size_over_the_bound_is_refused(tmp_path, private_tmp):
    uri, _ = save(str(tmp_path / "run"), 5)
    manifest_path = tmp_path / "run/step-000005/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["model.safetensors"]["bytes"] = 21 << 30
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"files\['model.safetensors'\] declares 22548578304 bytes, outside"):
        checkpoint.load(uri)


GOOD_FILE = {"sha256": "0" * 64, "bytes": 1}


@pytest.mark.parametrize(("content", "problem"), [
    (b"{not json", r"not valid JSON \(JSONDecodeError: "),
    (b"", r"not valid JSON \(JSONDecodeError: "),
    (b"\xff\xfe\x00garbage", r"not valid JSON \("),
    (b"[" * 100_000, r"not valid JSON \(RecursionError: "),
    (b"TRUNCATED", r"not valid JSON \(JSONDecodeError: "),
    (b"[]", r"not a JSON object"),
    (b"{}", r"format None is not 1"),
    (json.dumps({"format": 1, "step": "5"}).encode(), r"'step' must be a non-negative integer, not '5'"),
    (json.dumps({"format": 1, "step": 6}).encode(), r"says step 6, but the folder is step-000005"),
    (json.dumps({"format": 1, "step": 5, "created_at": "yesterday"}).encode(), r"'created_at' must be an ISO"),
    (json.dumps({"format": 1, "step": 5, "created_at": "2024-01-01T00:00:00+00:00", "files": []}).encode(),
     r"'files' must be a non-empty object"),
    (json.dumps({"format": 1, "step": 5, "created_at": "2024-01-01T00:00:00+00:00",
                 "files": {"model.safetensors": {"sha256": 1, "bytes": "9"}}}).encode(),
     r"files\['model.safetensors'\] must be"),
    (json.dumps({"format": 1, "step": 5, "created_at": "2024-01-01T00:00:00+00:00",
                 "files": {"model.safetensors": GOOD_FILE}}).encode(), r"lists no optimizer.pt, rng.pt"),
])
def test_malformed_manifest_is_one_line_naming_it(tmp_path, private_tmp, content, problem):
    uri, _ = save(str(tmp_path / "run"), 5)
    manifest_path = tmp_path / "run/step-000005/manifest.json"
    if content == b"TRUNCATED":
        content = manifest_path.read_bytes()[:40]
    manifest_path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/run/step-000005/manifest.json: {problem}") as failure:
        checkpoint.load(uri)
    assert "\n" not in str(failure.value)
    with pytest.raises(CheckpointError, match=problem):
        checkpoint.resolve(uri, None), "an explicitly named step folder fails the same way, before any work"


def test_garbled_manifest_is_skipped_when_searching(tmp_path, caplog):
    base = tmp_path / "ckpt"
    save(str(base / "run-a"), 5)
    save(str(base / "run-a"), 10)
    newest_b, _ = save(str(base / "run-b"), 7)
    save(str(base / "run-b"), 9)
    (base / "run-a/step-000010/manifest.json").write_bytes(b'{"format": 1, "st')
    (base / "run-b/step-000009/manifest.json").write_bytes(b"{}")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.complete_checkpoints(str(base / "run-a")) == {5: f"{base}/run-a/step-000005"}
        assert checkpoint.latest(str(base / "run-a")).endswith("run-a/step-000005")
        assert checkpoint.resolve("latest", str(base)) == newest_b
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"skipping checkpoint {base}/run-a/step-000010: " in w and "not valid JSON" in w for w in warnings)
    assert any(f"skipping checkpoint {base}/run-b/step-000009: " in w for w in warnings)


def set_created_at(folder, when):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["created_at"] = when.isoformat()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_latest_is_the_newest_checkpoint_of_the_most_recently_active_run(tmp_path, caplog, monkeypatch):
    base = tmp_path / "ckpt"
    now = dt.datetime.now(dt.timezone.utc)
    save(str(base / "run-a"), 40, keep=5)
    save(str(base / "run-b"), 20, keep=5)
    save(str(base / "run-b"), 10, keep=5)
    set_created_at(base / "run-a/step-000040", now - dt.timedelta(hours=2))
    set_created_at(base / "run-b/step-000020", now - dt.timedelta(minutes=5))
    # Run b's step 10 was written last (e.g. by a hand-started continuation), but its step 20 is further on.
    set_created_at(base / "run-b/step-000010", now - dt.timedelta(minutes=1))
    with caplog.at_level(logging.INFO):
        assert checkpoint.resolve("latest", str(base)) == f"{base}/run-b/step-000020"
    assert any("--from_checkpoint latest: run run-b " in r.getMessage() and "step 20, out of 2 run(s)" in r.getMessage()
               for r in caplog.records)
    # A run id names a run prefix under checkpoint.uri, wherever the command runs from.
    monkeypatch.chdir(tmp_path)
    assert checkpoint.resolve("run-a", str(base)) == f"{base}/run-a/step-000040"
    with pytest.raises(CheckpointError, match=rf"run-c: no complete checkpoint .* nor under {base}/run-c"):
        checkpoint.resolve("run-c", str(base))


def test_stale_staging_of_a_killed_process_is_removed(tmp_path, private_tmp):
    code = ("import sys, time; from flytetune import checkpoint; w = checkpoint.CheckpointWriter(sys.argv[1]); "
            "print(w._staging, flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, env={**os.environ, "TMPDIR": str(private_tmp)})
    try:
        staging = Path(proc.stdout.readline().strip())
        assert staging.is_dir() and staging.parent == private_tmp
        (staging / "step-000010").mkdir()  # as if killed mid-save
        (staging / "step-000010/model.safetensors").write_bytes(b"x" * 1000)
    finally:
        proc.kill()
        proc.wait()
    alive = private_tmp / f"flytetune-restore-{os.getppid()}-abcd"  # a live process's staging stays
    alive.mkdir()
    uri, _ = save(str(tmp_path / "run"), 5)
    checkpoint.load(uri)
    assert not staging.exists(), "the next process removes what the killed one left behind"
    # (torch may add a cache folder of its own there.)
    ours = sorted(p for p in private_tmp.iterdir() if p.name.startswith("flytetune-"))
    assert ours == [alive], "and its own staging folders are gone after use"
