"""Training-loader throughput: samples/s the data path delivers, old per-example path against bulk batches.

Conditions: a synthetic store of MiniLM-tokenised short texts (default 200,000 examples) written
with `flytetune.store.write_store`: random token ids in MiniLM's vocabulary range (1000..30000)
between [CLS] and [SEP], lengths log-normal around 20 tokens (mean about 22, max 64, as a
short-text dataset truncated to 64 has), 17 labels. Batches are drawn exactly as `fit` draws
them (`EpochBatchSampler`, length-grouped) for batch 32 and 256. Each figure is one full epoch
through a freshly built DataLoader (worker start-up included, as `fit` builds one per epoch),
median of `--repeats`, on this machine's CPU cores (the header says how many); pinned memory is
measured only when CUDA is present. Nothing but the loader runs: the figures are what the data
path can feed, to set against the model's step rate (benchmarks/train_throughput.py).

    python benchmarks/loader_throughput.py [--examples 200000] [--batch 32 256] [--workers 0 1 2] [--repeats 3]

"old": `DataLoader(store, batch_sampler=..., collate_fn=collate)`, the loader `fit` used before:
one lmdb transaction per example and a per-example Python collate. "bulk": `flytetune.loader.
batch_loader`, one transaction per batch and a vectorised numpy collate (`FeatureStore.batch`).
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flytetune.batches import EpochBatchSampler, collate  # noqa: E402
from flytetune.loader import batch_loader  # noqa: E402
from flytetune.store import FeatureStore, write_store  # noqa: E402

CLS, SEP, PAD = 101, 102, 0
VOCAB = (1000, 30000)
MAX_TOKENS = 64
LABELS = 17


def synthetic_examples(n: int, seed: int = 0):
    """(input_ids, label) pairs like a tokenised short-text dataset, generated lazily."""
    rng = np.random.default_rng(seed)
    words = np.clip(np.rint(rng.lognormal(np.log(18), 0.5, n)), 1, MAX_TOKENS - 2).astype(int)
    labels = rng.integers(0, LABELS, n)
    for count, label in zip(words, labels, strict=True):
        ids = rng.integers(*VOCAB, count + 2, dtype=np.int32)
        ids[0], ids[-1] = CLS, SEP
        yield ids, int(label)


def old_loader(store, sampler, workers):
    return torch.utils.data.DataLoader(store, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_id=PAD),
                                       num_workers=workers, pin_memory=False)


def epoch_rate(make_loader, n_samples: int, repeats: int) -> float:
    """Samples per second over one epoch of a freshly built loader, median of `repeats`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        seen = 0
        for batch in make_loader():
            seen += len(batch["labels"])
        times.append(time.perf_counter() - started)
        assert seen == n_samples, (seen, n_samples)
    return n_samples / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=200_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", type=Path, help="reuse (or create) the synthetic store here (default: temporary)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()

    with tempfile.TemporaryDirectory(prefix="flytetune-loader-bench-") as tmp:
        path = args.store or Path(tmp) / "train"
        if not path.exists():
            started = time.perf_counter()
            write_store(path, synthetic_examples(args.examples))
            print(f"wrote {args.examples:,} examples in {time.perf_counter() - started:.1f}s")
        store = FeatureStore(path)
        lengths = store.lengths()
        n = len(store)
        pinned = "CUDA (pinned memory measured)" if cuda else "no CUDA (no pinned memory)"
        print(f"Loader throughput: {n:,} examples, tokens per example mean {lengths.mean():.1f}, "
              f"median {np.median(lengths):.0f}, max {lengths.max()}; {os.cpu_count()} CPU cores, "
              f"torch {torch.__version__}, {pinned}; "
              f"one epoch per figure, median of {args.repeats}")
        rows = []
        for batch_size in args.batch:
            sampler = functools.partial(EpochBatchSampler, n, batch_size, 0, 0, lengths=lengths)
            for workers in args.workers:
                old = epoch_rate(lambda s=sampler, w=workers: old_loader(store, s(), w), n, args.repeats)
                rows.append((batch_size, workers, "old", False, old, old))
                pins = [False, True] if cuda else [False]
                for pin in pins:
                    bulk = epoch_rate(lambda s=sampler, w=workers, p=pin: batch_loader(
                        store, s(), PAD, num_workers=w, pin_memory=p), n, args.repeats)
                    rows.append((batch_size, workers, "bulk", pin, bulk, old))

        print(f"{'batch':>5} {'workers':>7} {'path':<5} {'pinned':>6} {'samples/s':>11} {'batches/s':>10} "
              f"{'vs old':>7}")
        for batch_size, workers, name, pin, rate, old in rows:
            print(f"{batch_size:>5} {workers:>7} {name:<5} {'yes' if pin else 'no':>6} {rate:>11,.0f} "
                  f"{rate / batch_size:>10,.0f} {rate / old:>6.1f}x")
        best = {b: max(r[4] for r in rows if r[0] == b and r[2] == "bulk") for b in args.batch}
        for batch_size, rate in best.items():
            verdict = "meets" if rate >= 20_000 else "does NOT meet"
            print(f"batch {batch_size}: bulk loader up to {rate:,.0f} samples/s, {verdict} the 20,000 samples/s target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
