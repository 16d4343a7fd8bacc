"""Streaming shards into the trainer: a shuffle across shards whose memory does not grow with the data set.

Each epoch, the tokens are cut into chunks of `chunk_tokens` contiguous tokens (never crossing a shard) and
the chunks are put in a random order. Consecutive chunks form a mixing window of `buffer_mb` megabytes of
activations; the window's chunks are cut into blocks of `block_tokens` consecutive tokens (by default 16
tokens, fewer where 16 rows would pass 16 KB: 16 at d = 128 or 512 in float16, 13 at d = 640; `block_tokens=1`
shuffles single tokens, at ~0.6x the speed: a random gather is bound by memory latency), the blocks are put in
a random order and batches are cut from them (tokens that do not fill a whole batch are carried into the next
window). The plan is made of runs of consecutive tokens, never token by token. A batch is then gathered with one
copy straight from the memory-mapped shards into its tensor, its runs sorted so that the reads walk forward
through the files (`ops.row_gatherer`: C++, one copy per run with streaming stores and the GIL released; numpy's
take where the extension does not build).
After each window its chunks' mapped pages are released (`Shards.release`), so the resident set stays near the
window plus a few MB per chunk (the kernel maps whole page-cache folios around each touched row: ~200 MB at
the defaults, 32 MB windows of 1 MB chunks), whatever the size of the shard set. Every batch mixes tokens
from ~window/chunk places (32 at the defaults) spread over the whole data set; a larger `buffer_mb` mixes
more widely for more memory. The order is a pure function of (seed, epoch): two passes with the same pair
are identical, and each epoch reshuffles.

Distributed: the stream of global batches does not depend on the number of ranks. With `world_size` N (taken
from torch.distributed when it is initialised), rank r yields rows [r*B/N, (r+1)*B/N) of every global batch of
B rows, so N ranks averaging gradients take the same steps as one process with batch B, and each rank reads
only its own rows (the shard set is partitioned by rank, row by row). The final partial batch is cut to a
multiple of N so that every rank takes the same number of steps.

Threads: batches are gathered by `threads` worker threads (the gather releases the GIL), up to `threads + 1`
batches ahead of the consumer, so that the copy overlaps the training step and scales with cores; the order of
the batches does not depend on the thread count. `threads=0` gathers in the consumer's thread. Batch arrays are
recycled once the consumer has dropped them (`_BufferPool`): a fresh array per batch made the kernel fault in and
zero 5 MB of pages per batch, as much work as the gather itself.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from sae_fast.activations.distributed import world
from sae_fast.activations.shards import Shards
from sae_fast.errors import UserError
from sae_fast.ops import row_gatherer


class _Window(NamedTuple):
    """A marker in an epoch's plan: the window's batches are all planned; `chunks` are its [n, 2] token ranges,
    whose pages `Shards.release` drops once those batches are gathered."""

    chunks: np.ndarray


class _Runs(NamedTuple):
    """Runs of consecutive global token ids: [starts[i], starts[i] + lengths[i])."""

    starts: np.ndarray
    lengths: np.ndarray


def _cut(runs: _Runs, ends: np.ndarray, lo: int, hi: int) -> _Runs:
    """Tokens [lo, hi) of the runs laid end to end (`ends`: the cumulative lengths), as runs."""
    if hi <= lo:
        return _Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
    i, k = int(np.searchsorted(ends, lo, "right")), int(np.searchsorted(ends, hi, "left"))
    starts, lengths = runs.starts[i:k + 1].copy(), runs.lengths[i:k + 1].copy()
    head = lo - (int(ends[i]) - int(lengths[0]))
    starts[0] += head
    lengths[0] -= head
    lengths[-1] -= int(ends[k]) - hi
    return _Runs(starts, lengths)


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty on a 64-byte (cache line) boundary, so that the gather streams whole lines (numpy's large blocks
    start 16 bytes into a page)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip:skip + n].view(dtype).reshape(shape)


class _BufferPool:
    """Batch arrays handed out again once the consumer has let go of them.

    A fresh 5 MB batch array costs as much as the gather itself: its pages are faulted in and zeroed by the
    kernel (glibc returns large blocks to the system between batches). The pool keeps up to `cap` arrays and
    reuses one only when nothing but the pool refers to it (CPython's reference count: a tensor made by
    torch.from_numpy, and every view of either, holds a reference), so a batch the consumer still holds is never
    overwritten."""

    def __init__(self, cap: int):
        self.cap, self.arrays, self.lock = cap, [], threading.Lock()

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        arrays = self.arrays
        with self.lock:
            # sys.getrefcount(arrays[i]) == 2 when free: the pool's list and getrefcount's own argument
            free = [i for i in range(len(arrays)) if sys.getrefcount(arrays[i]) == 2]
            for i in free:
                if arrays[i].shape == shape and arrays[i].dtype == dtype:
                    return arrays[i]
            out = _aligned_empty(shape, dtype)
            if len(arrays) < self.cap:
                arrays.append(out)
            elif free:  # full: the slot of an unused array of another shape
                arrays[free[0]] = out
            return out


class ShardLoader:
    """A re-iterable source of token batches from a `Shards` directory (see the module docstring).

    Each `iter()` is one epoch; the epoch counter advances after every complete pass, and `set_epoch(e)` sets
    it (the trainer calls it when resuming so that epoch e is shuffled exactly as in an uninterrupted run)."""

    def __init__(self, shards: Shards, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, buffer_mb: float = 32, chunk_tokens: int | None = None,
                 with_ids: bool = False, dtype: torch.dtype | None = None, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, block_tokens: int | None = None,
                 threads: int | None = None):
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.shards, self.batch_size, self.shuffle, self.seed = shards, int(batch_size), shuffle, seed
        self.epoch, self.with_ids, self.dtype, self.drop_last = epoch, with_ids, dtype, drop_last
        # gather threads: by default one per 4 cores, 1 to 4 (the rest stay with torch, which trains meanwhile; on
        # the 2-core bench machine a second thread streamed 1.28x faster, bench/results/loader.json)
        self.threads = min(4, max(1, (os.cpu_count() or 1) // 4)) if threads is None else int(threads)
        if self.threads < 0:
            raise UserError(f"threads must be >= 0 (0 = gather in the consumer's thread), got {threads}")
        row_bytes = shards.d * np.dtype(shards.array(0).dtype).itemsize if shards.n_tokens else 1
        # shuffle unit: 16 consecutive tokens, or fewer where that would pass 16 KB; 1 = every token on its own.
        # 16-token blocks trained SAEs as good as single tokens (FVU within 0.1%, dead features 1.1% vs 0.8%: 8
        # seeds, bench/results/mixing_mini.json); at d = 640, 13-token (16 KB) blocks streamed 0.65 of a contiguous
        # copy on 2 threads where 4-token (5 KB) ones reached 0.54 (bench/results/loader.json, docs/bench.md)
        self.block_tokens = max(1, int(block_tokens or min(16, -(-16384 // row_bytes))))
        r, n = world()
        self.rank, self.world_size = (r if rank is None else rank), (n if world_size is None else world_size)
        if self.batch_size % self.world_size:
            raise UserError(f"batch_size {batch_size} is not divisible by the {self.world_size} ranks; "
                            "choose a multiple of the number of processes")
        self.chunk_tokens = int(chunk_tokens or max(1, (1 << 20) // row_bytes))  # ~1 MB chunks
        # a window holds at least a batch and a chunk, so that every window yields a batch
        self.buffer_tokens = max(int(buffer_mb * 2**20 // row_bytes), self.batch_size + self.chunk_tokens)
        # batch arrays in flight: threads + 1 gathered ahead, the one the consumer holds, and slack for a consumer
        # that keeps one more (a pool that runs out just allocates)
        self._pool = _BufferPool(self.threads + 4)
        self._mapped: dict[str, list[np.ndarray]] = {}  # every shard's mapped acts (cells, genes), by _prepare
        self._gather = None  # ops.row_gatherer(), resolved by _prepare

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def n_tokens(self) -> int:
        """Rows this rank yields per epoch (what the trainer sizes its schedule by)."""
        full, rest = divmod(self.shards.n_tokens, self.batch_size)
        return full * self.batch_size // self.world_size + (0 if self.drop_last else rest // self.world_size)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(self.shards.n_tokens, self.batch_size)
        return full + (not self.drop_last and rest // self.world_size > 0)

    def _chunks(self, rng: np.random.Generator | None) -> np.ndarray:
        """[n_chunks, 2] global (start, stop) token ranges, in random order if shuffling."""
        parts = [np.stack([st, np.minimum(st + self.chunk_tokens, hi)], 1)
                 for lo, hi in zip(self.shards.offsets[:-1], self.shards.offsets[1:])
                 for st in [np.arange(lo, hi, self.chunk_tokens)]]
        chunks = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
        return chunks[rng.permutation(len(chunks))] if rng is not None else chunks

    def __iter__(self):
        epoch = self.epoch
        self._prepare()
        if self.threads == 0:
            for rows in self._epoch(epoch):
                if isinstance(rows, _Window):
                    self.shards.release(rows.chunks)
                else:
                    yield self._batch(rows)
        else:
            yield from self._threaded(epoch)
        self.epoch = epoch + 1

    def _threaded(self, epoch: int):
        """The epoch's batches gathered by a pool of `threads`, at most threads + 1 in flight, in plan order. A
        window's pages are released by a worker too, once its batches are in: the consumer never waits on it
        (on 2 cores a release in the consumer's thread held back the next batches' submission)."""
        pending: deque = deque()
        releases: deque = deque()
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sae_fast_loader")

        def drain_one():
            head = pending.popleft()
            if not isinstance(head, _Window):
                return head.result()
            # its batches are all gathered; unmapping a page another worker reads would only re-fault it
            releases.append(pool.submit(self.shards.release, head.chunks))
            while releases and releases[0].done():
                releases.popleft().result()  # raises what a release raised
            return None

        try:
            for rows in self._epoch(epoch):
                pending.append(rows if isinstance(rows, _Window) else pool.submit(self._batch, rows))
                while sum(not isinstance(f, _Window) for f in pending) > self.threads:
                    if (batch := drain_one()) is not None:
                        yield batch
            while pending:
                if (batch := drain_one()) is not None:
                    yield batch
            while releases:
                releases.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _epoch(self, epoch: int):
        """The epoch's plan: each batch (this rank's part) as `_Runs` of consecutive global token ids, and a
        `_Window` (its chunks) after each window's batches. Planned in blocks, never token by token."""
        rng = np.random.default_rng([self.seed, epoch]) if self.shuffle else None
        chunks = self._chunks(rng)
        sizes = chunks[:, 1] - chunks[:, 0]
        B, N = self.batch_size, self.world_size
        lo, hi = self.rank * B // N, (self.rank + 1) * B // N
        before = np.concatenate([[0], np.cumsum(sizes)])  # tokens in the chunks before chunk j
        carry = _Runs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        j = 0
        while True:  # the window: as many whole chunks as fit beside the carry
            first, room = j, self.buffer_tokens - int(carry.lengths.sum())
            j = int(np.searchsorted(before, before[first] + room, "right")) - 1
            blocks = self._blocks(chunks[first:j])
            runs = _Runs(*(np.concatenate([c, b]) for c, b in zip(carry, blocks)))
            if rng is not None:
                order = rng.permutation(len(runs.starts))
                runs = _Runs(runs.starts[order], runs.lengths[order])
            ends = np.cumsum(runs.lengths)
            total = int(ends[-1]) if len(ends) else 0
            n_full = total // B
            for b in range(n_full):
                yield _cut(runs, ends, b * B + lo, b * B + hi)
            carry = _cut(runs, ends, n_full * B, total)  # its pages are released with this window's, and re-faulted
            yield _Window(chunks[first:j])
            if j == len(chunks):
                m = (total - n_full * B) // N
                if m and not self.drop_last:
                    yield _cut(runs, ends, n_full * B + self.rank * m, n_full * B + (self.rank + 1) * m)
                    yield _Window(chunks[first:j])
                return

    def _blocks(self, chunks: np.ndarray) -> _Runs:
        """The chunks' tokens as runs of `block_tokens` consecutive ids (each chunk's last one may be shorter)."""
        g = self.block_tokens
        per = -(-(chunks[:, 1] - chunks[:, 0]) // g)
        # block i of the window, the j-th of its chunk c, starts at chunk_start[c] + j g = (chunk_start[c] -
        # first_block[c] g) + i g
        starts = np.repeat(chunks[:, 0] - (np.cumsum(per) - per) * g, per) + np.arange(0, int(per.sum()) * g, g)
        return _Runs(starts, np.minimum(g, np.repeat(chunks[:, 1], per) - starts))

    def _batch(self, runs: _Runs):
        """Gather a batch's runs of tokens with one copy from the mapped shards (`ops.row_gatherer`), in order of
        their starts (the order inside a batch is irrelevant to training, and forward reads are faster)."""
        s = self.shards
        starts, lengths = runs
        n = int(lengths.sum())
        acts = self._pool.empty((n, s.d), s.array(0).dtype)
        self._gather(self._mapped["acts"], s.offsets, starts, lengths, acts)
        x = s.as_tensor(acts)
        if self.dtype is not None:
            x = x.to(self.dtype)
        if not self.with_ids:
            return x
        cells, genes = np.empty(n, np.int64), np.empty(n, np.int32)
        self._gather(self._mapped["cells"], s.offsets, starts, lengths, cells)
        self._gather(self._mapped["genes"], s.offsets, starts, lengths, genes)
        return x, torch.from_numpy(cells), torch.from_numpy(genes)

    def _prepare(self) -> None:
        """Map every shard and resolve the gather kernel (which may build the C++ extension) in the consumer's
        thread, before any worker runs."""
        if self._gather is None:
            self._gather = row_gatherer()
        for name in ("acts", "cells", "genes") if self.with_ids else ("acts",):
            if name not in self._mapped:
                self._mapped[name] = [self.shards.array(i, name) for i in range(len(self.shards.shard_names))]
