"""Builds the `train` and `light` images on this machine for the cluster tests (`make cluster-image`).

Works on a fresh Debian 12 machine that can reach the Debian mirror and package indexes but no image
registry: starts dockerd (installing docker.io if needed), makes the base image with debootstrap
instead of pulling one, and lets the host's pip, which trusts the TLS-intercepting proxy that the
builds do not, fill a wheelhouse that is served on loopback to `docker build --network host`. Every
step reuses what exists (the base image, a wheelhouse newer than the lock, docker's layer cache), so
a second call takes seconds. dockerd keeps running afterwards: the cluster tests use it.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "flytetune-base:bookworm"
TRAIN_IMAGE = "flytetune-train:cluster-test"
# Tasks name it {{.image.default.fqn}}-light:{{.image.default.version}}.
LIGHT_IMAGE = "flytetune-train-light:cluster-test"
LOCK = REPO / "requirements" / "lock.txt"
CACHE = REPO / ".cache"
WHEELHOUSE = CACHE / "wheelhouse"
WHEELHOUSE_DONE = CACHE / "wheelhouse.done"  # written last: a wheelhouse without it is incomplete
# The port the wheelhouse was last served on, reused when free: PIP_FIND_LINKS is part of the
# cache key of every later RUN, so a new port would rebuild the dependency layers.
WHEELHOUSE_PORT = CACHE / "wheelhouse.port"
DOCKERD_LOG = Path("/tmp/flytetune-dockerd.log")
SERVER_LOG = Path("/tmp/flytetune-wheelhouse.log")
DOCKERD_START_TIMEOUT_S = 60
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# `docker import` keeps no environment; the Dockerfile extends PATH, so the base must set it.
IMPORT_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["bash"]',
]


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, args)), flush=True)
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def succeeds(*args: str) -> bool:
    return subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


_apt_updated = False


def apt_install(*packages: str) -> None:
    global _apt_updated
    if not _apt_updated:
        run("apt-get", "update", "-q")
        _apt_updated = True
    noninteractive = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "install", "-y", "-q", "--no-install-recommends", *packages, env=noninteractive)


def start_dockerd() -> None:
    """Starts dockerd in its own session, so that it outlives this script, unless one answers."""
    if succeeds("docker", "info"):
        return
    if not shutil.which("dockerd"):
        apt_install("docker.io")
    print(f"starting dockerd, log in {DOCKERD_LOG}", flush=True)
    with DOCKERD_LOG.open("ab") as log:
        daemon = subprocess.Popen(
            ["dockerd"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + DOCKERD_START_TIMEOUT_S
    while not succeeds("docker", "info"):
        if daemon.poll() is not None or time.monotonic() > deadline:
            tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-20:]
            sys.exit("dockerd did not start:\n" + "\n".join(tail))
        time.sleep(0.5)


def debian_mirror() -> str:
    """The mirror this host's apt takes bookworm from (deb822 or one-line sources)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text()
        if source.suffix == ".sources":
            for stanza in text.split("\n\n"):
                fields = dict(
                    line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
                )
                if "bookworm" in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    return DEFAULT_MIRROR


def make_base() -> None:
    """A minimal Debian 12 with python3 (3.11, with venv) as BASE_IMAGE: no registry can be reached."""
    if succeeds("docker", "image", "inspect", BASE_IMAGE):
        return
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    root = Path(tempfile.mkdtemp(prefix="flytetune-base-", dir="/var/tmp"))
    try:
        include = "--include=python3,python3-venv,ca-certificates"
        run("debootstrap", "--variant=minbase", include, "bookworm", root, debian_mirror())
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        changes = [arg for change in IMPORT_CHANGES for arg in ("--change", change)]
        print(f"+ tar -C {root} -c . | docker import ... - {BASE_IMAGE}", flush=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", *changes, "-", BASE_IMAGE], stdin=tar.stdout)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            sys.exit(f"importing {root} as {BASE_IMAGE} failed")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fill_wheelhouse() -> None:
    """Every wheel of the lock, plus what building the project needs, fetched by the host's pip.

    The host's pip trusts the proxy and takes torch's CPU wheel from its local find-links."""
    if WHEELHOUSE_DONE.exists() and WHEELHOUSE_DONE.stat().st_mtime >= LOCK.stat().st_mtime:
        return
    partial = CACHE / "wheelhouse.partial"
    shutil.rmtree(partial, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--progress-bar", "off", "-w", str(partial)]
    run(*pip, "-r", LOCK)
    run(*pip, "setuptools>=68", "wheel")  # the build backend of `pip install .` (pyproject.toml)
    WHEELHOUSE_DONE.unlink(missing_ok=True)
    shutil.rmtree(WHEELHOUSE, ignore_errors=True)
    partial.rename(WHEELHOUSE)
    WHEELHOUSE_DONE.touch()


def free_port() -> int:
    """The last port used if it is free, else one the kernel picks."""
    candidates = [int(WHEELHOUSE_PORT.read_text())] if WHEELHOUSE_PORT.exists() else []
    for port in [*candidates, 0]:
        with socket.socket() as probe:
            # As http.server binds: the last run's connections may still be in TIME_WAIT.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = probe.getsockname()[1]
        WHEELHOUSE_PORT.write_text(f"{port}\n")
        return port
    raise AssertionError("unreachable: port 0 always binds")


@contextlib.contextmanager
def served_wheelhouse() -> Iterator[str]:
    """Serves the wheelhouse on loopback only, for the length of the builds; yields its URL."""
    port = free_port()
    with SERVER_LOG.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(WHEELHOUSE)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None:
                sys.exit(f"the wheelhouse server stopped, see {SERVER_LOG}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait()


def build(target: str, tag: str, find_links: str) -> None:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=REPO, capture_output=True, text=True).stdout
    build_args = {
        "BASE_IMAGE": BASE_IMAGE,
        "IMAGE": tag,
        "GIT_SHA": sha.strip(),
        "BRANCH": branch.strip(),
        "PIP_FIND_LINKS": find_links,
    }
    args = [arg for name, value in build_args.items() for arg in ("--build-arg", f"{name}={value}")]
    # Host network: the build reaches the wheelhouse on the host's loopback.
    command = ["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "--target", target, "-t", tag]
    run(*command, *args, ".", cwd=REPO)


def main() -> None:
    took: dict[str, float] = {}

    def step(name: str, action, *args) -> None:
        started = time.monotonic()
        try:
            action(*args)
        finally:
            took[name] = time.monotonic() - started

    try:
        CACHE.mkdir(exist_ok=True)
        step("dockerd", start_dockerd)
        step("base", make_base)
        step("wheelhouse", fill_wheelhouse)
        with served_wheelhouse() as find_links:
            step("train", build, "train", TRAIN_IMAGE, find_links)
            step("light", build, "light", LIGHT_IMAGE, find_links)
    finally:
        print("cluster-image: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items()), flush=True)


if __name__ == "__main__":
    main()
