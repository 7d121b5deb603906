import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from flytetune import checkpoint
from flytetune.checkpoint import CheckpointError, CheckpointWriter, TrainingProgress
from flytetune.storage.checksums import file_sha256


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
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load(uri)
    assert not (tmp_path / "pwned").exists()
