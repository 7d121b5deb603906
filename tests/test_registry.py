"""The model registry on real storage: local disk and moto's S3 server on loopback.

moto checks S3's If-Match / If-None-Match (412), but in its request handler, before and apart from
the write: two truly simultaneous conditional PUTs could both pass there. Races on S3 are therefore
driven deterministically (a competing promotion lands between our read and our write); free-running
concurrent races run on local disk, whose compare-and-swap is a real lock. gcp-storage-emulator
ignores `ifGenerationMatch` altogether, so GCS is only checked for the unconditional path.
"""

import json
import subprocess
import sys
import threading

import pytest

from flytetune import artifacts, registry, storage

NAME = "m"


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\x00weights" * 100)
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/models"
    return str(tmp_path / "models")


def publish(model_dir, out, version, accuracy=0.9):
    return artifacts.publish(model_dir, out, NAME, version=version, config={"a": 1}, data_meta={"rows": {}},
                             metrics={"accuracy": accuracy, "macro_f1": 0.8, "split": "test", "n_examples": 10})


def assert_consistent(out):
    """The pointer is the `to` of the newest event, and the log is one unbroken chain 1..n."""
    events = registry.history(out, NAME)
    pointer = registry.production(out, NAME)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for before, after in zip([None, *events[:-1]], events, strict=True):
        assert after["from"] == (before["to"] if before else None)
    assert pointer["version"] == events[-1]["to"] and pointer["seq"] == events[-1]["seq"]
    logged = storage.ls(artifacts.join(out, NAME, registry.PROMOTIONS))
    assert len(logged) == len(events), "every event is its own object in the log"
    return events


def test_promote_promote_rollback(out, model_dir):
    publish(model_dir, out, "v1", accuracy=0.91)
    publish(model_dir, out, "v2", accuracy=0.95)
    assert registry.production(out, NAME) is None

    first = registry.promote(out, NAME, "v1", "first model", by="alice@laptop")
    assert first["version"] == "v1" and first["run_uri"] == artifacts.join(out, NAME, "v1")
    assert first["metrics"]["accuracy"] == 0.91 and first["by"] == "alice@laptop" and first["reason"] == "first model"
    registry.promote(out, NAME, "v2", "better macro-F1")
    assert registry.production(out, NAME)["version"] == "v2"
    assert [(v["version"], v["production"], v["complete"]) for v in registry.list_versions(out, NAME)] == [
        ("v1", False, True), ("v2", True, True)]

    back = registry.rollback(out, NAME, "v2 misroutes refunds", by="bob@ops")
    assert back["version"] == "v1" and registry.production(out, NAME)["version"] == "v1"
    events = assert_consistent(out)
    assert [(e["event"], e["from"], e["to"], e["why"]) for e in events] == [
        ("promote", None, "v1", "first model"), ("promote", "v1", "v2", "better macro-F1"),
        ("rollback", "v2", "v1", "v2 misroutes refunds")]
    assert events[2]["by"] == "bob@ops"
    assert registry.show(out, NAME)["version"] == "v1"
    assert registry.show(out, NAME, "v2")["manifest"]["metrics"]["accuracy"] == 0.95

    # A second rollback goes further back, not forward again: v1 was the first production version.
    with pytest.raises(registry.RegistryError, match="no earlier version to roll back to"):
        registry.rollback(out, NAME, "again")


def test_who_is_the_flyte_execution_when_run_by_flyte(tmp_path, model_dir, monkeypatch):
    out = str(tmp_path / "models")
    publish(model_dir, out, "v1")
    monkeypatch.setenv("FLYTE_INTERNAL_EXECUTION_ID", "f1a2b3c4")
    assert registry.promote(out, NAME, "v1", "auto")["by"] == "f1a2b3c4"
    monkeypatch.delenv("FLYTE_INTERNAL_EXECUTION_ID")
    assert "@" in registry.current_actor()


