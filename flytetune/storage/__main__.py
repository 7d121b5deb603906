"""python -m flytetune.storage copy|sync SRC DST [--concurrency N]"""

import argparse
import logging
import sys

from flytetune.storage import StorageError, copy, sync


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flytetune.storage",
                                     description="Copy or sync between local paths, s3:// and gs://.")
    parser.add_argument("command", choices=["copy", "sync"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--concurrency", type=int, default=None, help="parallel object transfers (default 16)")
    args = parser.parse_args(argv)
    if args.concurrency is not None and args.concurrency < 1:
        print(f"error: --concurrency must be at least 1 (got {args.concurrency})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The SDKs log where they found credentials and endpoints at INFO: noise next to our progress lines.
    for sdk in ("botocore", "boto3", "s3transfer", "urllib3", "google"):
        logging.getLogger(sdk).setLevel(logging.WARNING)
    try:
        stats = (copy if args.command == "copy" else sync)(args.src, args.dst, concurrency=args.concurrency)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{stats.objects_copied} copied, {stats.objects_skipped} skipped, {stats.bytes_copied} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
