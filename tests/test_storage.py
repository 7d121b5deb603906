"""Storage against real servers on loopback (moto S3, gcp-storage-emulator) and local disk."""

import http.server
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from flytetune import storage
from flytetune.storage import StorageError
from tests.conftest import REPO

FILES = {"a.txt": b"alpha", "sub/b.bin": os.urandom(70_000), "sub/deeper/c.json": b"{}", "empty": b""}


def make_tree(root: Path) -> Path:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def remotes(s3_bucket, gcs_bucket):
    return {"s3": f"s3://{s3_bucket}/data", "gs": f"gs://{gcs_bucket}/data"}


@pytest.mark.parametrize(("first", "second"), [("s3", "gs"), ("gs", "s3"), ("s3", "s3"), ("gs", "gs")])
def test_round_trip_in_every_direction(tmp_path, remotes, first, second):
    """local -> first -> second -> local, byte for byte, with both copy and sync."""
    src = make_tree(tmp_path / "src")
    hop1, hop2 = remotes[first], remotes[second] + "-2"
    storage.sync(str(src), hop1)
    storage.sync(hop1, hop2)
    storage.sync(hop2, f"file://{tmp_path / 'back'}")
    assert tree(tmp_path / "back") == FILES
    storage.copy(f"{hop2}/sub/b.bin", str(tmp_path / "one.bin"))
    assert (tmp_path / "one.bin").read_bytes() == FILES["sub/b.bin"]


def test_sha256_streams_an_object_in_every_backend(tmp_path, remotes):
    import hashlib

    data = os.urandom(9 << 20)  # more than one 8 MiB chunk
    (tmp_path / "w.bin").write_bytes(data)
    expected = (hashlib.sha256(data).hexdigest(), len(data))
    for base in [*remotes.values(), f"file://{tmp_path}/out", str(tmp_path / "plain")]:
        storage.copy(str(tmp_path / "w.bin"), f"{base}/w.bin")
        assert storage.sha256(f"{base}/w.bin") == expected, base
        with pytest.raises(StorageError, match="nope.bin"):
            storage.sha256(f"{base}/nope.bin")


def test_small_object_api(remotes):
    for base in remotes.values():
        storage.write_text(f"{base}/x/m.json", '{"a": 1}')
        assert storage.read_text(f"{base}/x/m.json") == '{"a": 1}'
        assert storage.exists(f"{base}/x/m.json") and storage.exists(f"{base}/x")
        assert not storage.exists(f"{base}/nope")
        assert storage.ls(f"{base}/x") == [f"{base}/x/m.json"]
        storage.remove(f"{base}/x")
        assert storage.ls(f"{base}/x") == []


def test_second_sync_moves_nothing_and_a_change_is_copied(tmp_path, remotes):
    src = make_tree(tmp_path / "src")
    for base in remotes.values():
        first = storage.sync(str(src), base)
        assert first.objects_copied == len(FILES)
        again = storage.sync(str(src), base)
        assert (again.objects_copied, again.bytes_copied, again.objects_skipped) == (0, 0, len(FILES))
        down = storage.sync(base, str(tmp_path / f"down-{base[:2]}"))
        assert storage.sync(base, str(tmp_path / f"down-{base[:2]}")).bytes_copied == 0
        assert down.objects_copied == len(FILES)
    (src / "a.txt").write_bytes(b"ALPHA")  # same size, different bytes
    for base in remotes.values():
        changed = storage.sync(str(src), base)
        assert (changed.objects_copied, changed.bytes_copied) == (1, 5)


def test_interrupted_sync_resumes_without_recopying(tmp_path, s3_bucket):
    base = f"s3://{s3_bucket}/resume"
    src = make_tree(tmp_path / "src")
    dest = tmp_path / "dest"
    storage.sync(str(src), base)
    # Interrupt: the destination already holds some finished objects and a stale partial file.
    storage.copy(f"{base}/a.txt", str(dest / "a.txt"))
    storage.copy(f"{base}/sub/deeper/c.json", str(dest / "sub/deeper/c.json"))
    (dest / "sub" / ".b.bin.x.part").write_bytes(b"partial")
    stats = storage.sync(base, str(dest))
    assert (stats.objects_copied, stats.objects_skipped) == (2, 2)
    assert stats.bytes_copied == len(FILES["sub/b.bin"])
    assert {k: v for k, v in tree(dest).items() if not k.endswith(".part")} == FILES


