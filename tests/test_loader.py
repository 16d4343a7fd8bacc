"""The shuffling loader: every token once per epoch, mixing across shards, determinism, epochs, rank slices,
bounded memory."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from sae_fast import open_shards
from sae_fast.activations import ShardWriter
from sae_fast.activations.loader import ShardLoader
from sae_fast.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """1,003 tokens in 4 shards; token t has activation row t * ones and cell id t (ids identify tokens)."""
    d = tmp_path_factory.mktemp("loader") / "s"
    w = ShardWriter(d, 6, dtype="float32", shard_tokens=300)
    t = 0
    for n in (300, 301, 299, 103):
        ids = np.arange(t, t + n)
        w.add(np.repeat(ids[:, None], 6, 1).astype(np.float32), ids, ids % 50)
        t += n
    w.close()
    return open_shards(d)


@pytest.mark.parametrize("d, dtype, expect", [(6, "float32", 16), (640, "float16", 13), (2048, "float32", 2),
                                               (8192, "float32", 1)])
def test_default_block_is_16_tokens_at_most_16_kb(tmp_path, d, dtype, expect):
    """The shuffle unit: 16 consecutive tokens (as good as single tokens, bench/results/mixing_mini.json), fewer
    where 16 rows would pass 16 KB, and never less than one token."""
    w = ShardWriter(tmp_path / "s", d, dtype=dtype)
    w.add(np.zeros((3, d), dtype), np.zeros(3), np.zeros(3))
    w.close()
    loader = ShardLoader(open_shards(tmp_path / "s"), 2)
    assert loader.block_tokens == expect
    assert ShardLoader(open_shards(tmp_path / "s"), 2, block_tokens=5).block_tokens == 5


def tokens_of(batches):
    return np.concatenate([b[1].numpy() for b in batches])


@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize("batch_size", [64, 1000, 5000])
def test_every_token_exactly_once_per_epoch(shards, batch_size, block):
    batches = list(shards.iter_batches(batch_size, seed=3, with_ids=True, buffer_mb=0.005, chunk_tokens=16,
                                       block_tokens=block))
    sizes = [len(b[0]) for b in batches]
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert len(batches) == len(ShardLoader(shards, batch_size))
    got = tokens_of(batches)
    assert np.array_equal(np.sort(got), np.arange(shards.n_tokens))
    for x, cells, genes in batches:  # activations, cells and genes stay together
        assert torch.equal(x, cells[:, None].float().expand(-1, 6))
        assert torch.equal(genes.long(), cells % 50)


def test_shuffle_mixes_shards_and_is_deterministic_per_seed_and_epoch(shards):
    kw = dict(with_ids=True, buffer_mb=0.005, chunk_tokens=16, block_tokens=1)
    a = tokens_of(shards.iter_batches(100, seed=1, **kw))
    assert np.array_equal(a, tokens_of(shards.iter_batches(100, seed=1, **kw)))
    assert not np.array_equal(a, tokens_of(shards.iter_batches(100, seed=2, **kw)))
    assert not np.array_equal(a, tokens_of(shards.iter_batches(100, seed=1, epoch=1, **kw)))
    first = next(shards.iter_batches(100, seed=1, **kw))[1].numpy()
    shard_of = np.searchsorted(shards.offsets, first, "right") - 1
    assert len(set(shard_of.tolist())) >= 3  # one batch draws from several shards
    seq = tokens_of(shards.iter_batches(100, shuffle=False, **kw))
    assert np.array_equal(seq, np.arange(shards.n_tokens))  # unshuffled = file order


def test_epochs_advance_and_set_epoch_replays(shards):
    loader = shards.loader(128, seed=5, buffer_mb=0.005, chunk_tokens=16)
    e0 = torch.cat(list(loader))
    e1 = torch.cat(list(loader))
    assert loader.epoch == 2 and not torch.equal(e0, e1)
    assert e0.dtype == torch.float32 and e0.shape == (shards.n_tokens, 6)
    loader.set_epoch(1)
    assert torch.equal(torch.cat(list(loader)), e1)  # a resumed trainer replays epoch 1 exactly
    loader.set_epoch(0)
    it = iter(loader)
    next(it)
    assert loader.epoch == 0  # an unfinished pass does not advance the epoch


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_every_global_batch(shards, world_size):
    kw = dict(seed=7, with_ids=True, buffer_mb=0.005, chunk_tokens=16)
    full = list(shards.iter_batches(96, **kw))
    parts = [list(shards.iter_batches(96, rank=r, world_size=world_size, **kw)) for r in range(world_size)]
    assert len({len(p) for p in parts}) == 1  # same number of steps on every rank
    for step in range(len(parts[0])):
        together = np.sort(np.concatenate([p[step][1].numpy() for p in parts]))
        if step < len(full) - 1:
            assert np.array_equal(together, np.sort(full[step][1].numpy()))
        else:  # the last partial batch is cut to a multiple of the ranks
            assert len(together) == len(full[step][1]) // world_size * world_size
        assert len({len(p[step][1]) for p in parts}) == 1
    with pytest.raises(UserError, match="not divisible by the 2 ranks"):
        ShardLoader(shards, 95, rank=0, world_size=2)


def test_open_shards_object_is_a_training_source(shards):
    shards.batch_size = 200
    batches = list(shards)
    assert [len(b) for b in batches] == [200] * 5 + [3] and batches[0].dtype == torch.float32


RSS_PROG = """
import os, sys
from sae_fast import open_shards
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
s = open_shards(sys.argv[1])
base, peak, n = rss(), 0, 0
for x in ({mode}):
    n += len(x)
    peak = max(peak, rss() - base)
