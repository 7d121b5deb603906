"""One SDK client per process, made on first use and shared by that process's threads.

A client must not cross a fork (its connection pool would be shared with the parent), so a
child process makes its own; `reset` drops it (tests that move the endpoint).
"""

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._value: T | None = None

    def get(self) -> T:
        with self._lock:
            if self._pid != os.getpid():
                self._value, self._pid = self._make(), os.getpid()
            return self._value

    def reset(self) -> None:
        with self._lock:
            self._value, self._pid = None, None
