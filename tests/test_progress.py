"""Progress of long work, and the training metrics stream.

The reporter is driven by a fake clock (no sleeps); sync, copy and training run for real on
tiny data and are read back from their logs, their results and train_history.json.
"""

import io
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path

import pytest

from flytetune import storage
from flytetune.batches import EpochBatchSampler
from flytetune.config import load_config
from flytetune.preemption import Preempted
from flytetune.progress import Progress
from flytetune.storage.transfer import _InFlight
from flytetune.store import FeatureStore
from flytetune.train import fit
from tests.conftest import TINY_CONFIG

LOGGER = "tests.progress"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def messages(caplog, name: str = LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_logs_a_line_per_interval_and_a_summary_not_one_per_item(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress("work:", 200, interval_s=30, logger=logging.getLogger(LOGGER), stream=io.StringIO(),
                  clock=clock) as progress:
        for _ in range(200):  # 2 items/s for 100 s
            clock.now += 0.5
            progress.advance()
    lines = messages(caplog)
    assert len(lines) == 4, lines  # at 30, 60 and 90 s, and the summary
    assert lines[0] == "work: 60/200 items (30%), 2.0 items/s, ETA 1m10s"
    assert lines[2] == "work: 180/200 items (90%), 2.0 items/s, ETA 10s"
    assert lines[3] == "work: 200/200 items in 1m40s, 2.0 items/s"


def test_bytes_within_objects_in_flight_count_and_skipped_bytes_leave_the_total(caplog):
    clock, in_flight = Clock(), {"bytes": 0}
    caplog.set_level(logging.INFO, logger=LOGGER)
    progress = Progress("sync a -> b:", 3, unit="objects", total_bytes=3 * 2**30, interval_s=30,
                        logger=logging.getLogger(LOGGER), stream=io.StringIO(), clock=clock,
                        partial_bytes=lambda: in_flight["bytes"])
    progress.advance(skipped_bytes=2**30)  # already at the destination: 2 GiB left to move
    clock.now += 30
    in_flight["bytes"] = 512 * 2**20  # half of the second object, still downloading
    progress.tick()
    clock.now += 30
    in_flight["bytes"] = 0  # done: the bytes count as the object's now
    progress.advance(nbytes=2**30)
    progress.close()
    assert messages(caplog) == [
        "sync a -> b: 1/3 objects (25%), 512.0 MiB/2.00 GiB, 17.1 MiB/s, ETA 1m30s",
        "sync a -> b: 2/3 objects (50%), 1.00 GiB/2.00 GiB, 17.1 MiB/s, ETA 1m00s",
        "sync a -> b: 2/3 objects, 1.00 GiB in 1m00s, 17.1 MiB/s",
    ]


def test_a_report_asked_for_restarts_the_interval(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger=LOGGER)
    progress = Progress("epoch 0", 100, unit="steps", count_format="step {done}/{total}", interval_s=30,
                        logger=logging.getLogger(LOGGER), stream=io.StringIO(), clock=clock)
    clock.now += 20
    progress.detail = "loss 1.2500"
    progress.advance(report=True)
    clock.now += 20  # 40 s after the start, 20 s after the last line: nothing
    progress.advance()
    clock.now += 10
    progress.advance()
    assert messages(caplog) == ["epoch 0 step 1/100 (1%), 0.1 steps/s, ETA 33m00s, loss 1.2500",
                                "epoch 0 step 3/100 (3%), 0.1 steps/s, ETA 26m57s, loss 1.2500"]


def test_reports_asked_for_closer_than_the_minimum_gap_are_dropped(caplog):
    """Training asks for a line at every metrics record; at 30 steps/s that would be lines per second."""
    clock = Clock()
    caplog.set_level(logging.INFO, logger=LOGGER)
    progress = Progress("epoch 0", 1000, unit="steps", count_format="step {done}/{total}", interval_s=30,
                        logger=logging.getLogger(LOGGER), stream=io.StringIO(), clock=clock, min_report_gap_s=10)
    for _ in range(50):  # a record every step, 2 s apart
        clock.now += 2
        progress.advance(report=True)
    steps = [int(re.search(r"step (\d+)/", line).group(1)) for line in messages(caplog)]
    assert steps == [1, 6, 11, 16, 21, 26, 31, 36, 41, 46]


def test_on_a_terminal_one_line_is_redrawn_in_place_and_nothing_is_logged(caplog):
    clock, terminal = Clock(), Terminal()
    caplog.set_level(logging.INFO, logger=LOGGER)
    with Progress("work:", 48, logger=logging.getLogger(LOGGER), stream=terminal, clock=clock) as progress:
        assert progress.interval_s == 0.2
        for _ in range(48):
            clock.now += 0.125
            progress.advance()
    out = terminal.getvalue()
    assert out.count("\r\x1b[K") == 25  # every other item (0.25 s apart), and the summary
    assert out.count("\n") == 1 and out.endswith("\r\x1b[Kwork: 48/48 items in 6s, 8.0 items/s\n")
    assert messages(caplog) == []


def test_quick_work_says_nothing_and_long_work_reports(caplog):
    clock = Clock()
    caplog.set_level(logging.INFO, logger=LOGGER)
    for seconds in (0.5, 45):
        with Progress(f"copy {seconds}:", 1, unit="objects", total_bytes=2**20, interval_s=30, quiet_if_quick=True,
                      logger=logging.getLogger(LOGGER), stream=io.StringIO(), clock=clock) as progress:
            clock.now += seconds
            progress.tick()
            progress.advance(nbytes=2**20)
    assert messages(caplog) == ["copy 45: 0/1 objects (0%), 0.0 MiB/1.0 MiB, 0.0 MiB/s",
                                "copy 45: 1/1 objects, 1.0 MiB in 45s, 0.0 MiB/s"]


def test_the_ticker_reports_while_no_item_completes():
    """One large object: no `advance` for minutes, yet a line is due every interval."""
    clock, written = Clock(), threading.Event()

    class Signal(logging.Handler):
        def emit(self, record):
            written.set()

    logger = logging.getLogger(f"{LOGGER}.ticker")
    logger.addHandler(Signal())
    logger.setLevel(logging.INFO)
    with Progress("copy:", 1, total_bytes=2**30, interval_s=30, logger=logger, stream=io.StringIO(),
                  clock=clock, ticking=True):
        assert not written.wait(0.2)
        clock.now += 30
        assert written.wait(30), "the ticker wrote no line once one was due"


def test_in_flight_files_count_while_written(tmp_path):
    in_flight = _InFlight()
    part = tmp_path / "object.part"
    with in_flight.watch(part):
        assert in_flight.bytes() == 0  # not created yet
        part.write_bytes(b"x" * 3000)
        assert in_flight.bytes() == 3000
    assert in_flight.bytes() == 0


def make_tree(root: Path) -> Path:
    for rel, data in {"a.txt": b"alpha", "sub/b.bin": os.urandom(70_000), "sub/c.json": b"{}", "empty": b""}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_sync_progress_is_in_the_logs_with_eta(tmp_path, caplog):
    src = make_tree(tmp_path / "src")
    caplog.set_level(logging.INFO, logger="flytetune.storage")
    storage.sync(str(src), str(tmp_path / "dst"), concurrency=1, progress_interval_s=0)
    lines = messages(caplog, "flytetune.storage")
    label = f"sync {src} -> {tmp_path / 'dst'}:"
    assert all(line.startswith(label) for line in lines), lines
    assert any(re.fullmatch(r".*: [123]/4 objects \(\d+%\), [\d.]+ MiB/[\d.]+ MiB, [\d.]+ MiB/s, ETA \d+s", line)
               for line in lines), lines
    assert re.fullmatch(r".*: 4/4 objects, 0\.1 MiB in \d+s, [\d.]+ MiB/s", lines[-1]), lines

    caplog.clear()
    storage.sync(str(src), str(tmp_path / "dst"), progress_interval_s=30)
    assert len(messages(caplog, "flytetune.storage")) == 1, "nothing to move: the summary only"
    assert re.fullmatch(r".*: 4/4 objects, 0\.0 MiB in \d+s, 0\.0 MiB/s", messages(caplog, "flytetune.storage")[0])


def test_a_quick_copy_logs_nothing(tmp_path, caplog):
    (tmp_path / "f").write_bytes(b"data")
    caplog.set_level(logging.INFO, logger="flytetune.storage")
    storage.copy(str(tmp_path / "f"), str(tmp_path / "g"))
    assert (tmp_path / "g").read_bytes() == b"data"
    assert messages(caplog, "flytetune.storage") == []


# Training: the tiny 2-layer backbone on the prepared sample, a few steps.

def tiny_fit_cfg(backbone: Path, *overrides: str):
    return load_config(TINY_CONFIG, [f"model.backbone={backbone}", "train.log_every_steps=2",
                                     "checkpoint.every_minutes=null", *overrides])


def test_fit_records_the_metrics_stream_and_the_timeline(tmp_path, prepared_tiny, tiny_backbone, caplog):
    cfg = tiny_fit_cfg(tiny_backbone, "train.max_steps=5", "checkpoint.every_steps=2", "train.batch_size=16",
                       "train.log_min_gap_s=0")  # a line per record
    updates = []
    caplog.set_level(logging.INFO, logger="flytetune.train")
    result = fit(prepared_tiny, tmp_path / "model", cfg, checkpoint_dir=str(tmp_path / "ckpt"),
                 on_update=updates.append)

    assert [r["step"] for r in result.steps] == [2, 4, 5], "every log_every_steps steps, and the last step"
    for record in result.steps:
        assert set(record) == {"step", "epoch", "loss", "lr", "padding_share", "samples_per_s", "tokens_per_s",
                               "elapsed_s"}
        assert record["epoch"] == 0 and record["loss"] > 0 and record["samples_per_s"] > 0
    assert [r["lr"] for r in result.steps] == sorted((r["lr"] for r in result.steps), reverse=True)
    assert result.steps[0]["elapsed_s"] < result.steps[1]["elapsed_s"] < result.steps[2]["elapsed_s"]
    # tokens/s over samples/s of one window: the non-pad tokens per example of the batches it trained on.
    store = FeatureStore(prepared_tiny / "train")
    batches = list(EpochBatchSampler(len(store), 16, cfg.train.seed, 0, lengths=store.lengths()))[:2]
    real_tokens = sum(len(store[i]["input_ids"]) for batch in batches for i in batch)
    per_example = result.steps[0]["tokens_per_s"] / result.steps[0]["samples_per_s"]
    assert per_example == pytest.approx(real_tokens / 32, rel=0.01)
    slots = sum(16 * max(len(store[i]["input_ids"]) for i in batch) for batch in batches)
    assert result.steps[0]["padding_share"] == pytest.approx(1 - real_tokens / slots, abs=1e-4)

    events = [(e["event"], e["step"]) for e in result.events]
    assert events == [("start", 0), ("checkpoint", 2), ("checkpoint", 4), ("checkpoint", 5), ("end", 5)]
    saves = [e for e in result.events if e["event"] == "checkpoint"]
    assert saves[0]["uri"] == str(tmp_path / "ckpt/step-000002") and saves[0]["seconds"] >= 0
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]) for e in result.events)

    history = json.loads((tmp_path / "model/train_history.json").read_text())
    assert history["steps"] == result.steps and history["events"] == result.events
    assert history["history"] == result.history and len(history["history"]) == 1 and history["init_from"] is None

    assert len(updates) == 1, "once, at the end of the epoch (the interval is 5 minutes)"
    assert updates[0].global_step == 5 and len(updates[0].history) == 1 and updates[0].total_steps == 5

    lines = messages(caplog, "flytetune.train")
    progress = [line for line in lines if re.match(r"epoch 0 step \d/5 ", line)]
    assert progress[0].startswith("epoch 0 step 2/5 (40%), ") and " steps/s, ETA " in progress[0], progress
    assert " tokens/s" in progress[0] and "loss " in progress[0] and "lr " in progress[0]
    assert re.match(r"epoch 0 step 5/5 in \d+s, [\d.]+ steps/s", progress[-1]), "the summary"
    assert len(progress) == 4, "a line per record and a summary, none per step"


