"""Prepare at scale: rows per second and peak memory of `flytetune.prepare`, next to Hugging Face `datasets`.

Conditions: generated transaction texts (the bundled sample's texts, each with a number appended,
17 classes), drawn with repetition so that about a quarter of the rows are exact duplicates, plus
0.1% of rows relabelled at random (conflicting labels); one parquet file per size. Each contender
runs in a fresh subprocess on the same file, one after the other, on this machine's cores:

- flytetune: `prepare` with the default config (max_length 64): validation, deduplication and
  conflict detection over the whole table, stratified split, tokenisation, three lmdb stores,
  test_texts.parquet and meta.json.
- datasets: `load_dataset("parquet")` + `map(batched=True)` with the same fast tokenizer
  (truncation at 64), num_proc = the number of cores; that is all it does: no deduplication,
  no split, no store (its Arrow cache is the output).

    python benchmarks/prepare_scale.py [--rows 100000 1000000 10000000] [--skip-datasets] [--skip-loader]

Then the training loader (benchmarks/loader_throughput.py) on the train split of the smallest
size's prepared stores: samples/s at batch 32 and 256, the old per-example path and the bulk
loader, in process and with 2 worker processes, one epoch per figure.

Rows/s is input rows over the subprocess's wall time, imports and tokenizer load included (the
data is generated beforehand, in a process of its own). Peak memory: "main" is the subprocess's
own peak RSS (getrusage); "tree" is the peak of the summed RSS
of the subprocess and every process it started (its tokenizer workers), sampled every 50 ms.
The acceptance bar is 10,000,000 rows under 2 GB (tree) at >= 50,000 rows/s, with memory flat
as rows grow: the last lines print the largest size's main peak over the smallest's.
"""

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE = REPO / "flytetune" / "sample" / "transactions.parquet"
MAX_LENGTH = 64


def generate(rows: int, path: Path, seed: int = 0) -> None:
    """`rows` rows of (text, label): about 26% exact duplicates, 0.1% conflicting labels."""
    import numpy as np
    import polars as pl

    sample = pl.read_parquet(SAMPLE)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, int(rows * 1.5), rows)  # 1.5x as many texts as rows: ~74% distinct rows
    base = draws % sample.height
    texts = sample.get_column("text").gather(base) + " #" + pl.Series(draws).cast(pl.String)
    labels = sample.get_column("label").gather(base)
    flip = rng.random(rows) < 0.001
    names = sorted(sample.get_column("label").unique().to_list())
    labels = pl.Series(np.where(flip, np.array(names)[rng.integers(0, len(names), rows)], labels.to_numpy()))
    pl.DataFrame({"text": texts, "label": labels.cast(pl.String)}).write_parquet(path, row_group_size=100_000)


def run_flytetune(data: Path, work: Path) -> dict:
    from flytetune.config import FinetuneConfig
    from flytetune.data import copy_dataset
    from flytetune.prepare import prepare

    copy_dataset(str(data), work / "raw")
    meta = prepare(work / "raw", work / "prepared", FinetuneConfig())
    return {"stored": sum(meta["rows"].values()), "dropped": meta["profile"]["duplicates_dropped"]["dataset"]}


def run_datasets(data: Path, work: Path) -> dict:
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoTokenizer

    from flytetune.backbone import resolve_backbone
    from flytetune.config import ModelConfig

    disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(ModelConfig().backbone), local_files_only=True)
    table = load_dataset("parquet", data_files=str(data), split="train", cache_dir=str(work / "cache"))
    cores = len(os.sched_getaffinity(0))
    tokens = table.map(lambda batch: tokenizer(batch["text"], truncation=True, max_length=MAX_LENGTH),
                       batched=True, num_proc=cores if cores > 1 else None, remove_columns=["text"])
    return {"stored": len(tokens), "dropped": 0}


