import functools
import pickle

import numpy as np
import pytest
import torch

from flytetune.batches import EpochBatchSampler, collate
from flytetune.loader import BatchLoader, PackedBatch, StoreBatches, batch_loader
from flytetune.store import FeatureStore, write_store

N = 300


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, N)
    lengths[[3, 17]] = 0  # empty sequences are allowed in a store
    examples = [(rng.integers(1000, 30000, n).tolist(), int(rng.integers(-1, 17))) for n in lengths]
    path = tmp_path_factory.mktemp("loader") / "s"
    write_store(path, examples)
    return FeatureStore(path)


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype == torch.long, key
        assert got[key].shape == want[key].shape, key
        assert torch.equal(got[key], want[key]), key


def old_batches(store, sampler, pad_id):
    """The loader fit used before: one read per example, then `collate`."""
    return list(torch.utils.data.DataLoader(store, batch_sampler=sampler,
                                            collate_fn=functools.partial(collate, pad_id=pad_id)))


@pytest.mark.parametrize("pad_id", [0, 7])
def test_bulk_batch_equals_collate(store, pad_id):
    rng = np.random.default_rng(1)
    cases = [[0], [3], [3, 17], [17, 3, 3], [N - 1, 0, N - 1], list(range(N))]
    # Random batches, with repeats: the same example may appear twice in one list.
    cases += [rng.integers(0, N, rng.integers(1, 80)).tolist() for _ in range(40)]
    cases += [rng.permutation(N)[:64].tolist() for _ in range(10)]
    for indices in cases:
        assert_same(store.batch(indices, pad_id), collate([store[i] for i in indices], pad_id))
    # All empty: zero columns, as collate makes.
    assert store.batch([3, 17], pad_id)["input_ids"].shape == (2, 0)
    # numpy indices (a sampler's array slice) work as well as ints.
    assert_same(store.batch(np.array([5, 9]), pad_id), collate([store[5], store[9]], pad_id))


def test_bulk_batch_rejects_bad_indices(store):
    with pytest.raises(KeyError):
        store.batch([0, N], 0)
    with pytest.raises(KeyError):
        store.batch([-1, 2], 0)
    with pytest.raises(ValueError):
        store.batch([], 0)


@pytest.mark.parametrize("lengths", [False, True], ids=["shuffled", "length-grouped"])
def test_loader_yields_the_old_batches_and_resumes(store, lengths):
    by_length = store.lengths() if lengths else None
    sampler = functools.partial(EpochBatchSampler, N, 32, 4, 1, lengths=by_length)
    want = old_batches(store, sampler(), pad_id=5)
    got = list(batch_loader(store, sampler(), pad_id=5))
    assert len(got) == len(want) == 10
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    resumed = list(batch_loader(store, sampler(start_batch=6), pad_id=5))
    assert len(resumed) == 4
    for g, w in zip(resumed, want[6:], strict=True):
        assert_same(g, w)
    # One rank of two takes its half of every global batch, as before.
    for g, w in zip(batch_loader(store, sampler(rank=1, world_size=2), pad_id=5),
                    old_batches(store, sampler(rank=1, world_size=2), pad_id=5), strict=True):
        assert_same(g, w)


def test_loader_with_worker_processes(store):
    store[0]  # the parent holds an open environment before the workers fork
    sampler = functools.partial(EpochBatchSampler, N, 16, 2, 0, lengths=store.lengths())
    want = list(batch_loader(store, sampler(), pad_id=0))
    loader = batch_loader(store, sampler(start_batch=3), pad_id=0, num_workers=2, multiprocessing_context="fork",
                          generator=torch.Generator().manual_seed(1))
    got = list(loader)
    assert len(got) == len(want) - 3
    for g, w in zip(got, want[3:], strict=True):
        assert_same(g, w)
    assert loader.prefetch_factor > 2 and loader.batch_size is None
    # Batches cross from the workers packed in one numpy array (pickled), not as shared-memory tensors.
    raw = next(iter(super(BatchLoader, loader).__iter__()))
    assert isinstance(raw, PackedBatch) and isinstance(raw.data, np.ndarray)


def test_packed_batch_round_trip(store):
    for indices in ([5], [3, 17], [9, 1, 9, 250, 40]):
        batch = store.batch(indices, 2)
        packed = pickle.loads(pickle.dumps(PackedBatch(batch)))
        got = packed.unpack()
        assert_same(got, batch)
        assert all(t.is_contiguous() for t in got.values())


def test_dataset_pickles_without_a_handle(store):
    store[0]
    clone = pickle.loads(pickle.dumps(StoreBatches(store, 3)))
    assert set(vars(clone.store)) == {"path", "_len"}
    assert_same(clone[[1, 2]], collate([store[1], store[2]], 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_loader_pins_batches(store):
    batch = next(iter(batch_loader(store, EpochBatchSampler(N, 8, 0, 0), 0, num_workers=1, pin_memory=True)))
    assert all(t.is_pinned() for t in batch.values())
