"""Preemption on CPU with real processes and real signals.

The training CLI runs the same `fit` as the Flyte task, with `--run_id` standing in for the
Flyte execution id (the run-scoped checkpoint prefix every attempt shares). Each test kills it,
reruns it like a Flyte retry would, and compares the final weights with an uninterrupted run.
"""

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flytetune import checkpoint, pipeline
from flytetune.preemption import EXIT_PREEMPTED
from tests.conftest import REPO, TINY_CONFIG

pytestmark = pytest.mark.e2e

STEPS = 16
ARGS = ["--config", str(TINY_CONFIG), "--set", "train.deterministic=true", "--set", f"train.max_steps={STEPS}",
        "--set", "train.log_every_steps=1", "--set", "train.log_min_gap_s=0", "--set", "checkpoint.every_steps=4",
        "--set", "checkpoint.every_minutes=null", "--set", "checkpoint.keep=5"]


class Training:
    """One run of `python -m flytetune.train` whose output is read line by line."""

    def __init__(self, tmp: Path, backbone: Path, run_id: str | None = "run", checkpoints: bool = True,
                 checkpoint_uri: str | None = None, extra: tuple[str, ...] = ()):
        ckpt = f"checkpoint.uri={checkpoint_uri or tmp / 'ckpt'}" if checkpoints else "checkpoint.uri=null"
        args = [*ARGS, "--set", f"model.backbone={backbone}", "--set", ckpt, "--output_uri", str(tmp / "out"), *extra]
        if run_id:
            args += ["--run_id", run_id]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "flytetune.train", *args], cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def wait_for_step(self, step: int) -> None:
        self.wait_for(f" step {step}/{STEPS} ")

    def wait_for_save(self, step: int) -> None:
        """Until checkpoint `step` is complete (its manifest written): saves finish in the background."""
        self.wait_for(f"/step-{step:06d} saved in ")

    def wait_for(self, text: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"training ended before {text.strip()!r}:\n{''.join(self.lines)}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)

    def finish(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=300)
        self.lines.append(out)
        return self.proc.returncode, "".join(self.lines)


def published_weights(output: str) -> dict[str, torch.Tensor]:
    run_uri = re.search(r'"artifacts": "([^"]+)"', output).group(1)
    return load_file(Path(run_uri) / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def complete_steps(tmp: Path, run_id: str = "run") -> list[int]:
    return sorted(checkpoint.complete_checkpoints(str(tmp / "ckpt" / run_id)))


def resumed_step(output: str) -> int:
    return int(re.search(r"resuming from checkpoint \S+/step-(\d+) at step", output).group(1))


def assert_retry_continues(tmp: Path, backbone: Path, step: int, reference: dict) -> None:
    """Rerun as a retry would: it continues from `step` and ends with the uninterrupted run's weights."""
    code, output = Training(tmp, backbone).finish()
    assert code == 0, output
    assert resumed_step(output) == step
    assert_same_weights(published_weights(output), reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_backbone) -> dict[str, torch.Tensor]:
    """The uninterrupted run, without checkpoints: saving must not change what is trained."""
    code, output = Training(tmp_path_factory.mktemp("reference"), tiny_backbone, None, checkpoints=False).finish()
    assert code == 0, output
    return published_weights(output)


def test_sigterm_stops_gracefully_with_a_fresh_checkpoint(tmp_path, reference, tiny_backbone):
    run = Training(tmp_path, tiny_backbone)
    run.wait_for_step(6)
    run.kill(signal.SIGTERM)
    code, output = run.finish()
    assert code == EXIT_PREEMPTED, output
    stopped = int(re.search(r"preempted at step (\d+)", output).group(1))
    assert stopped >= 6 and complete_steps(tmp_path)[-1] == stopped, "a checkpoint of the very step it stopped at"

    assert_retry_continues(tmp_path, tiny_backbone, stopped, reference)


def test_sigkill_resumes_from_last_periodic_checkpoint(tmp_path, reference, tiny_backbone):
    run = Training(tmp_path, tiny_backbone)
    run.wait_for_save(8)
    run.kill()
    assert run.finish()[0] == -signal.SIGKILL
    newest = complete_steps(tmp_path)[-1]
    assert newest >= 8

    assert_retry_continues(tmp_path, tiny_backbone, newest, reference)


def test_sigkill_while_writing_a_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, tiny_backbone):
    run = Training(tmp_path, tiny_backbone)
    folder = tmp_path / "ckpt" / "run" / "step-000008"
    deadline = time.monotonic() + 120
    # Kill as soon as the upload of step 8 has started but before its manifest has landed.
    while not folder.exists() and time.monotonic() < deadline and run.proc.poll() is None:
        time.sleep(0.001)
    run.kill()
    run.finish()
    assert folder.exists() and not (folder / "manifest.json").exists(), "killed mid-write"
    assert complete_steps(tmp_path) == [4]

    assert_retry_continues(tmp_path, tiny_backbone, 4, reference)


def test_two_kills_in_one_run(tmp_path, reference, tiny_backbone):
    first = Training(tmp_path, tiny_backbone)
    first.wait_for_save(4)
    first.kill()
    first.finish()
    after_first = complete_steps(tmp_path)[-1]

    second = Training(tmp_path, tiny_backbone)
    second.wait_for_save(12)
    second.kill()
    _, output = second.finish()
    assert resumed_step(output) == after_first
    after_second = complete_steps(tmp_path)[-1]
    assert after_second > after_first

    assert_retry_continues(tmp_path, tiny_backbone, after_second, reference)


def test_attempts_share_the_run_prefix(tmp_path, reference, tiny_backbone):
    """Flyte's attempts, simulated: attempt 2 dies before its first save; attempt 3 still continues
    from attempt 1's progress, because all attempts of a run share one checkpoint prefix."""
    attempt1 = Training(tmp_path, tiny_backbone, "exec-1")
    attempt1.wait_for_step(10)
    attempt1.kill()
    attempt1.finish()
    saved_by_attempt1 = complete_steps(tmp_path, "exec-1")[-1]

    attempt2 = Training(tmp_path, tiny_backbone, "exec-1")
    attempt2.wait_for_step(saved_by_attempt1 + 1)  # before its own first save
    attempt2.kill()
    _, output2 = attempt2.finish()
    assert resumed_step(output2) == saved_by_attempt1
    assert complete_steps(tmp_path, "exec-1")[-1] == saved_by_attempt1

    code, output3 = Training(tmp_path, tiny_backbone, "exec-1").finish()
    assert code == 0, output3
    assert resumed_step(output3) == saved_by_attempt1
    assert_same_weights(published_weights(output3), reference)


def test_corrupt_newest_checkpoint_falls_back_and_own_progress_beats_from_checkpoint(tmp_path, reference,
                                                                                    tiny_backbone):
    """A retry whose newest checkpoint does not verify continues from the newest one that does,
    saying which it skipped; and the run's own checkpoint wins over an explicit --from_checkpoint."""
    run = Training(tmp_path, tiny_backbone)
    run.wait_for_save(8)
    run.kill()
    run.finish()
    assert complete_steps(tmp_path)[-2:] == [4, 8]
    weights = tmp_path / "ckpt/run/step-000008/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    other = tmp_path / "ckpt/other/step-000004"
    shutil.copytree(tmp_path / "ckpt/run/step-000004", other)

    code, output = Training(tmp_path, tiny_backbone, extra=("--from_checkpoint", str(other))).finish()
    assert code == 0, output
    assert re.search(r"skipping checkpoint \S+/run/step-000008, it does not load: \S+model.safetensors: checksum",
                     output)
    assert f"run run has its own checkpoint step-000004; continuing it instead of --from_checkpoint {other}" in output
    assert resumed_step(output) == 4 and "/run/step-000004 at step" in output
    assert_same_weights(published_weights(output), reference)


@pytest.mark.parametrize("run_id", [None, "given-id"])
def test_cli_logs_the_command_that_continues_the_run(tmp_path, caplog, run_id):
    argv = ["--config", str(TINY_CONFIG), "--set", f"checkpoint.uri={tmp_path / 'ckpt'}",
            "--dataset_uri", str(tmp_path / "missing.csv"), *(["--run_id", run_id] if run_id else [])]
    with caplog.at_level(logging.INFO):
        assert pipeline.main(argv) == 2  # fails after the line, on the missing dataset
    line = next(r.getMessage() for r in caplog.records if "to continue this run after a crash" in r.getMessage())
    logged_id = re.match(r"run id (\S+);", line).group(1)
    assert logged_id == run_id or (run_id is None and logged_id)
    rerun = shlex.split(line.split("rerun: ", 1)[1])
    without_id = [a for a in argv if a not in ("--run_id", run_id)]
    assert rerun == [sys.executable, "-m", "flytetune.train", *without_id, "--run_id", logged_id]


def test_resumes_from_an_s3_checkpoint(tmp_path, reference, tiny_backbone, s3_bucket):
    """Checkpoints round-trip through the loopback S3 server; the rerun continues from there."""
    from flytetune import storage

    uri = f"s3://{s3_bucket}/checkpoints"
    run = Training(tmp_path, tiny_backbone, checkpoint_uri=uri)
    run.wait_for_save(8)
    run.kill()
    run.finish()
    assert checkpoint.latest(f"{uri}/run") is not None
    assert any(key.endswith("/manifest.json") for key in storage.ls(f"{uri}/run"))

    code, output = Training(tmp_path, tiny_backbone, checkpoint_uri=uri).finish()
    assert code == 0, output
    assert re.search(rf"resuming from checkpoint {uri}/run/step-\d+", output)
    assert_same_weights(published_weights(output), reference)


def test_pyflyte_run_sigterm_is_recoverable_and_from_checkpoint_continues(tmp_path, tiny_backbone):
    """The Flyte task turns a graceful stop into FlyteRecoverableException (retried within the task's
    `retries`); a later `pyflyte run --from_checkpoint latest` continues from that checkpoint."""
    pyflyte = str(Path(sys.executable).parent / "pyflyte")
    overrides = (f"model.backbone={tiny_backbone} checkpoint.uri={tmp_path / 'ckpt'} checkpoint.every_steps=4 "
                 f"checkpoint.every_minutes=null train.log_every_steps=1 train.log_min_gap_s=0 train.max_steps={STEPS}")
    command = [pyflyte, "run", "workflows/finetune.py", "finetune", "--config", str(TINY_CONFIG),
               "--output_uri", str(tmp_path / "out"), "--overrides", overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if f" step 6/{STEPS} " in line:
            first.send_signal(signal.SIGTERM)
            break
    out, _ = first.communicate(timeout=300)
    output = "".join(lines) + out
    assert first.returncode != 0, output
    assert "FlyteRecoverableException" in output and "preempted at step" in output, output
    stopped = int(re.search(r"preempted at step (\d+)", output).group(1))

    second = subprocess.run([*command, "--from_checkpoint", "latest"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output
    assert resumed_step(output) == stopped, "continues the earlier run and says so"
    assert "Published(" in output