def child(contender: str, data: Path, work: Path) -> None:
    start = time.perf_counter()
    result = {"flytetune": run_flytetune, "datasets": run_datasets}[contender](data, work)
    result["seconds"] = time.perf_counter() - start
    result["main_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def measure(contender: str, data: Path, work: Path, keep: bool = False) -> dict:
    import psutil

    work.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, __file__, "--child", contender, "--data", str(data), "--work", str(work)],
                            stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        try:
            parent = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while proc.poll() is None:
            total = 0
            try:
                tree = [parent, *parent.children(recursive=True)]
            except psutil.Error:  # a worker exited while the tree was listed: skip this sample
                tree = []
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak[0] = max(peak[0], total)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{contender} failed (exit {proc.returncode})")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["tree_mb"] = peak[0] / 2**20
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def loader(train_store: Path) -> None:
    """benchmarks/loader_throughput.py on the train split prepare just wrote: samples/s of the training
    data path, in process and with 2 worker processes."""
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "loader_throughput.py"), "--store", str(train_store),
                    "--workers", "0", "2", "--repeats", "1"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--skip-datasets", action="store_true", help="measure flytetune only")
    parser.add_argument("--skip-loader", action="store_true",
                        help="do not measure the training loader on the smallest size's prepared train split")
    parser.add_argument("--child", choices=["flytetune", "datasets"], help=argparse.SUPPRESS)
    parser.add_argument("--generate", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.data)
        return
    if args.child:
        child(args.child, args.data, args.work)
        return
    contenders = ["flytetune"] if args.skip_datasets else ["flytetune", "datasets"]
    if "datasets" in contenders:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise SystemExit("the comparison needs datasets: .venv/bin/python -m pip install -r requirements/bench.txt "
                             "-c requirements/lock-dev.txt (`make bench` does this), or pass --skip-datasets") from None
    print(f"prepare at scale: {len(os.sched_getaffinity(0))} cores, Python {sys.version.split()[0]}")
    header = f"{'rows':>11} {'contender':>10} {'seconds':>8} {'rows/s':>9} {'main MB':>8} {'tree MB':>8} {'stored':>10}"
    print(header)
    results = {}
    loader_rows = None if args.skip_loader else min(args.rows)
    with tempfile.TemporaryDirectory(prefix="prepare-scale-") as tmp:
        for rows in args.rows:
            data = Path(tmp) / f"rows-{rows}.parquet"
            # In a subprocess: this process stays small, so the contenders it starts inherit no peak memory.
            subprocess.run([sys.executable, __file__, "--generate", str(rows), "--data", str(data)], check=True)
            for contender in contenders:
                keep = contender == "flytetune" and rows == loader_rows
                r = measure(contender, data, Path(tmp) / f"{contender}-{rows}", keep=keep)
                r["rows_s"] = rows / r["seconds"]
                results[rows, contender] = r
                print(f"{rows:>11,} {contender:>10} {r['seconds']:>8.1f} {r['rows_s']:>9,.0f} {r['main_mb']:>8,.0f} "
                      f"{r['tree_mb']:>8,.0f} {r['stored']:>10,}", flush=True)
            data.unlink()
        if loader_rows:
            print(f"\nthe training loader on the {loader_rows:,}-row run's prepared train split:", flush=True)
            loader(Path(tmp) / f"flytetune-{loader_rows}" / "prepared" / "train")
            print(flush=True)
    if "datasets" in contenders:
        print("\nflytetune / datasets (rows/s: higher is better; memory: lower is better)")
        for rows in args.rows:
            f, d = results[rows, "flytetune"], results[rows, "datasets"]
            print(f"{rows:>11,}  rows/s x{f['rows_s'] / d['rows_s']:.2f}  "
                  f"tree memory x{f['tree_mb'] / d['tree_mb']:.2f}")
    largest, smallest = max(args.rows), min(args.rows)
    if largest > smallest:
        # Flat memory: the peak does not follow the rows (it would grow `largest / smallest` times with them).
        grow = results[largest, "flytetune"]["main_mb"] / results[smallest, "flytetune"]["main_mb"]
        print(f"\nflytetune main memory {largest:,} rows / {smallest:,} rows: x{grow:.2f} "
              f"for x{largest / smallest:,.0f} the rows")
    f = results[largest, "flytetune"]
    ok = f["tree_mb"] < 2048 and f["rows_s"] >= 50_000
    print(f"\n{largest:,} rows: {f['rows_s']:,.0f} rows/s at {f['tree_mb']:,.0f} MB peak "
          f"({'meets' if ok else 'misses'} the bar: < 2048 MB and >= 50,000 rows/s)")


if __name__ == "__main__":
    main()
