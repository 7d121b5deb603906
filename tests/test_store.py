import functools
import pickle
import shutil

import numpy as np
import pytest
import torch

from flytetune import store as store_module
from flytetune.batches import EpochBatchSampler, collate
from flytetune.store import FeatureStore, write_store

EXAMPLES = [([101, 7 + i, 102], i % 4) for i in range(50)]


@pytest.fixture
def store(tmp_path):
    write_store(tmp_path / "s", EXAMPLES)
    return FeatureStore(tmp_path / "s")


def test_dict_like_api(store):
    assert len(store) == 50
    assert list(store) == list(range(50))
    assert 3 in store and 50 not in store
    item = store[7]
    assert item["label"] == 3 and item["input_ids"].tolist() == [101, 14, 102]
    with pytest.raises(KeyError):
        store[50]
    assert store.labels().tolist() == [i % 4 for i in range(50)]


def test_write_is_atomic_and_never_overwrites(tmp_path):
    write_store(tmp_path / "s", EXAMPLES)
    with pytest.raises(FileExistsError):
        write_store(tmp_path / "s", EXAMPLES)

    def failing():
        yield [1, 2], 0
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_store(tmp_path / "t", failing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "no partial store is left behind"


def test_opens_lazily_and_pickles_without_handle(store):
    assert not store.is_open_here()
    store[0]
    assert store.is_open_here()
    clone = pickle.loads(pickle.dumps(store))
    assert set(vars(clone)) == {"path", "_len"} and clone[7]["label"] == 3


def test_a_store_written_again_at_the_same_path_is_read_anew(tmp_path):
    # A retry re-downloads prepared data into the same work folder in the same process.
    write_store(tmp_path / "s", [([1, 2], 0)])
    assert FeatureStore(tmp_path / "s")[0]["label"] == 0
    shutil.rmtree(tmp_path / "s")
    write_store(tmp_path / "s", [([1, 2], 5), ([3], 6)])
    again = FeatureStore(tmp_path / "s")
    assert len(again) == 2 and again[0]["label"] == 5


def test_a_deleted_store_does_not_block_a_new_one_that_reuses_its_inode(tmp_path):
    """lmdb refuses to open files whose inode an open environment holds; the file system reuses
    the inodes of a deleted store for new files. Simulated: the old store's lock file (stores
    prepared by earlier versions carry one) is moved, same inode, to become the new store's data."""
    write_store(tmp_path / "old", [([1, 2], 0)])
    (tmp_path / "old" / "lock.mdb").write_bytes(b"")
    assert FeatureStore(tmp_path / "old")[0]["label"] == 0
    write_store(tmp_path / "src", [([3, 4], 7)])
    shutil.copyfile(tmp_path / "src" / "data.mdb", tmp_path / "old" / "lock.mdb")  # keeps the inode
    (tmp_path / "new").mkdir()
    (tmp_path / "old" / "lock.mdb").rename(tmp_path / "new" / "data.mdb")
    shutil.rmtree(tmp_path / "old")
    assert FeatureStore(tmp_path / "new")[0]["label"] == 7


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_each_open_the_store(store, context):
    store[0]  # the parent holds an open environment before workers start: the fork hazard
    sampler = EpochBatchSampler(len(store), 8, seed=1, epoch=0)
    loader = torch.utils.data.DataLoader(
        store, batch_sampler=sampler, num_workers=2, multiprocessing_context=context,
        collate_fn=functools.partial(collate, pad_id=0),
    )
    seen = []
    for batch in loader:
        seen.extend(batch["labels"].tolist())
    assert sorted(seen) == sorted(i % 4 for i in range(50))


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an lmdb feature store"):
        FeatureStore(tmp_path)


def test_epoch_order_resumes_and_shards():
    full = list(EpochBatchSampler(50, 8, seed=5, epoch=2))
    assert list(EpochBatchSampler(50, 8, seed=5, epoch=2, start_batch=3)) == full[3:]
    # Each rank takes its slice of every global batch: a step sees the same examples at any world size.
    ranks = [list(EpochBatchSampler(50, 8, seed=5, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == full
    assert list(EpochBatchSampler(50, 8, seed=5, epoch=2, rank=1, world_size=2, start_batch=3)) == ranks[1][3:]
    # 50 = 6 x 8 + 2: the last batch of 2 splits across 2 ranks, but not across 4.
    assert len(EpochBatchSampler(50, 8, seed=5, epoch=2, world_size=4)) == 6
    assert sorted(i for b in full for i in b) == list(range(50))
    assert full != list(EpochBatchSampler(50, 8, seed=5, epoch=3))


def test_collate_pads_dynamically():
    batch = collate([{"input_ids": np.array([1, 2, 3]), "label": 1}, {"input_ids": np.array([4]), "label": 0}], 0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_length_grouped_order_resumes_shards_and_pads_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 65, 1000)
    grouped = list(EpochBatchSampler(1000, 32, seed=5, epoch=2, lengths=lengths))
    assert sorted(i for b in grouped for i in b) == list(range(1000)), "every example once"
    assert grouped == list(EpochBatchSampler(1000, 32, seed=5, epoch=2, lengths=lengths)), "drawn from the seed"
    assert grouped[7:] == list(EpochBatchSampler(1000, 32, seed=5, epoch=2, lengths=lengths, start_batch=7))
    ranks = [list(EpochBatchSampler(1000, 32, seed=5, epoch=2, rank=r, world_size=2, lengths=lengths)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == grouped
    assert grouped != list(EpochBatchSampler(1000, 32, seed=5, epoch=3, lengths=lengths))

    def padding_share(batches):
        padded = sum(len(b) * lengths[b].max() for b in batches)
        return 1 - sum(lengths[b].sum() for b in batches) / padded

    plain = list(EpochBatchSampler(1000, 32, seed=5, epoch=2))
    assert padding_share(grouped) < 0.1 < 0.4 < padding_share(plain)
    assert lengths[grouped[0]].max() == lengths.max(), "the longest batch first: out of memory at step 1"
    assert len(grouped[-1]) == 1000 % 32, "the partial batch last"
    # Batches are not in length order: consecutive steps see short and long batches.
    tops = [int(lengths[b].max()) for b in grouped[1:-1]]
    assert tops != sorted(tops) and tops != sorted(tops, reverse=True)


def test_store_lengths_are_token_counts(tmp_path):
    write_store(tmp_path / "s", [([1, 2, 3], 0), ([4], 1), ([], 2), (list(range(70)), 3)])
    assert FeatureStore(tmp_path / "s").lengths().tolist() == [3, 1, 0, 70]


def short_examples(n):
    """A generator, not a list: it has no len(), and write_store may hold only a batch of it."""
    for i in range(n):
        yield [101, 1000 + i % 29000, 102][: 1 + i % 3], i % 5


def test_write_streams_a_generator_in_bounded_memory(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(store_module, "WRITE_BATCH", 2000)
    n = 300_000
    tracemalloc.start()
    try:
        assert write_store(tmp_path / "s", short_examples(n)) == n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # All the records at once are > 15 MB of Python objects; a batch of 2,000 is about 0.1 MB.
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB of Python objects: the examples are held, not streamed"
    store = FeatureStore(tmp_path / "s")
    assert len(store) == n
    assert store.lengths().tolist() == [1 + i % 3 for i in range(n)]
    assert store.labels().tolist() == [i % 5 for i in range(n)]
    assert store[123_457]["input_ids"].tolist() == [101, 1000 + 123_457 % 29000]


def test_write_commits_keys_in_order_and_grows_the_map(tmp_path, monkeypatch):
    import lmdb

    # A tiny first map and an estimate that falls short: the map must grow, and a batch that
    # did not fit is retried, not lost or duplicated.
    monkeypatch.setattr(store_module, "WRITE_BATCH", 777)
    monkeypatch.setattr(store_module, "_INITIAL_MAP_SIZE", 1 << 15)
    monkeypatch.setattr(store_module, "_RECORD_OVERHEAD", -20)
    n = 20_000
    assert write_store(tmp_path / "s", short_examples(n)) == n
    env = lmdb.open(str(tmp_path / "s"), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            keys = [store_module._KEY.unpack(k)[0] for k, _ in txn.cursor()]
    finally:
        env.close()
    assert keys == list(range(n))
    store = FeatureStore(tmp_path / "s")
    assert [store[i]["label"] for i in (0, 776, 777, 19_999)] == [0, 776 % 5, 777 % 5, 19_999 % 5]


def test_failure_after_some_commits_leaves_no_store(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "WRITE_BATCH", 100)
    consumed = 0

    def failing():
        nonlocal consumed
        for example in short_examples(1000):
            consumed += 1
            yield example
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_store(tmp_path / "s", failing())
    assert consumed == 1000, "ten batches were committed before the failure"
    assert list(tmp_path.iterdir()) == [], "no store, complete or partial, and no temporary folder"
