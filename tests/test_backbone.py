"""Backbones from object storage (flytetune/backbone_cache.py) on the loopback S3 and GCS servers.

The tiny 2-layer BERT is uploaded with `python -m flytetune.backbone publish`'s code, fetched into a
cache of the test's own ($FLYTETUNE_BACKBONE_CACHE), and loaded by transformers offline.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flytetune import artifacts, backbone_cache, storage
from flytetune.backbone import check_backbone, main, resolve_backbone, tokenizer_fingerprint
from flytetune.config import ConfigError, load_config
from tests.conftest import REPO, SAMPLE, TINY_CONFIG


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(backbone_cache.ENV, str(root))
    return root


def publish(folder: Path, uri: str, capsys) -> str:
    assert main(["publish", str(folder), uri]) == 0
    count = len([p for p in folder.rglob("*") if p.is_file() and p.name != artifacts.MANIFEST])
    assert capsys.readouterr().out.startswith(f"published {count} files to {uri}")
    return uri


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def resolve_in_new_process(uri: str) -> subprocess.CompletedProcess:
    """A second process in the same pod: only the cache on disk is shared."""
    code = "import sys; from flytetune.backbone import resolve_backbone; print(resolve_backbone(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, uri], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_s3_backbone_is_fetched_verified_and_loads_offline(s3_bucket, tiny_backbone, capsys, cache):
    from transformers import AutoModel, AutoTokenizer

    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    assert manifest["kind"] == "backbone" and set(manifest["files"]) == set(files_of(tiny_backbone))

    check_backbone(uri)
    folder = resolve_backbone(uri)
    assert folder.parent == cache and files_of(folder) == {**files_of(tiny_backbone),
                                                           "manifest.json": storage.read_bytes(f"{uri}/manifest.json")}
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    original = AutoModel.from_pretrained(tiny_backbone, local_files_only=True)
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert AutoTokenizer.from_pretrained(folder, local_files_only=True)("a coffee")["input_ids"]
    # prepare's cache key: from the manifest alone, equal to the local folder's and to the fetched copy's.
    assert tokenizer_fingerprint(uri) == tokenizer_fingerprint(str(tiny_backbone)) == tokenizer_fingerprint(str(folder))


@pytest.mark.parametrize("scheme", ["gs", "file"])
def test_gs_and_file_backbones(request, scheme, tiny_backbone, tmp_path, capsys):
    uri = (f"gs://{request.getfixturevalue('gcs_bucket')}/backbones/tiny" if scheme == "gs"
           else f"file://{tmp_path}/published/tiny")
    publish(tiny_backbone, uri, capsys)
    folder = resolve_backbone(uri)
    assert {k: v for k, v in files_of(folder).items() if k != "manifest.json"} == files_of(tiny_backbone)
    assert tokenizer_fingerprint(uri) == tokenizer_fingerprint(str(tiny_backbone))


def test_fine_tuning_names_an_s3_backbone_and_its_published_run_is_a_backbone(s3_bucket, tiny_backbone, tmp_path,
                                                                                capsys):
    from transformers import AutoModelForSequenceClassification

    from flytetune.pipeline import run

    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    cfg = load_config(TINY_CONFIG, [f"model.backbone={uri}", "train.max_steps=2", "checkpoint.uri=null"])
    result = run(cfg, dataset_uri=str(SAMPLE), output_uri=f"s3://{s3_bucket}/models", work_dir=tmp_path / "work")
    assert result.run_uri.startswith(f"s3://{s3_bucket}/models/")
    assert json.loads((tmp_path / "work/prepared/meta.json").read_text())["tokenizer"] == uri

    # The published run folder, as it is, is a backbone: fetched, verified, loaded.
    folder = resolve_backbone(result.run_uri)
    labels = json.loads((folder / "label_map.json").read_text())["labels"]
    model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
    assert model.config.num_labels == len(labels)
    assert tokenizer_fingerprint(result.run_uri) == tokenizer_fingerprint(str(folder))


def test_a_published_classifier_as_backbone_gets_a_fresh_head(s3_bucket, tiny_backbone, tmp_path, capsys):
    """A fine-tuned run as backbone: its encoder is kept, its head (another task's) replaced, whether or
    not the label count matches."""
    from transformers import AutoModelForSequenceClassification

    from flytetune.objectives import build_classifier

    run_dir = tmp_path / "run"
    published = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=3, local_files_only=True)
    torch.nn.init.constant_(published.classifier.weight, 0.5)
    published.save_pretrained(run_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tiny_backbone / name).exists():
            (run_dir / name).write_bytes((tiny_backbone / name).read_bytes())
    uri = publish(run_dir, f"s3://{s3_bucket}/models/m/v1", capsys)
    cfg = load_config(TINY_CONFIG, [f"model.backbone={uri}"])
    for labels in (["a", "b", "c"], ["a", "b", "c", "d", "e"]):
        model = build_classifier(cfg, labels)
        assert model.classifier.out_features == len(labels)
        assert not torch.any(model.classifier.weight == 0.5), "the published head was kept"
        torch.testing.assert_close(model.bert.encoder.state_dict(), published.bert.encoder.state_dict())


def test_a_tampered_backbone_is_refused_in_one_line_naming_the_file(s3_bucket, tiny_backbone, capsys, cache):
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    vocab = storage.read_bytes(f"{uri}/tokenizer.json")
    storage.write_bytes(f"{uri}/tokenizer.json", vocab.replace(b"\"coffee\"", b"\"coffea\""))
    with pytest.raises(ConfigError) as raised:
        resolve_backbone(uri)
    message = str(raised.value)
    assert message.startswith(f"model.backbone: {uri}/tokenizer.json: content ") and "\n" not in message
    assert f"does not match {uri}/manifest.json" in message
    assert list(cache.iterdir()) == [], "a copy or a scratch folder was left behind"
    # The pre-flight check sees it too: the tokenizer files are small, hashed from storage every time.
    with pytest.raises(ConfigError, match=rf"^model.backbone: {uri}/tokenizer.json: content .* does not match "
                                          rf"{uri}/manifest.json"):
        check_backbone(uri)
    assert list(cache.iterdir()) == [], "a copy or a scratch folder was left behind"
    storage.write_bytes(f"{uri}/tokenizer.json", vocab)

    config = storage.read_bytes(f"{uri}/config.json")
    storage.write_bytes(f"{uri}/config.json", config.replace(b'"hidden_size": 128', b'"hidden_size": 256'))
    with pytest.raises(ConfigError, match=rf"^model.backbone: {uri}/config.json: content .* does not match "
                                          rf"{uri}/manifest.json"):
        check_backbone(uri)


def new_pod(monkeypatch, root: Path) -> Path:
    """A task's pod on a cluster: a backbone cache of its own, empty, and nothing fetched by this process."""
    monkeypatch.setenv(backbone_cache.ENV, str(root))
    monkeypatch.setattr(backbone_cache, "_fetched", {})
    return root


def run_resolve(uri: str, tmp_path: Path):
    """The workflow's first task, `resolve`, as a run calls it: uncached, on a small CPU pod."""
    from flytetune.exports import NO_CUTOFF
    from tasks.steps import resolve

    return resolve(config=load_config(TINY_CONFIG), overrides=f"model.backbone={uri}", preset="cpu",
                   output_uri=str(tmp_path / "out"), from_checkpoint=None, dataset_uri=str(SAMPLE), test_uri=None,
                   kickoff_time=NO_CUTOFF, retrain_anyway=True, prepared_uri="", init_from=None,
                   prepare_size="standard", objective="classification")


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


@pytest.mark.parametrize("name, edit, problem", [
    ("tokenizer.json", lambda b: b.replace(b'"coffee"', b'"coffea"'), "content"),  # same size
    ("model.safetensors", flip_last_byte, "content"),  # same size: only its sha256 tells
    ("model.safetensors", lambda b: b[:-1024], "size"),
    ("tokenizer_config.json", None, "missing"),
])
def test_a_backbone_tampered_after_a_first_run_is_refused_before_the_gpu(s3_bucket, tiny_backbone, tmp_path, capsys,
                                                                        monkeypatch, name, edit, problem):
    """A re-run of unchanged data hits prepare's cache (keyed by the manifest's hashes, which a file
    edited in the bucket does not change), so training would be the first to fetch the backbone:
    the uncached `resolve` step must refuse it first, in one line naming the file and the manifest."""
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    new_pod(monkeypatch, tmp_path / "resolve-1")
    first = run_resolve(uri, tmp_path)
    new_pod(monkeypatch, tmp_path / "prepare-1")
    resolve_backbone(uri)  # the first run's prepare fetches it, verified

    target = f"{uri}/{name}"
    if edit is None:
        storage.remove(target)
    else:
        storage.write_bytes(target, edit(storage.read_bytes(target)))
    # Prepare's cache key is what it was: a re-run would not run prepare again.
    assert tokenizer_fingerprint(uri) == first.prepare_settings.tokenizer_sha256

    cache = new_pod(monkeypatch, tmp_path / "resolve-2")
    with pytest.raises(ConfigError) as raised:
        run_resolve(uri, tmp_path)
    # flytekit puts the task's name in front of the error, on a line of its own.
    message = str(raised.value).removeprefix("Error encountered while executing 'tasks.steps.resolve':\n  ")
    assert message.startswith(f"model.backbone: {target}: {problem} ") and "\n" not in message, message
    assert f"{uri}/manifest.json (" in message and message.endswith("the folder was changed after it was published")
    assert list(cache.glob("*")) == [], "a copy or a scratch folder was left behind"


def test_a_large_backbone_is_read_through_sha256_before_the_gpu_not_fetched(s3_bucket, tiny_backbone, capsys,
                                                                          monkeypatch, cache):
    """Above the pre-flight budget `resolve` does not copy the weights to its disk: it streams them
    through SHA-256, so a same-size rewrite is refused there too, before a GPU is asked for."""
    monkeypatch.setattr(backbone_cache, "PREFLIGHT_FETCH_BYTES", 1024)
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    check_backbone(uri)
    assert list(cache.glob("*")) == [], "the weights were fetched by the pre-flight check"

    weights = f"{uri}/model.safetensors"
    original = storage.read_bytes(weights)
    storage.write_bytes(weights, flip_last_byte(original))
    with pytest.raises(ConfigError, match=rf"^model.backbone: {weights}: content \({len(original)} bytes, sha256 "
                                          rf"\w+\) does not match {uri}/manifest.json"):
        check_backbone(uri)
    assert list(cache.glob("*")) == []
    storage.write_bytes(weights, original + b"\0")
    with pytest.raises(ConfigError, match=rf"^model.backbone: {weights}: size \({len(original) + 1} bytes\) does "
                                          rf"not match {uri}/manifest.json \({len(original)} bytes"):
        check_backbone(uri)


def test_a_folder_without_manifest_is_refused_with_how_to_make_one(s3_bucket, tiny_backbone, tmp_path, capsys):
    from flytetune.pipeline import main as train_main

    uri = f"s3://{s3_bucket}/backbones/bare"
    storage.sync(str(tiny_backbone), uri)
    hint = rf"python -m flytetune.backbone publish LOCAL_FOLDER {uri}$"
    with pytest.raises(ConfigError, match=rf"^model.backbone: {uri}: no manifest.json .*; upload .*{hint}"):
        resolve_backbone(uri)
    with pytest.raises(ConfigError, match=rf"^model.backbone: {uri}: no manifest.json .*{hint}"):
        check_backbone(uri)
    with pytest.raises(ConfigError, match=rf"^model.backbone: {uri}: no manifest.json .*{hint}"):
        tokenizer_fingerprint(uri)
    # `python -m flytetune.train` stops before any data moves, with the same one line.
    assert train_main(["--config", str(TINY_CONFIG), "--set", f"model.backbone={uri}",
                       "--output_uri", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.backbone: {uri}: no manifest.json") and err.count("\n") == 1


def test_a_manifest_without_config_json_or_with_unsafe_names_is_refused(s3_bucket, tiny_backbone, capsys):
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    entry = manifest["files"].pop("config.json")
    storage.write_bytes(f"{uri}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match=rf"^model.backbone: {uri}: manifest.json lists no config.json"):
        check_backbone(uri)
    manifest["files"].update({"config.json": entry, "../../.bashrc": entry})
    storage.write_bytes(f"{uri}/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ConfigError, match=r"unsafe object key '../../.bashrc'"):
        resolve_backbone(uri)
    with pytest.raises(ConfigError, match=r"^model.backbone: s3://b/x/../y: '.' or '..' in the path"):
        check_backbone("s3://b/x/../y")


def test_a_killed_fetch_is_not_reused(s3_bucket, tiny_backbone, capsys, cache):
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    folder = resolve_in_new_process(uri)
    assert folder.returncode == 0, folder.stderr
    folder = Path(folder.stdout.strip())
    # What a fetch killed before its marker leaves: every file at its size, one not yet right, no manifest.
    (folder / "manifest.json").unlink()
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(weights.stat().st_size))
    # And a scratch folder of a process that is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f"flytetune-fetch-{dead.stdout.strip()}-x1"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    again = resolve_in_new_process(uri)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == folder and not stale.exists()
    assert weights.read_bytes() == (tiny_backbone / "model.safetensors").read_bytes()
    assert (folder / "manifest.json").read_bytes() == storage.read_bytes(f"{uri}/manifest.json")


def test_the_cache_is_reused_by_this_and_other_processes(s3_bucket, tiny_backbone, capsys):
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    folder = resolve_backbone(uri)
    # The files are gone from the bucket: another process can only succeed from the cache.
    for name in json.loads(storage.read_bytes(f"{uri}/manifest.json"))["files"]:
        storage.remove(f"{uri}/{name}")
    other = resolve_in_new_process(uri)
    assert other.returncode == 0, other.stderr
    assert Path(other.stdout.strip()) == folder
    # Nothing left at all: this process does not even read the manifest again.
    storage.remove(uri)
    assert not storage.exists(uri)
    assert resolve_backbone(uri) == folder


def test_the_default_cache_is_in_the_temp_directory(monkeypatch, tmp_path):
    """In a pod the home is read-only and TMPDIR (or /tmp) is writable, as for scratch folders."""
    monkeypatch.delenv(backbone_cache.ENV)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    assert backbone_cache.cache_root() == tmp_path / f"flytetune-backbone-cache-{os.getuid()}"
    if os.getuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        monkeypatch.setenv(backbone_cache.ENV, str(tmp_path / "ro" / "cache"))
        with pytest.raises(ConfigError, match=rf"^model.backbone: cannot create the backbone cache {tmp_path}/ro/cache "
                                              rf"\(Permission denied\); set {backbone_cache.ENV} to a writable folder"):
            backbone_cache.cache_root()


def test_a_model_needing_custom_code_is_refused_and_its_package_never_imported(tmp_path, monkeypatch):
    package = tmp_path / "sidefx_custom"
    (package / "model").mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (package / "model" / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Model"}}))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("sidefx_custom", str(package / "model")):
        with pytest.raises(ConfigError, match=r"^model.backbone: .*/config.json: needs custom model code \(auto_map\)"):
            resolve_backbone(name)
    for name in ("sidefx_custom.model", "../sidefx_custom"):
        with pytest.raises(ConfigError, match=rf"^model.backbone: '{name}' is neither a local model folder nor"):
            resolve_backbone(name)
    assert not marker.exists() and "sidefx_custom" not in sys.modules, "the package was imported"


def test_publish_refuses_an_existing_version_and_a_non_model_folder(s3_bucket, tiny_backbone, tmp_path, capsys):
    uri = publish(tiny_backbone, f"s3://{s3_bucket}/backbones/tiny-bert", capsys)
    assert main(["publish", str(tiny_backbone), uri]) == 2
    assert capsys.readouterr().err == f"error: {uri}: already published (manifest.json exists)\n"
    assert main(["publish", str(tmp_path), f"{uri}-2"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no config.json; not a model folder\n"
    # A fetched copy carries its manifest; published again, it gets a new one listing the same files.
    again = publish(resolve_backbone(uri), f"{uri}-copy", capsys)
    first, second = (json.loads(storage.read_bytes(f"{u}/manifest.json"))["files"] for u in (uri, again))
    assert first == second and artifacts.MANIFEST not in second
