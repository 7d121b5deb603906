import json

import pytest

from flytetune import artifacts


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


def test_versions_sort_by_time_and_differ():
    a, b = artifacts.new_version(), artifacts.new_version()
    assert a != b and len(a) == len("20261124T190501Z-3fa2")


def test_manifest_is_written_last(tmp_path, model_dir):
    """If uploading the files fails part-way, no manifest exists: the folder never looks complete."""
    blocker = tmp_path / "bucket/m/v1/sub"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the upload needs a folder")
    with pytest.raises(Exception):  # noqa: B017 - whichever error the storage layer raises
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
