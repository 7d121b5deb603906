"""The training data path: whole batches read in bulk, in worker processes when asked.

The DataLoader's sampler is the batch sampler itself (`EpochBatchSampler`) and auto-batching is
off (batch_size=None): each item a worker fetches is one batch, its examples read in a single
lmdb transaction and padded with numpy (`FeatureStore.batch`), instead of one transaction and one
small tensor copy per example followed by a per-example collate in Python. Batches come out in
the sampler's order whatever the number of workers, so a run resumed at `start_batch` sees the
batches the uninterrupted run would have seen.

From a worker process a batch travels as one numpy array pickled through the result pipe
(`PackedBatch`), not as tensors: torch hands each tensor over in a shared-memory file of its
own, about a millisecond apiece on a busy 2-core machine, more than reading and padding the
whole batch (benchmarks/loader_throughput.py).
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from flytetune.batches import EpochBatchSampler
from flytetune.store import FeatureStore

# Batches each worker keeps in flight. A batch is small (256 x 64 int64 is 128 KiB) and cheap to
# read; a few in hand absorb the jitter of a shared CPU without holding much memory.
PREFETCH_BATCHES = 4


class PackedBatch:
    """A batch on its way from a worker: labels, input_ids and attention_mask in one int64 array."""

    __slots__ = ("data", "rows", "width")

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.rows, self.width = batch["input_ids"].shape
        self.data = np.concatenate([batch["labels"].numpy(), batch["input_ids"].numpy().ravel(),
                                    batch["attention_mask"].numpy().ravel()])

    def unpack(self, pin: bool = False) -> dict[str, torch.Tensor]:
        """The batch as `collate` makes it: views into one tensor (one page-locked block if `pin`)."""
        flat = torch.from_numpy(self.data)
        if pin:
            flat = flat.pin_memory()
        rows, cells = self.rows, self.rows * self.width
        return {"input_ids": flat[rows:rows + cells].view(rows, self.width),
                "attention_mask": flat[rows + cells:].view(rows, self.width),
                "labels": flat[:rows]}

    def pin_memory(self, *_) -> dict[str, torch.Tensor]:
        # The DataLoader's pinning thread calls this: unpacking and pinning stay off the training loop.
        return self.unpack(pin=True)


class StoreBatches(torch.utils.data.Dataset):
    """Map from a list of example indices to the padded batch of those examples."""

    def __init__(self, store: FeatureStore, pad_id: int):
        self.store, self.pad_id = store, pad_id

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor] | PackedBatch:
        batch = self.store.batch(indices, self.pad_id)
        return PackedBatch(batch) if torch.utils.data.get_worker_info() is not None else batch

    def __len__(self) -> int:
        return len(self.store)


def _as_is(batch):
    return batch


class BatchLoader(torch.utils.data.DataLoader):
    """A DataLoader whose batches are always dicts of tensors, however they crossed from the workers."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            yield batch.unpack() if isinstance(batch, PackedBatch) else batch


def batch_loader(store: FeatureStore, sampler: EpochBatchSampler, pad_id: int, num_workers: int = 0,
                 pin_memory: bool = False, generator: torch.Generator | None = None,
                 multiprocessing_context: str | None = None) -> BatchLoader:
    """A DataLoader of the batches `sampler` draws, each a dict of int64 tensors like `collate` makes.

    `num_workers` processes read batches ahead (each opens the store itself); `pin_memory` hands
    page-locked batches, so that a non_blocking copy to the GPU overlaps the previous step. Workers
    pay only when the training loop leaves the main process little time to spare: reading and
    padding a batch of 256 in-process takes well under a millisecond.
    """
    return BatchLoader(
        StoreBatches(store, pad_id), sampler=sampler, batch_size=None, collate_fn=_as_is,
        num_workers=num_workers, pin_memory=pin_memory, generator=generator,
        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
        multiprocessing_context=multiprocessing_context if num_workers else None,
    )
