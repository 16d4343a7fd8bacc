"""Shard streaming: the shuffling loader vs a plain sequential numpy memmap copy of the same bytes.

Writes a shard set (2 GB: 6 shards of 2^18 tokens x d = 640 in float16, AIDO.Cell-100M's width; --quick:
200 MB) to a temporary directory, reads it once to put it in the page cache, then times, interleaved and
repeated:
  reference  every shard memory-mapped with numpy and copied out sequentially in batch-sized pieces;
  ours       `open_shards(dir).iter_batches(4096, shuffle=True)`: chunk shuffle + mixing window + gather.
speedup = reference time / our time (acceptance: >= 0.5). A second row shuffles single tokens
(`block_tokens=1`) instead of the default 4 KB blocks. The loader's peak RSS (streaming the whole set in a
fresh process, interpreter and torch included) is reported as `loader_peak_rss_mb` (acceptance: < 1 GB,
whatever the set's size).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from sae_fast.benchmarks.common import device_name, peak_rss_of, record

BATCH = 4096


def _write(dir: Path, n_shards: int, per_shard: int, d: int) -> None:
    from sae_fast.activations import ShardWriter

    w = ShardWriter(dir, d, dtype="float16", shard_tokens=per_shard, meta={"model": "bench", "layer": 0})
    block = np.random.default_rng(0).standard_normal((per_shard, d), dtype=np.float32).astype(np.float16)
    ids = np.arange(per_shard)
    for _ in range(n_shards):
        w.add(block, ids, ids % 19264)
    w.close()


def _reference(shards) -> int:
    n = 0
    for i in range(len(shards.shard_names)):
        mm = np.load(shards.path(i), mmap_mode="r")
        for lo in range(0, len(mm), BATCH):
            n += len(np.array(mm[lo:lo + BATCH]))
    return n


def _ours(shards, **kw) -> int:
    return sum(len(x) for x in shards.iter_batches(BATCH, shuffle=True, seed=0, **kw))


def _peak_rss(dir: Path) -> int:
    """Peak RSS in bytes of a whole fresh Python process (torch imported) that streams the set."""
    return peak_rss_of("from sae_fast import open_shards\n"
                       f"for x in open_shards({str(dir)!r}).iter_batches({BATCH}, seed=0): pass", baseline=False)


def run(quick: bool = False) -> list[dict]:
    from sae_fast import open_shards

    d, per_shard, n_shards = 640, 2**18, (1 if quick else 6)
    if quick:
        per_shard = 40_000  # 51 MB
    tmp = Path(tempfile.mkdtemp(prefix="sae_fast_bench_loader_"))
    try:
        _write(tmp / "s", n_shards, per_shard, d)
        shards = open_shards(tmp / "s")
        nbytes = shards.n_tokens * d * 2
        _reference(shards)  # into the page cache
        variants = {"blocks": {}, "tokens": {"block_tokens": 1}}
        times = {"reference": [], **{k: [] for k in variants}}
        for _ in range(2 if quick else 3):
            for name, fn in [("reference", lambda: _reference(shards)),
                             *[(k, lambda kw=kw: _ours(shards, **kw)) for k, kw in variants.items()]]:
                t0 = time.perf_counter()
                assert fn() == shards.n_tokens
                times[name].append(time.perf_counter() - t0)
        rss = _peak_rss(tmp / "s")
        ref = statistics.median(times["reference"])
        rows = []
        for name in variants:
            ours = statistics.median(times[name])
            shuffle = "4 KB blocks" if name == "blocks" else "single tokens"
            rows.append(record("loader", {"gb": round(nbytes / 1e9, 2), "d": d, "dtype": "float16",
                                          "batch": BATCH, "shuffle": shuffle},
                               device_name("cpu"), ours, ref, ours_gb_s=nbytes / ours / 1e9,
                               reference_gb_s=nbytes / ref / 1e9, loader_peak_rss_mb=rss / 2**20))
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
