"""Bad and hostile input through the three entry points a user has: `python -m flytetune.train`,
`pyflyte run` and `python -m flytetune.storage`.

Every case: a non-zero exit, one line that names the file, key, option or row, nothing published,
and no file written outside the case's own folder. The CLIs print exactly one `error:` line and
no traceback; `pyflyte run` prints flytekit's own report of a failed task, which ends in our line.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE, TINY_CONFIG

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@dataclass
class Case:
    entry: str  # train | pyflyte | storage
    args: object  # list of arguments, or a function (case folder, s3 bucket) -> list
    message: str  # what the one line must contain; {tmp} and {bucket} are filled in
    s3: bool = False  # needs the loopback S3 server


def csv(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def rows(label_of, n=20) -> str:
    return "text,label\n" + "".join(f"payment number {i},{label_of(i)}\n" for i in range(n))


def hostile_checkpoint(tmp: Path, _bucket) -> list:
    """A complete-looking checkpoint whose manifest names a file outside its folder, with the right hash."""
    step = tmp / "ckpt-evil" / "run" / "step-000004"
    step.mkdir(parents=True)
    payload = b"owned"
    (tmp / "ckpt-evil" / "run" / "escaped").write_bytes(payload)
    files = {name: {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}
             for name in ("model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json")}
    files["../escaped"] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (step / "manifest.json").write_text(json.dumps({"format": 1, "step": 4, "created_at": "2026-11-25T00:00:00+00:00",
                                                    "files": files}))
    return ["--from_checkpoint", str(step)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_objects(keys):
    def make(tmp: Path, bucket: str) -> list:
        import boto3

        s3 = boto3.client("s3")
        for key in keys:
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")
        return ["sync", f"s3://{bucket}/p", str(tmp / "dest")]
    return make


CASES = {
    # python -m flytetune.train: config
    "train unknown key": Case("train", ["--set", "train.epoch=2"],
                              "train.epoch: unknown key (did you mean train.epochs?)"),
    "train wrong type": Case("train", ["--set", "train.epochs=two"], "train.epochs: expected int, got 'two'"),
    "train max_length": Case("train", ["--set", "data.max_length=4"], "data.max_length: must be between 8 and 512"),
    "train test_fraction 0": Case("train", ["--set", "data.test_fraction=0"],
                                  "data.test_fraction: is 0 but no test file"),
    "train config list": Case("train", lambda t, b: ["--config", csv(t, "c.yaml", "- a\n- b\n")],
                              "c.yaml: expected a mapping of sections, got list"),
    "train config missing": Case("train", ["--config", "no/such.yaml"], "no/such.yaml: config file not found"),
    # Checked before any data moves; the module named is never imported.
    "train backbone module": Case("train", ["--set", "model.backbone=this"],
                                  "model.backbone: 'this' is an installed module but not a model package"),
    # ... data
    "train missing dataset": Case("train", ["--dataset_uri", "no/such/file.csv"], "no/such/file.csv"),
    "train empty dataset uri": Case("train", ["--dataset_uri", ""], "dataset_uri is empty"),
    "train dataset is a folder": Case("train", lambda t, b: ["--dataset_uri", str(t)],
                                      "is a directory; dataset_uri must name a CSV, parquet, JSON lines or "
                                      "text lines (.txt) file"),
    "train unknown scheme": Case("train", ["--dataset_uri", "gopher://host/data.csv"], "unsupported scheme 'gopher'"),
    "train single class": Case("train", lambda t, b: ["--dataset_uri", csv(t, "one.csv", rows(lambda i: "food"))],
                               "label column 'label' has only class 'food'"),
    "train float labels": Case("train", lambda t, b: ["--dataset_uri", csv(t, "f.csv", rows(lambda i: i % 3 / 10))],
                               "label column 'label' has type Float64"),
    "train list labels": Case("train", lambda t, b: ["--dataset_uri", csv(
        t, "l.jsonl", "".join(json.dumps({"text": f"t{i}", "label": [str(i % 2)]}) + "\n" for i in range(20)))],
        "label column 'label' has type List"),
    "train not utf-8": Case("train", lambda t, b: ["--dataset_uri", str(t / "latin1.csv")], "not valid UTF-8"),
    "train no label column": Case("train", lambda t, b: ["--dataset_uri", csv(t, "n.csv", "text,category\na,b\n")],
                                  "label column 'label' not found"),
    "train max_rows too small": Case("train", lambda t, b: ["--set", "data.max_rows=50", "--dataset_uri",
                                                            csv(t, "many.csv", rows(lambda i: f"c{i % 100}", 600))],
                                     "data.max_rows=50 is too small for 100 classes"),
    # ... where results go, probed before any data moves
    "train output is a file": Case("train", lambda t, b: ["--output_uri", csv(t, "out.txt", "x")],
                                   "output_uri: {tmp}/out.txt: not writable"),
    "train output scheme": Case("train", ["--output_uri", "ftp://host/models"], "unsupported scheme 'ftp'"),
    "train output bucket missing": Case("train", lambda t, b: ["--output_uri", f"s3://{b}-typo/models"],
                                        "output_uri: s3://{bucket}-typo/models: not writable", s3=True),
    "train checkpoint uri is a file": Case("train", lambda t, b: ["--set", f"checkpoint.uri={csv(t, 'ck.txt', 'x')}"],
                                           "checkpoint.uri: {tmp}/ck.txt: not writable"),
    # ... checkpoints
    "train from_checkpoint missing": Case("train", ["--from_checkpoint", "no/such/run"],
                                          "--from_checkpoint no/such/run"),
    "train hostile checkpoint": Case("train", hostile_checkpoint, "unsafe file name"),
    # python -m flytetune.storage
    "storage onto a folder": Case("storage", lambda t, b: ["copy", str(SAMPLE), str(t)],
                                  "{tmp}: is an existing folder"),
    "storage key clash": Case("storage", s3_objects(["p/a", "p/a/b"]), "clashes with", s3=True),
    "storage long key": Case("storage", s3_objects(["p/" + "k" * 300]), "too long", s3=True),
    "storage concurrency negative": Case("storage", lambda t, b: ["sync", str(t), str(t / "x"), "--concurrency", "-3"],
                                         "--concurrency must be at least 1 (got -3)"),
    "storage concurrency zero": Case("storage", lambda t, b: ["sync", str(t), str(t / "x"), "--concurrency", "0"],
                                     "--concurrency must be at least 1 (got 0)"),
    "storage missing object": Case("storage", lambda t, b: ["copy", f"s3://{b}/nothing.csv", str(t / "x")],
                                   "s3://{bucket}/nothing.csv: no such object", s3=True),
    "storage unknown scheme": Case("storage", lambda t, b: ["copy", "gopher://x/y", str(t / "x")],
                                   "unsupported scheme 'gopher'"),
    "storage unreachable endpoint": Case("storage", lambda t, b: ["copy", "s3://some-bucket/k", str(t / "x")],
                                         "cannot connect to http://127.0.0.1:"),
    # pyflyte run
    "pyflyte unknown override": Case("pyflyte", ["--overrides", "train.epoch=2"],
                                     "train.epoch: unknown key (did you mean train.epochs?)"),
    "pyflyte config typo": Case("pyflyte", lambda t, b: ["--config", csv(t, "typo.yaml", "train: {epoch: 2}\n")],
                                "train.epoch: unknown key (did you mean train.epochs?)"),
    "pyflyte unknown preset": Case("pyflyte", ["--preset", "a10"], "preset 'a10': not found"),
    "pyflyte backbone module": Case("pyflyte", ["--overrides", "model.backbone=antigravity"],
                                    "model.backbone: 'antigravity' is an installed module but not a model package"),
    "pyflyte output is a file": Case("pyflyte", lambda t, b: ["--output_uri", csv(t, "out.txt", "x")],
                                     "output_uri: {tmp}/out.txt: not writable"),
    "pyflyte missing dataset": Case("pyflyte", ["--dataset_uri", "no/such/file.csv"], "no/such/file.csv"),
    "pyflyte latest without checkpoints": Case("pyflyte", ["--from_checkpoint", "latest"],
                                               "--from_checkpoint latest: no complete checkpoint"),
    "pyflyte prepared_uri not prepared": Case("pyflyte", lambda t, b: ["--prepared_uri", str(t)],
                                              "prepared_uri: {tmp} is not prepared data (no meta.json"),
    "pyflyte init_from without production": Case("pyflyte", ["--init_from", "production"],
                                                 "init_from: no production version of txn-categoriser under"),
    "pyflyte gate metric": Case("pyflyte", ["--overrides", "gate.metric=f1"],
                                "gate.metric: must be one of accuracy, macro_f1"),
    "train init_from unknown version": Case(
        "train", ["--init_from", "20990101T000000Z-beef"],
        "init_from: {tmp}/out/txn-categoriser/20990101T000000Z-beef: no manifest.json"),
    "train gate eval file missing": Case("train", lambda t, b: ["--set", f"gate.eval_uri={t}/fixed.parquet"],
                                         "gate.eval_uri: {tmp}/fixed.parquet: no such file"),
}


def command(case: Case, tmp: Path, bucket: str | None) -> list[str]:
    args = case.args(tmp, bucket) if callable(case.args) else list(case.args)
    out, ckpt = tmp / "out", tmp / "ckpt"
    if case.entry == "train":
        return [sys.executable, "-m", "flytetune.train", "--config", str(TINY_CONFIG), "--output_uri", str(out),
                "--set", f"checkpoint.uri={ckpt}", "--set", "train.max_steps=2", *args]
    if case.entry == "storage":
        return [sys.executable, "-m", "flytetune.storage", *args]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    overrides = f"checkpoint.uri={ckpt} train.max_steps=2 {flags.pop('--overrides', '')}"
    return [str(BIN / "pyflyte"), "run", "workflows/finetune.py", "finetune", "--config", str(TINY_CONFIG),
            "--output_uri", str(out), "--overrides", overrides, *[x for kv in flags.items() for x in kv]]


def repo_state() -> set[Path]:
    """Every file of the checkout but the environment and caches: a case may add none."""
    skip = {".git", ".venv", ".cache", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return {Path(root) / name for root, dirs, files in os.walk(REPO)
            if not dirs.__setitem__(slice(None), [d for d in dirs if d not in skip]) for name in files}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_in_one_line(name, tmp_path, request):
    case = CASES[name]
    bucket = None
    if case.s3:
        bucket = request.getfixturevalue("s3_bucket")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9 cr\xe8me,food\n".encode("latin-1") * 10)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path / "tmp")}
    if name == "storage unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{closed_port()}"
        env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for folder in ("home", "tmp"):
        (tmp_path / folder).mkdir()
    before = repo_state()
    cwd = REPO if case.entry == "pyflyte" else tmp_path
    done = subprocess.run(command(case, tmp_path, bucket), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    message = case.message.format(tmp=tmp_path, bucket=bucket)
    assert done.returncode != 0, output[-3000:]
    if case.entry == "pyflyte":
        assert message in " ".join(output.split()), output[-3000:]  # rich wraps long lines
    else:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], output[-3000:]
        assert "Traceback" not in output
    assert not list(tmp_path.glob("out/**/manifest.json")), "nothing is published"
    source = tmp_path / "ckpt-evil" / "run" / "escaped"
    assert [p for p in tmp_path.rglob("escaped") if p != source] == [], "a checkpoint wrote outside its folder"
    assert repo_state() - before == set(), "a file was written outside the case's folder"
