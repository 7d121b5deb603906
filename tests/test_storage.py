"""Storage against real servers on loopback (moto S3, gcp-storage-emulator) and local disk."""

import os
import subprocess
import sys
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
    if result.returncode == 0:
        pytest.skip("this moto version does not enforce bucket policies")
    assert one_error_line(result) == f"error: s3://{s3_bucket}/secret.txt: access denied"


def test_local_file_uris_and_missing_source(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hi")
    storage.copy(f"file://{tmp_path / 'a.txt'}", str(tmp_path / "b" / "a.txt"))
    assert (tmp_path / "b" / "a.txt").read_bytes() == b"hi"
    with pytest.raises(StorageError, match="nope.txt: no such file or directory"):
        storage.copy(str(tmp_path / "nope.txt"), str(tmp_path / "c.txt"))