def test_incomplete_or_tampered_or_unknown_versions_are_refused(out, model_dir):
    publish(model_dir, out, "v1")
    publish(model_dir, out, "v2")
    storage.remove(artifacts.join(out, NAME, "v2", artifacts.MANIFEST))  # a publish that died before its manifest
    with pytest.raises(registry.RegistryError, match=r"v2: incomplete \(no manifest.json\)"):
        registry.promote(out, NAME, "v2", "x")
    with pytest.raises(registry.RegistryError, match=r"no version 'v9' \(latest: v1, v2\)"):
        registry.promote(out, NAME, "v9", "x")
    storage.write_bytes(artifacts.join(out, NAME, "v1", "model.safetensors"), b"tampered")
    with pytest.raises(registry.RegistryError, match="model.safetensors: content does not match manifest.json"):
        registry.promote(out, NAME, "v1", "x")
    assert registry.production(out, NAME) is None and registry.history(out, NAME) == []
    assert [v["complete"] for v in registry.list_versions(out, NAME)] == [True, False]


def test_a_promotion_that_loses_the_race_retries_on_top_of_the_winner(out, model_dir, monkeypatch):
    """Deterministic race: between our read of the pointer and our write, another run promotes."""
    for v in ("v1", "v2", "v3"):
        publish(model_dir, out, v)
    registry.promote(out, NAME, "v1", "base")
    real_read = storage.read_with_token
    interfered = []

    def read_then_lose(uri):
        found = real_read(uri)
        if uri.endswith(registry.POINTER) and not interfered:
            interfered.append(True)
            registry.promote(out, NAME, "v3", "the other run")  # lands after our read, before our write
        return found

    monkeypatch.setattr(storage, "read_with_token", read_then_lose)
    pointer = registry.promote(out, NAME, "v2", "ours")
    monkeypatch.undo()
    assert pointer["version"] == "v2" and pointer["event"]["from"] == "v3"
    events = assert_consistent(out)
    assert [e["to"] for e in events] == ["v1", "v3", "v2"]


def test_conditional_write_semantics(out):
    uri = artifacts.join(out, "cas", "p.json")
    assert storage.read_with_token(uri) is None
    t1 = storage.write_bytes_if(uri, b"one", None)
    with pytest.raises(storage.PreconditionFailed, match="p.json"):
        storage.write_bytes_if(uri, b"two", None)  # must not exist
    data, token = storage.read_with_token(uri)
    assert data == b"one" and token == t1
    t2 = storage.write_bytes_if(uri, b"two", t1)
    with pytest.raises(storage.PreconditionFailed, match="p.json"):
        storage.write_bytes_if(uri, b"three", t1)  # stale token
    assert storage.read_with_token(uri) == (b"two", t2)
    assert storage.ls(artifacts.join(out, "cas")) == [uri], "no lock or temporary files are listed"


def test_gcs_round_trip_without_preconditions_enforced(gcs_bucket):
    """The emulator ignores ifGenerationMatch, so only the tokens and the happy path are checked here."""
    uri = f"gs://{gcs_bucket}/cas/p.json"
    assert storage.read_with_token(uri) is None
    token = storage.write_bytes_if(uri, b"one", None)
    assert storage.read_with_token(uri) == (b"one", token) and int(token) > 0
    token2 = storage.write_bytes_if(uri, b"two", token)
    assert storage.read_with_token(uri) == (b"two", token2) and token2 != token