def test_changed_object_is_detected_and_fails_loudly(tmp_path, s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/k.bin", b"original-bytes")
    head = boto3.client("s3").head_object(Bucket=s3_bucket, Key="k.bin")
    # Same metadata (recorded CRC32C of the original), other bytes: what a corrupt or tampered object looks like.
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="k.bin", Body=b"tampered-bytes", Metadata=head["Metadata"])
    with pytest.raises(StorageError, match=r"k.bin: content does not match its recorded size/checksum"):
        storage.copy(f"s3://{s3_bucket}/k.bin", str(tmp_path / "k.bin"))
    assert not (tmp_path / "k.bin").exists(), "nothing is left under the final name"
    assert not list(tmp_path.iterdir()), "no temporary file is left behind"


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../escape.txt", "/abs.txt", "./a"])
def test_traversal_keys_are_rejected(tmp_path, s3_bucket, key):
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"p/{key}", Body=b"x")
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="p/ok.txt", Body=b"x")
    with pytest.raises(StorageError, match="unsafe object key"):
        storage.sync(f"s3://{s3_bucket}/p", str(tmp_path / "dest"))
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest").exists()


def test_copy_of_a_prefix_points_to_sync(remotes, tmp_path):
    storage.sync(str(make_tree(tmp_path / "src")), remotes["s3"])
    with pytest.raises(StorageError, match="is a prefix"):
        storage.copy(remotes["s3"], str(tmp_path / "x"))


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "flytetune.storage", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_copies_and_does_not_import_ml_stack(tmp_path, s3_bucket):
    src = make_tree(tmp_path / "src")
    result = cli("sync", str(src), f"s3://{s3_bucket}/cli", "--concurrency", "4")
    assert result.returncode == 0, result.stderr
    assert f"{len(FILES)} copied, 0 skipped" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, flytetune.storage.__main__ as m; "
                            "print('torch' in sys.modules or 'transformers' in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True)
    assert probe.stdout.strip() == "False"


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_missing_bucket_is_one_clear_line(s3_server, gcs_server, tmp_path):
    assert one_error_line(cli("sync", "s3://no-such-bucket-x/p", str(tmp_path / "k"))) == \
        "error: s3://no-such-bucket-x: bucket does not exist"
    assert one_error_line(cli("sync", "gs://no-such-bucket-y/p", str(tmp_path / "k"))) == \
        "error: gs://no-such-bucket-y: bucket does not exist"
    (tmp_path / "up" / "f.txt").parent.mkdir()
    (tmp_path / "up" / "f.txt").write_text("x")
    assert one_error_line(cli("sync", str(tmp_path / "up"), "s3://no-such-bucket-x/p")).startswith(
        "error: s3://no-such-bucket-x")


def test_missing_credentials_is_one_clear_line(s3_bucket, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"], AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true",
               AWS_DEFAULT_REGION="us-east-1")
    line = one_error_line(cli("copy", f"s3://{s3_bucket}/k", str(tmp_path / "k"), env=env))
    assert line == f"error: s3://{s3_bucket}/k: no AWS credentials found (environment, ~/.aws, or the pod's role)"


def test_denied_access_is_one_clear_line(s3_bucket, tmp_path):
    storage.write_bytes(f"s3://{s3_bucket}/secret.txt", b"x")
    policy = ('{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*","Action":"s3:*",'
              f'"Resource":["arn:aws:s3:::{s3_bucket}","arn:aws:s3:::{s3_bucket}/*"]}}]}}')
    boto3.client("s3").put_bucket_policy(Bucket=s3_bucket, Policy=policy)
    result = cli("copy", f"s3://{s3_bucket}/secret.txt", str(tmp_path / "s"))
    assert one_error_line(result) == f"error: s3://{s3_bucket}/secret.txt: access denied"
    assert not (tmp_path / "s").exists()


def test_local_file_uris_and_missing_source(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hi")
    storage.copy(f"file://{tmp_path / 'a.txt'}", str(tmp_path / "b" / "a.txt"))
    assert (tmp_path / "b" / "a.txt").read_bytes() == b"hi"
    with pytest.raises(StorageError, match="nope.txt: no such file or directory"):
        storage.copy(str(tmp_path / "nope.txt"), str(tmp_path / "c.txt"))


def put_objects(bucket: str, *keys: str) -> None:
    for key in keys:
        boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=b"x")


