"""Progress of long work (copies, syncs, training): done/total, rate and ETA, without flooding logs.

On a terminal (stderr is a TTY) one live line is redrawn in place a few times a second. Elsewhere
(pods, CI) it is one log line every `interval_s` (LOG_INTERVAL_S, 30 s, unless the caller passes
another), never one per item, and one summary line at the end:

    sync s3://team/data -> /work/raw: 40/120 objects (31%), 320.0 MiB/1.00 GiB, 10.7 MiB/s, ETA 1m05s
    epoch 1 step 120/264 (45%), 2.2 steps/s, ETA 1m05s, loss 0.5312, lr 2.95e-04, 70 samples/s, 1.2k tokens/s

No dependency: tqdm would draw the same line, but the light image has no tqdm and the log lines
need their own format anyway.
"""

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

LOG_INTERVAL_S = 30.0
TTY_INTERVAL_S = 0.2
# quiet_if_quick: work that ends sooner than this (or than interval_s, if longer) shows nothing at all.
QUICK_S = 1.0

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """45s, 3m05s, 2h04m."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def size(nbytes: float) -> str:
    """Bytes as MiB below 1 GiB, GiB above."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def count(n: float) -> str:
    """A rate for humans: 950, 12.3k, 4.1M."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:.0f}"


class Progress:
    """Counts done/total items (and bytes, if `total_bytes`); reports at most every `interval_s`.

    `advance` is thread-safe and cheap (a lock, a clock read); it reports only when a report is due,
    or when asked (`report=True`: a line now; the next periodic one is `interval_s` after it). Work
    that can go long between `advance` calls (one large object) runs with `ticking=True` as a
    context manager: a background thread then reports on time too. `partial_bytes()`, if given, is
    the bytes already done within items in flight, read only when a line is written. `detail` is
    appended to every line (training sets loss, learning rate and throughput there). Reports asked
    for closer than `min_report_gap_s` to the previous line are dropped (fast GPU steps in logs).

    `clock` and `stream` are for tests (a fake clock, a stream that says it is a TTY); `show=False`
    counts without writing (the ranks of a torchrun other than 0).
    """

    def __init__(self, label: str, total: int, *, unit: str = "items", count_format: str = "{done}/{total} {unit}",
                 total_bytes: int = 0, done: int = 0, interval_s: float | None = None,
                 logger: logging.Logger | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, show: bool = True, quiet_if_quick: bool = False,
                 partial_bytes: Callable[[], int] | None = None, ticking: bool = False,
                 min_report_gap_s: float = 0.0):
        self.label, self.total, self.unit, self.count_format = label, total, unit, count_format
        self.total_bytes, self.done, self.done_bytes = total_bytes, done, 0
        # Bytes, when there are any, are what the share done, the rate and the ETA are measured in.
        self._tracks_bytes = total_bytes > 0
        self.detail = ""
        self._initial = done
        self._stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S
        self._log = logger or log
        self._clock, self._show, self._quiet = clock, show, quiet_if_quick
        self._partial = partial_bytes
        self.started = clock()
        self._due = self.started + (max(self.interval_s, QUICK_S) if quiet_if_quick else self.interval_s)
        self._shown = self._closed = False
        self._lock = threading.Lock()
        self._ticking = ticking
        self._min_gap_s = min_report_gap_s
        self._last_report: float | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        if self._ticking and self._show:
            self._ticker = threading.Thread(target=self._tick_loop, name="progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, items: int = 1, nbytes: int = 0, skipped_bytes: int = 0, report: bool = False) -> None:
        """`items` more done, `nbytes` of them moved; `skipped_bytes` needed no work (leave the total)."""
        with self._lock:
            self.done += items
            self.done_bytes += nbytes
            self.total_bytes -= skipped_bytes
            self._maybe_report(report)

    def tick(self) -> None:
        """Report if a report is due (the ticker thread calls this)."""
        with self._lock:
            self._maybe_report(False)

    def _tick_loop(self) -> None:
        poll_s = min(max(self.interval_s, 0.05), 1.0)
        while not self._stop.wait(poll_s):
            self.tick()

    def _maybe_report(self, force: bool) -> None:
        now = self._clock()
        # A report asked for within min_report_gap_s of the previous line waits for the next one.
        forced = force and (self._last_report is None or now - self._last_report >= self._min_gap_s)
        if self._closed or not (forced or now >= self._due):
            return
        self._due, self._last_report = now + self.interval_s, now
        self._shown = True
        self._write(self.line(now), final=False)

    def clear(self) -> None:
        """On a terminal, erase the live line so that a log message printed next starts on a clean line
        (the next report draws it again below). Nothing in logs."""
        with self._lock:
            if self.tty and self._shown and self._show and not self._closed:
                self._stream.write("\r\x1b[K")
                self._stream.flush()

    def close(self) -> None:
        """Stop the ticker and write the summary line (idempotent). With `quiet_if_quick`, work that
        never showed a line writes no summary either."""
        self._stop.set()
        if self._ticker is not None and self._ticker is not threading.current_thread():
            self._ticker.join()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._quiet and not self._shown:
                return
            self._write(self.summary(), final=True)

    def _write(self, text: str, final: bool) -> None:
        if not self._show:
            return
        if self.tty:
            # \r and erase-line: the new text replaces the old in place; the summary ends the line.
            self._stream.write("\r\x1b[K" + text + ("\n" if final else ""))
            self._stream.flush()
        else:
            self._log.info(text)

    def _bytes_done(self) -> int:
        partial = self._partial() if self._partial is not None else 0
        return min(self.done_bytes + partial, max(self.total_bytes, 0))

    def _counts(self) -> str:
        return self.count_format.format(done=self.done, total=self.total, unit=self.unit)

    def line(self, now: float | None = None) -> str:
        """The progress line: counts, share done, rate and ETA, then `detail`."""
        elapsed = max((self._clock() if now is None else now) - self.started, 1e-9)
        parts = [f"{self.label} {self._counts()}"]
        if self._tracks_bytes:
            done_bytes = self._bytes_done()
            parts[0] += f" ({100 * done_bytes / self.total_bytes:.0f}%)" if self.total_bytes > 0 else " (100%)"
            rate = done_bytes / elapsed
            parts += [f"{size(done_bytes)}/{size(self.total_bytes)}", f"{size(rate)}/s"]
            remaining = self.total_bytes - done_bytes
        else:
            if self.total > 0:
                parts[0] += f" ({100 * self.done / self.total:.0f}%)"
            rate = (self.done - self._initial) / elapsed
            parts.append(f"{rate:.1f} {self.unit}/s")
            remaining = self.total - self.done
        if remaining > 0 and rate > 0:
            parts.append(f"ETA {duration(remaining / rate)}")
        if self.detail:
            parts.append(self.detail)
        return ", ".join(parts)

    def summary(self) -> str:
        """The last line: counts, bytes, time taken and average rate."""
        elapsed = max(self._clock() - self.started, 1e-9)
        head = f"{self.label} {self._counts()}"
        if self._tracks_bytes:
            head += f", {size(self.done_bytes)}"
            rate = f"{size(self.done_bytes / elapsed)}/s"
        else:
            rate = f"{(self.done - self._initial) / elapsed:.1f} {self.unit}/s"
        text = f"{head} in {duration(elapsed)}, {rate}"
        return f"{text}, {self.detail}" if self.detail else text