def test_racing_promotions_all_land_and_the_pointer_is_never_half_written(tmp_path, model_dir, monkeypatch):
    """Eight promotions at once on local disk, with a slow read widening every race window, while
    readers parse the pointer in a loop."""
    out = str(tmp_path / "models")
    versions = [f"v{i}" for i in range(8)]
    for v in versions:
        publish(model_dir, out, v)
    real_read = storage.read_with_token
    stop, torn, errors = threading.Event(), [], []

    def slow_read(uri):
        found = real_read(uri)
        threading.Event().wait(0.02)  # a slow store: others write between this read and our write
        return found

    def promoter(version):
        barrier.wait()
        try:
            registry.promote(out, NAME, version, f"race {version}")
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    def reader():
        pointer = artifacts.join(out, NAME, registry.POINTER)
        while not stop.is_set():
            try:
                json.loads(storage.read_bytes(pointer))
            except storage.StorageError:
                pass  # not promoted yet
            except ValueError as e:
                torn.append(e)

    monkeypatch.setattr(storage, "read_with_token", slow_read)
    barrier = threading.Barrier(len(versions))
    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=promoter, args=(v,)) for v in versions]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert torn == [], "a reader saw a half-written pointer"
    assert errors == []
    events = assert_consistent(out)
    assert sorted(e["to"] for e in events) == versions


def test_two_processes_promote_at_once(tmp_path, model_dir):
    out = str(tmp_path / "models")
    for v in ("v1", "v2"):
        publish(model_dir, out, v)
    procs = [subprocess.Popen([sys.executable, "-m", "flytetune.registry", "promote", "--output_uri", out,
                               "--name", NAME, "--version", v, "--reason", "ci"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("v1", "v2")]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    events = assert_consistent(out)
    assert sorted(e["to"] for e in events) == ["v1", "v2"]
    assert json.loads(results[0][0])["version"] == "v1"


def test_an_append_interrupted_after_the_swap_is_repaired(tmp_path, model_dir, monkeypatch):
    out = str(tmp_path / "models")
    for v in ("v1", "v2"):
        publish(model_dir, out, v)
    monkeypatch.setattr(registry, "_append", lambda *a: None)  # the writer dies right after the swap
    registry.promote(out, NAME, "v1", "first")
    monkeypatch.undo()
    assert storage.ls(artifacts.join(out, NAME, registry.PROMOTIONS)) == []
    assert [e["to"] for e in registry.history(out, NAME)] == ["v1"]  # known from the pointer
    registry.promote(out, NAME, "v2", "second")
    assert [e["to"] for e in assert_consistent(out)] == ["v1", "v2"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flytetune.registry", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli(tmp_path, model_dir):
    out = str(tmp_path / "models")
    publish(model_dir, out, "v1")
    publish(model_dir, out, "v2")
    storage.remove(artifacts.join(out, NAME, "v2", artifacts.MANIFEST))
    where = ["--output_uri", out, "--name", NAME]
    bad = [
        (["rollback", *where, "--reason", "x"], "no production version yet; nothing to roll back"),
        (["show", *where], "no production version yet"),
        (["promote", *where, "--version", "v9", "--reason", "x"], "no version 'v9'"),
        (["promote", *where, "--version", "v2", "--reason", "x"], "v2: incomplete"),
        (["promote", *where, "--version", "v1"], "promote needs --reason"),
        (["promote", "--name", NAME], "--output_uri"),
        (["list", "--output_uri", "ftp://x/y", "--name", NAME], "unsupported scheme"),
    ]
    for args, message in bad:
        result = cli(*args)
        assert result.returncode == 2, (args, result)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (args, result.stderr)
        assert message in result.stderr and result.stdout == "", (args, result.stderr)

    promoted = cli("promote", *where, "--version", "v1", "--reason", "first")
    assert promoted.returncode == 0 and json.loads(promoted.stdout)["version"] == "v1"
    table = cli("list", *where).stdout.splitlines()
    assert table[0].split() == ["version", "created_at", "accuracy", "macro_f1", "status"]
    assert table[1].split()[0] == "*" and table[1].split()[1] == "v1" and table[1].endswith("production")
    assert table[2].split()[0] == "v2" and table[2].endswith("incomplete")
    assert [v["version"] for v in json.loads(cli("list", *where, "--json").stdout)] == ["v1", "v2"]
    assert json.loads(cli("history", *where).stdout)[0]["to"] == "v1"
    assert json.loads(cli("show", *where).stdout)["production"] is True