assert n == s.n_tokens
print(peak // 2 ** 20)
"""


def _peak_mb(path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_PROG.replace("{mode}", mode), str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_loader_memory_is_bounded_by_its_window(tmp_path):
    """Streaming 128 MB through an 8 MB window grows the resident set by far less than the data; keeping the
    memory map resident (the naive way) grows it by the full 128 MB, so the test can fail."""
    d, per = 256, 2 ** 15  # 8 shards x 16 MB of float16
    w = ShardWriter(tmp_path / "s", d, shard_tokens=per)
    block = np.random.default_rng(0).standard_normal((per, d)).astype(np.float16)
    for _ in range(8):
        w.add(block, np.zeros(per), np.zeros(per))
    w.close()
    ours = _peak_mb(tmp_path / "s", "s.iter_batches(4096, seed=0, buffer_mb=8)")
    naive = _peak_mb(tmp_path / "s", f"(s.array(i)[j:j + 4096].copy() for i in range(8) "
                     f"for j in range(0, {per}, 4096))")
    assert ours < 64, ours
    assert naive > 100, naive


def test_shards_object_reshuffles_per_epoch_when_told(shards):
    shards.batch_size = 100
    shards.set_epoch(0)
    a = next(iter(shards))
    shards.set_epoch(1)
    b = next(iter(shards))
    shards.set_epoch(0)
    assert not torch.equal(a, b) and torch.equal(a, next(iter(shards)))


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_give_the_same_batches_in_the_same_order(shards, threads):
    kw = dict(seed=5, with_ids=True, buffer_mb=0.005, chunk_tokens=16)
    inline = list(shards.iter_batches(64, threads=0, **kw))
    pooled = list(shards.iter_batches(64, threads=threads, **kw))
    assert len(pooled) == len(inline)
    for a, b in zip(inline, pooled):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_threaded_stream_can_stop_early(shards):
    it = shards.iter_batches(64, threads=2, buffer_mb=0.005, chunk_tokens=16)
    first = next(it)
    it.close()  # the pool shuts down, nothing hangs
    assert first.shape == (64, 6)


def test_negative_threads_refused(shards):
    with pytest.raises(UserError, match="threads"):
        shards.loader(64, threads=-1)


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_batch_arrays_are_reused_only_once_released(shards, threads):
    """The loader recycles batch arrays (no fresh pages per batch) but never one the consumer still holds: batches
    kept in a list and batches dropped as they come hold the same tokens, and a streamed epoch allocates only a
    few arrays."""
    kw = dict(with_ids=True, buffer_mb=0.005, chunk_tokens=16, block_tokens=2, threads=threads)
    held = list(shards.iter_batches(50, seed=5, **kw))
    for x, cells, _ in held:  # nothing overwritten: every row still matches its token
        assert torch.equal(x, cells[:, None].float().expand(-1, 6))
    loader = ShardLoader(shards, 50, seed=5, **kw)
    streamed = []
    for x, cells, _ in loader:
        assert torch.equal(x, cells[:, None].float().expand(-1, 6))
        streamed.append(cells.clone())
        del x
    assert torch.equal(torch.cat(streamed), torch.cat([c for _, c, _ in held]))
    assert len(loader._pool.arrays) <= loader.threads + 4


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_row_gatherer_equals_fancy_indexing_of_the_stacked_shards(backend):
    """Both gather kernels against numpy on fresh random shards: odd row widths, an empty shard, runs across a
    shard edge, unsorted, touching and repeated runs, runs long enough for the streaming stores at odd alignments,
    empty runs, no runs; the C++ one refuses runs outside the shards and an out of the wrong size."""
    from sae_fast.ops import row_gatherer

    gather = row_gatherer(backend)
    rng = np.random.default_rng()
    for dtype, width in [(np.float16, (7,)), (np.float16, (640,)), (np.float32, (1,)), (np.int64, ()),
                         (np.int32, ())]:
        sizes = [int(n) for n in rng.integers(0, 40, 5)] + [0, 9]
        arrays = [rng.standard_normal((n, *width)).astype(dtype) if dtype in (np.float16, np.float32)
                  else rng.integers(-2**30, 2**30, n).astype(dtype) for n in sizes]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        every = np.concatenate(arrays)
        edge = int(offsets[1])
        starts = rng.integers(0, len(every), 60)  # in any order: out holds the runs by start
        lengths = np.minimum(rng.integers(0, 6, 60), len(every) - starts)
        for s, n in [(starts, lengths), ([max(edge - 3, 0)], [min(6, len(every) - max(edge - 3, 0))]),
                     ([5, 2, 5, 9, 7], [4, 3, 0, 2, 2]), ([], [])]:
            s, n = np.asarray(s, np.int64), np.asarray(n, np.int64)
            order = np.argsort(s, kind="stable")
            rows = np.concatenate([np.arange(a, a + m) for a, m in zip(s[order], n[order])] + [np.zeros(0, np.int64)])
            out = np.full((len(rows) + 1, *width), 7, dtype)[1:]  # an odd address for the streaming stores
            gather(arrays, offsets, s, n, out)
            assert np.array_equal(out, every[rows]), (dtype, s, n)
    if backend == "cpp":
        for s, n in (([len(every) - 1], [2]), ([-1], [1]), ([0], [-1])):
            with pytest.raises(RuntimeError, match="outside the shards' rows"):
                gather(arrays, offsets, np.array(s), np.array(n), np.empty(max(sum(n), 0), every.dtype))
        with pytest.raises(RuntimeError, match="must hold 3 rows"):
            gather(arrays, offsets, np.array([0]), np.array([3]), np.empty(2, every.dtype))

