"""Turning a preemption notice (SIGTERM) into a graceful stop at the next step boundary."""

import logging
import signal
import threading

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "temporary failure, try again". The CLI exits with it after a graceful stop.
EXIT_PREEMPTED = 75


class Preempted(RuntimeError):
    """Training stopped on SIGTERM; `checkpoint` is the newest complete checkpoint, if any."""

    def __init__(self, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"resume from {checkpoint}" if checkpoint else "no checkpoint was saved; progress is lost"
        super().__init__(f"preempted at step {step}: {where}")


class GracefulStop:
    """Context manager: while active, SIGTERM only sets `requested`; the loop decides when to stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM received: finishing the current step, then stopping")
        self.requested = True

    def __enter__(self) -> "GracefulStop":
        # Signal handlers can only be installed from the main thread (not the case in some runners).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
