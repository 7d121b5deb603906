"""Headless Chromium driven over the DevTools protocol on a pipe: open a page, click, screenshot, and
see every request the page makes. No WebDriver and no pip dependency: Debian's `chromium` is enough.

`--remote-debugging-pipe` makes Chromium read protocol commands from fd 3 and write replies and
events to fd 4, each a JSON message ended by a NUL byte (what Puppeteer's pipe transport does).
"""

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

# Nothing a page asks for can leave the machine: every host name fails to resolve. Requests are
# still attempted, so the page's Network events show them.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND"
INSTALL = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"


class BrowserError(RuntimeError):
    """Chromium did not start, did not answer in time, or answered a command with an error."""


def find_chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def start_install() -> subprocess.Popen | None:
    """Start installing Debian's chromium in the background when it is missing (CI: a fresh machine,
    root); None when it is there. About 20 s on a Debian 12 machine with a nearby mirror."""
    if find_chromium():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise BrowserError(f"chromium is not installed and this is not a Debian machine run as root: "
                           f"install it ({INSTALL}) or set CHROMIUM to a Chromium binary")
    return subprocess.Popen(["sh", "-c", INSTALL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_install(install: subprocess.Popen | None, timeout_s: float = 600) -> str:
    if install is not None:
        output, _ = install.communicate(timeout=timeout_s)
        if install.returncode:
            raise BrowserError(f"{INSTALL} failed ({install.returncode}):\n{output[-3000:]}")
    binary = find_chromium()
    if binary is None:
        raise BrowserError(f"chromium not found after {INSTALL}")
    return binary


class Chromium:
    """One headless browser; `open(url)` gives a Page. Use as a context manager."""

    def __init__(self, binary: str, profile_dir: Path, timeout_s: float = 60):
        self.timeout_s = timeout_s
        # Both ends the child needs are moved above fd 10 first, so that placing them at 3 and 4 in the
        # child cannot overwrite one with the other.
        to_child, self._to_browser = _high_pipe()
        self._from_browser, from_child = _high_pipe()
        args = [binary, "--headless", "--remote-debugging-pipe", OFFLINE, f"--user-data-dir={profile_dir}",
                "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--mute-audio", "--force-device-scale-factor=1", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to start its sandbox as root (CI)

        def child_fds() -> None:
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.log = profile_dir / "chromium.log"
        profile_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            # close_fds=False: pass_fds would insist that fds 3 and 4 exist here in the parent. Python's own
            # descriptors are not inheritable (PEP 446), so only 0-4 reach Chromium.
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            preexec_fn=child_fds, close_fds=False)
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._closed = False
        self._next_id = 0
        self.events: list[dict] = []

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._to_browser)
        os.close(self._from_browser)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile go to `self.events`."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for_event(self, method: str, session: str) -> dict:
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read())

    def open(self, url: str, width: int = 1000, height: int = 800) -> "Page":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=session)
        page.resize(width, height)
        self.call("Page.navigate", {"url": url}, session)
        self.wait_for_event("Page.loadEventFired", session)
        return page

    def _read(self) -> dict:
        deadline = time.monotonic() + self.timeout_s
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                why = "it exited" if self.process.poll() is not None else f"none within {self.timeout_s:g} s"
                raise BrowserError(f"chromium gave no answer ({why}); its log, {self.log}:\n"
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"chromium closed its pipe; its log: {self.log}")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (promises awaited); a thrown error raises BrowserError."""
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:200]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def resize(self, width: int, height: int) -> None:
        self.browser.call("Emulation.setDeviceMetricsOverride",
                          {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, self.session)

    def screenshot(self, x: float, y: float, width: float, height: float, scale: float = 1.0) -> bytes:
        """A PNG of the page's region (CSS pixels), `scale` times its size."""
        clip = {"x": x, "y": y, "width": width, "height": height, "scale": scale}
        data = self.browser.call("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                            "captureBeyondViewport": True}, self.session)["data"]
        return base64.b64decode(data)

    def requests(self) -> list[str]:
        """Every URL this page has asked for so far (documents, styles, images, fonts, fetches)."""
        return [e["params"]["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    def exceptions(self) -> list[str]:
        return [e["params"]["exceptionDetails"].get("text", "") + " " +
                str(e["params"]["exceptionDetails"].get("exception", {}).get("description", ""))
                for e in self._events("Runtime.exceptionThrown")]

    def _events(self, method: str) -> list[dict]:
        return [e for e in self.browser.events if e.get("method") == method and e.get("sessionId") == self.session]


def _high_pipe() -> tuple[int, int]:
    read, write = os.pipe()
    high = fcntl.fcntl(read, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(write, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(read)
    os.close(write)
    return high
