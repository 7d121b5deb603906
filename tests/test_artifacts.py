import datetime as dt
import json
import os
import re
import stat

import pytest

from flytetune import artifacts
from flytetune.storage import StorageError


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\x00weights" * 100)
    (d / "config.json").write_text("{}")
    (d / "sub" / "extra.txt").write_text("x")
    return d


def publish(model_dir, out, **kw):
    return artifacts.publish(model_dir, str(out), "m", metrics={"accuracy": 0.9, "macro_f1": 0.8, "split": "test",
                                                                  "n_examples": 10},
                             config={"a": 1}, data_meta={"dataset_sha256": "abc", "rows": {}}, **kw)


def test_publish_writes_run_folder_with_manifest(tmp_path, model_dir):
    run = publish(model_dir, tmp_path / "bucket", version="v1")
    assert run == f"{tmp_path}/bucket/m/v1"
    manifest = artifacts.verify(run)
    assert sorted(manifest["files"]) == ["config.json", "data_meta.json", "metrics.json", "model.safetensors",
                                         "sub/extra.txt"]
    assert manifest["dataset_sha256"] == "abc" and manifest["metrics"]["accuracy"] == 0.9
    assert manifest["config"] == {"a": 1}
    assert manifest["code_version"], "a checkout has a git SHA"


def test_files_from_another_task_are_published_with_the_model(tmp_path, model_dir):
    """A many-class evaluation's full tables come from the evaluate task, not the model folder."""
    details = tmp_path / "elsewhere.npz"
    details.write_bytes(b"tables")
    run = publish(model_dir, tmp_path / "bucket", version="v1", extra_files={"confusion_matrix.npz": details})
    assert artifacts.verify(run)["files"]["confusion_matrix.npz"]["bytes"] == 6
    with pytest.raises(StorageError, match=r"\.\./x\.npz"):
        publish(model_dir, tmp_path / "bucket", version="v2", extra_files={"../x.npz": details})


def test_verify_detects_changed_file(tmp_path, model_dir):
    run = publish(model_dir, tmp_path / "bucket", version="v1")
    (tmp_path / "bucket/m/v1/model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"model.safetensors: content does not match manifest.json"):
        artifacts.verify(run)


def test_incomplete_run_folder_is_not_valid(tmp_path, model_dir):
    run = publish(model_dir, tmp_path / "bucket", version="v1")
    (tmp_path / "bucket/m/v1/manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest.json; the run folder is incomplete"):
        artifacts.verify(run)


def test_never_overwrites_a_published_version(tmp_path, model_dir):
    publish(model_dir, tmp_path / "bucket", version="v1")
    with pytest.raises(FileExistsError, match="already published"):
        publish(model_dir, tmp_path / "bucket", version="v1")


@pytest.mark.parametrize("branch", [None, "Feature/Tokenizer"])
def test_versions_sort_by_time_and_differ(monkeypatch, branch):
    if branch is None:
        monkeypatch.delenv("FLYTETUNE_BRANCH", raising=False)
    else:
        monkeypatch.setenv("FLYTETUNE_BRANCH", branch)
    monkeypatch.setenv("FLYTETUNE_CODE_VERSION", "0123abcdef")
    start = dt.datetime(2026, 11, 24, 19, 5, 1, tzinfo=dt.timezone.utc)
    # Later times, out of order, including across a minute, an hour, a day, a month and a year.
    offsets = [dt.timedelta(days=40), dt.timedelta(seconds=1), dt.timedelta(days=400), dt.timedelta(minutes=1),
               dt.timedelta(0), dt.timedelta(hours=5), dt.timedelta(seconds=59)]
    times = [start + offset for offset in offsets for _ in range(3)]  # three runs in the same second each
    versions = [artifacts.new_version(now) for now in times]
    assert len(set(versions)) == len(versions), "runs in the same second still differ"
    by_version = sorted(range(len(times)), key=lambda i: versions[i])
    assert [times[i] for i in by_version] == sorted(times), "sorting versions sorts runs by time"
    suffix = "" if branch is None else "-feature-tokenizer-0123abc"
    assert all(re.fullmatch(rf"\d{{8}}T\d{{6}}Z-[0-9a-f]{{4}}{suffix}", v) for v in versions), versions
    assert artifacts.new_version().startswith(f"{dt.datetime.now(dt.timezone.utc):%Y%m%d}")


def test_manifest_is_written_last(tmp_path, model_dir):
    """If uploading the files fails part-way, no manifest exists: the folder never looks complete."""
    blocker = tmp_path / "bucket/m/v1/sub"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the upload needs a folder")
    with pytest.raises(StorageError, match=rf"sub/extra.txt: {blocker} exists and is not a folder"):
        publish(model_dir, tmp_path / "bucket", version="v1")
    assert not (tmp_path / "bucket/m/v1/manifest.json").exists()


def test_code_version_from_image_stamp(monkeypatch):
    monkeypatch.setenv("FLYTETUNE_CODE_VERSION", "abc123")
    assert artifacts.code_version() == "abc123"
    assert json.dumps(artifacts.code_version())


def test_branch_aware_versions(monkeypatch):
    from flytetune.naming import sanitise_branch

    assert sanitise_branch("Feature/ABC_12--x") == "feature-abc-12-x"
    assert sanitise_branch("dependabot/pip/" + "x" * 60) == "dependabot-pip-" + "x" * 25
    assert sanitise_branch("///") == "detached"
    monkeypatch.setenv("FLYTETUNE_BRANCH", "Feature/Tokenizer")
    monkeypatch.setenv("FLYTETUNE_CODE_VERSION", "0123abcdef")
    assert artifacts.new_version().endswith("-feature-tokenizer-0123abc")


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_files_are_readable_by_the_team(tmp_path, model_dir, mask, file_mode, dir_mode):
    """The run folder gets the process's umask modes (not tempfile's owner-only 0600/0700)."""
    saved = os.umask(mask)
    try:
        run = publish(model_dir, tmp_path / "bucket", version="v1")
    finally:
        os.umask(saved)
    paths = [tmp_path / "bucket" / "m", *(tmp_path / "bucket" / "m").rglob("*")]
    assert len(paths) == 9, paths  # m, v1, sub, 6 files (model files, metrics, data_meta, manifest)
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), f"{path}: {oct(mode)}"
    assert artifacts.verify(run)["version"] == "v1"