def test_preempted_and_resumed_run_keeps_one_timeline(tmp_path, prepared_tiny, tiny_backbone):
    cfg = tiny_fit_cfg(tiny_backbone, "train.max_steps=6", "checkpoint.every_steps=2")
    seen = []

    def preempt_at_step_3(snapshot):
        seen.append(snapshot.global_step)
        if snapshot.global_step == 3 and not any(e["event"] == "preempted" for e in snapshot.events):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="preempted at step 3"):
        fit(prepared_tiny, tmp_path / "model", cfg, checkpoint_dir=str(tmp_path / "ckpt"),
            on_update=preempt_at_step_3, update_every_minutes=0)
    assert seen == [1, 2, 3, 3], "every step (interval 0), then once more when preempted"

    result = fit(prepared_tiny, tmp_path / "model", cfg, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.resumed_from == str(tmp_path / "ckpt/step-000003")
    events = [(e["event"], e["step"]) for e in result.events]
    # In the order they happened: the save of step 2 may complete (in the background) after the SIGTERM.
    assert events[0] == ("start", 0) and sorted(events[1:3]) == [("checkpoint", 2), ("preempted", 3)]
    assert events[3:] == [("resume", 3), ("checkpoint", 4), ("checkpoint", 6), ("end", 6)]
    assert result.events[3]["checkpoint"] == str(tmp_path / "ckpt/step-000003")
    assert next(e for e in result.events if e["event"] == "preempted")["signal"] == "SIGTERM"
    assert [r["step"] for r in result.steps] == [2, 4, 6], "the records of the first attempt came back with it"
    elapsed = [r["elapsed_s"] for r in result.steps]
    assert elapsed == sorted(elapsed), "training time adds up over attempts"


def test_a_failing_on_update_does_not_stop_training(tmp_path, prepared_tiny, tiny_backbone, caplog):
    cfg = tiny_fit_cfg(tiny_backbone, "train.max_steps=3")
    calls = []

    def broken(snapshot):
        calls.append(snapshot.global_step)
        raise RuntimeError("deck service down")

    caplog.set_level(logging.WARNING, logger="flytetune.train")
    result = fit(prepared_tiny, tmp_path / "model", cfg, on_update=broken, update_every_minutes=0)
    assert result.global_step == 3 and (tmp_path / "model/model.safetensors").is_file()
    assert calls == [1, 2, 3, 3], "every step, and at the end of the epoch"
    warnings = [r for r in caplog.records if r.name == "flytetune.train" and r.levelno == logging.WARNING]
    message = "on_update failed, training goes on: RuntimeError: deck service down"
    assert [r.getMessage() for r in warnings] == [message] * 4
    assert [bool(r.exc_info) for r in warnings] == [True, False, False, False], "the traceback once"
