"""Batching: the order examples are seen in, and dynamic padding.

The order of epoch e is drawn from (seed, e) and the examples' lengths alone, so a run that
resumes at batch b of epoch e sees exactly the batches the uninterrupted run would have seen.
"""

from collections.abc import Iterator, Sequence

import numpy as np
import torch

# Length grouping sorts within windows of this many batches: batches of similar lengths (little
# padding) while every batch still mixes examples from across the shuffled epoch.
GROUP_BATCHES = 50


def epoch_order(n: int, seed: int, epoch: int, lengths: np.ndarray | None = None, batch_size: int = 1) -> np.ndarray:
    """The order of epoch `epoch`: a permutation drawn from (seed, epoch). With `lengths` (tokens per
    example), length-grouped: the permutation is cut into windows of GROUP_BATCHES batches, each
    sorted by length, the full batches are shuffled, the longest batch goes first (an out-of-memory
    error shows at step 1, not hours in) and the remainder (a partial batch) stays last."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is None:
        return order
    window = batch_size * GROUP_BATCHES
    order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                            for chunk in np.split(order, range(window, n, window))] or [order])
    full = n // batch_size
    batches = order[:full * batch_size].reshape(full, batch_size)[rng.permutation(full)]
    if full:
        longest = int(np.argmax(lengths[batches].max(axis=1)))
        batches[[0, longest]] = batches[[longest, 0]]
    return np.concatenate([batches.ravel(), order[full * batch_size:]])


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices for one epoch, optionally starting at batch `start_batch`.

    `lengths`, if given, groups examples of similar length into batches (`epoch_order`).
    `batch_size` is the global batch. With `world_size` > 1 each rank takes its slice of every
    global batch, so an optimizer step sees the same examples whatever the number of processes,
    and a run can resume with another world size. A final partial batch smaller than the world
    is dropped (every rank must take part in every step).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, lengths: np.ndarray | None = None):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.lengths = lengths

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch, self.lengths, self.batch_size)
        for b in range(self.start_batch, self.batches_per_epoch()):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            if len(batch) < self.world_size:
                return
            yield np.array_split(batch, self.world_size)[self.rank].tolist()

    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch (not to max_length): short texts stay cheap."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.as_tensor(np.asarray(example["input_ids"], dtype=np.int64))
        input_ids[row, :len(ids)] = ids
        attention_mask[row, :len(ids)] = 1
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