def test_cli_copy_onto_an_existing_folder_is_one_line(tmp_path, s3_bucket):
    put_objects(s3_bucket, "k")
    (tmp_path / "dest").mkdir()
    line = one_error_line(cli("copy", f"s3://{s3_bucket}/k", str(tmp_path / "dest")))
    assert line == f"error: {tmp_path / 'dest'}: is an existing folder; give the full target path of the object"


def test_cli_sync_key_clash_fails_before_writing_anything(tmp_path, s3_bucket):
    """`a` and `a/b` are two objects, but locally `a` cannot be a file and a folder at once."""
    put_objects(s3_bucket, "p/0-first", "p/a", "p/a/b", "p/z")
    line = one_error_line(cli("sync", f"s3://{s3_bucket}/p", str(tmp_path / "dest"), "--concurrency", "1"))
    assert line == (f"error: s3://{s3_bucket}/p/a/b: clashes with s3://{s3_bucket}/p/a: one needs "
                    f"{tmp_path / 'dest' / 'a'} to be a file, the other a folder")
    assert not (tmp_path / "dest").exists(), "the plan is checked before any object is written"


def test_cli_sync_of_a_name_too_long_for_the_disk_fails_before_writing_anything(tmp_path, s3_bucket):
    long_key = "p/sub/" + "n" * 300
    put_objects(s3_bucket, "p/0-first", long_key)
    line = one_error_line(cli("sync", f"s3://{s3_bucket}/p", str(tmp_path / "dest")))
    assert line.startswith(f"error: s3://{s3_bucket}/{long_key}: file name too long for the local file system "
                           "(300 bytes; the limit is 255)")
    assert not (tmp_path / "dest").exists(), "the plan is checked before any object is written"


def test_a_name_near_the_file_system_limit_is_copied(tmp_path, s3_bucket):
    """The temporary name beside the target must fit where the target's own name does."""
    name = "n" * 250
    put_objects(s3_bucket, f"p/{name}")
    storage.sync(f"s3://{s3_bucket}/p", str(tmp_path / "dest"))
    assert os.listdir(tmp_path / "dest") == [name]


def test_a_file_where_a_folder_is_needed_fails_before_writing_anything(tmp_path, s3_bucket):
    put_objects(s3_bucket, "p/0-first", "p/sub/x")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "sub").write_text("a file")
    with pytest.raises(StorageError, match=rf"p/sub/x: {tmp_path / 'dest' / 'sub'} exists and is not a folder"):
        storage.sync(f"s3://{s3_bucket}/p", str(tmp_path / "dest"))
    assert sorted(os.listdir(tmp_path / "dest")) == ["sub"]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_cli_rejects_concurrency_below_one(tmp_path, value):
    make_tree(tmp_path / "src")
    line = one_error_line(cli("sync", str(tmp_path / "src"), str(tmp_path / "dest"), "--concurrency", value))
    assert line == f"error: --concurrency must be at least 1 (got {value})"
    assert not (tmp_path / "dest").exists()
    with pytest.raises(ValueError, match=f"concurrency must be at least 1, got {value}"):
        storage.sync(str(tmp_path / "src"), str(tmp_path / "dest"), concurrency=int(value))


def closed_port() -> int:
    """A loopback port nobody listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
@pytest.mark.parametrize("command", ["copy", "sync-up"])
def test_unreachable_endpoint_fails_fast_in_one_line(tmp_path, scheme, command):
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STORAGE_EMULATOR"))}
    env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}", GOOGLE_CLOUD_PROJECT="flytetune-test")
    uri = f"{scheme}://bucket/k"
    args = ("copy", uri, str(tmp_path / "k")) if command == "copy" else ("sync", str(make_tree(tmp_path / "s")), uri)
    started = time.monotonic()
    result = cli(*args, env=env)
    elapsed = time.monotonic() - started
    assert one_error_line(result) == f"error: {uri}: cannot connect to http://127.0.0.1:{port} (connection refused)"
    assert elapsed < 15, f"took {elapsed:.0f} s"


class Throttling(http.server.BaseHTTPRequestHandler):
    """Answers GETs of object `k` with `status` `throttled` times, then with 200 and b"hello"; anything else
    (the GCS library may look up the bucket after a 503) with an empty JSON resource."""

    throttled, status, body, requests = 2, 503, b"", 0

    def do_GET(self):
        is_object = self.path.split("?")[0] in ("/bucket/k", "/download/storage/v1/b/bucket/o/k")
        if is_object:
            type(self).requests += 1
        status, body = ((self.status, self.body) if is_object and self.requests <= self.throttled
                        else (200, b"hello" if is_object else b"{}"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("scheme", "status", "body"), [
    ("s3", 503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
    ("s3", 429, b"<Error><Code>TooManyRequests</Code></Error>"),
    ("gs", 429, b'{"error": {"code": 429, "message": "rate limit"}}'),
    ("gs", 503, b'{"error": {"code": 503, "message": "backend error"}}'),
])
def test_throttling_is_still_retried(monkeypatch, scheme, status, body):
    handler = type("Handler", (Throttling,), {"status": status, "body": body, "requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        for key, value in dict(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="t",
                               AWS_DEFAULT_REGION="us-east-1", STORAGE_EMULATOR_HOST=endpoint,
                               GOOGLE_CLOUD_PROJECT="flytetune-test").items():
            monkeypatch.setenv(key, value)
        storage.reset_clients()
        assert storage.read_bytes(f"{scheme}://bucket/k") == b"hello"
        assert handler.requests == 3, "two throttled answers, then the retry that succeeded"
    finally:
        server.shutdown()
        storage.reset_clients()


def test_check_writable_leaves_nothing_behind(tmp_path, remotes):
    for base in [str(tmp_path / "out"), f"file://{tmp_path / 'out2'}", *remotes.values()]:
        storage.check_writable(base)
        assert storage.ls(base) == [], base
    # Not even the local folders it created: an empty output folder would look like a run.
    storage.check_writable(str(tmp_path / "new" / "deep" / "models"))
    (tmp_path / "kept").mkdir()
    storage.check_writable(str(tmp_path / "kept" / "models"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_check_writable_names_the_uri_and_the_cause(tmp_path, s3_bucket, gcs_bucket):
    (tmp_path / "file").write_text("x")
    cases = {
        str(tmp_path / "file" / "out"): f"{tmp_path / 'file'} exists and is not a folder",
        "s3://no-such-bucket-w/out": "s3://no-such-bucket-w: bucket does not exist",
        "gs://no-such-bucket-w/out": "gs://no-such-bucket-w: bucket does not exist",
    }
    for uri, cause in cases.items():
        with pytest.raises(StorageError) as raised:
            storage.check_writable(uri)
        assert str(raised.value) == f"{uri}: not writable ({cause})"
    with pytest.raises(StorageError, match=r"^ftp://host/out: unsupported scheme 'ftp'"):
        storage.check_writable("ftp://host/out")


def test_check_writable_fails_where_a_bucket_policy_denies_writes(s3_bucket):
    policy = ('{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*","Action":"s3:PutObject",'
              f'"Resource":"arn:aws:s3:::{s3_bucket}/*"}}]}}')
    boto3.client("s3").put_bucket_policy(Bucket=s3_bucket, Policy=policy)
    with pytest.raises(StorageError) as raised:
        storage.check_writable(f"s3://{s3_bucket}/out")
    assert str(raised.value) == f"s3://{s3_bucket}/out: not writable (access denied)"


@pytest.fixture
def umask():
    """Set the process's umask for one test, then restore it."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_local_writes_get_the_umask_modes(tmp_path, s3_bucket, umask, mask, file_mode, dir_mode):
    """Not mkstemp's 0600: a teammate or a serving process must be able to read what was written."""
    umask(mask)
    storage.sync(str(make_tree(tmp_path / "src")), f"s3://{s3_bucket}/m")
    storage.sync(f"s3://{s3_bucket}/m", str(tmp_path / "down"))
    storage.sync(str(tmp_path / "src"), str(tmp_path / "local"))
    storage.copy(f"s3://{s3_bucket}/m/a.txt", str(tmp_path / "one" / "a.txt"))
    storage.write_bytes(str(tmp_path / "small" / "m.json"), b"{}")
    for root in ("down", "local", "one", "small"):
        for path in [tmp_path / root, *(tmp_path / root).rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (dir_mode if path.is_dir() else file_mode), f"{path}: {oct(mode)}"
