"""Shard streaming: the shuffling loader vs a single-threaded contiguous copy of the same bytes.

Writes a shard set (2 GB: 6 shards of 2^18 tokens x d = 640 in float16, AIDO.Cell-100M's width; --quick:
51 MB) to a temporary directory, reads it once to put it in the page cache, then runs, in rounds, each
contender in its own fresh process (so none inherits another's mapped pages):
  reference  a plain contiguous copy of the same bytes into one reused batch-sized buffer, single-threaded, the
             faster of two ways: readinto() of every activation file front to back, and np.copyto from the
             file's memory map (the loader's own access path). On the 2-core AMD EPYC VM readinto ran at
             ~2.4 GB/s and the mapped copy ~6x faster, so a readinto-only reference flattered the loader;
  ours       `open_shards(dir).iter_batches(4096, shuffle=True, threads=t)` for t = 1 and 2 gather threads
             (chunk shuffle + mixing window + gather), and single-token shuffling (`block_tokens=1`) at t = 2.
speedup = reference time / our time (the minimum over rounds of each; acceptance: >= 0.6), and the thread
scaling = time(t=1) / time(t=2). Each of our processes samples its anonymous resident memory (RssAnon: what the
loader allocates, not the page cache it maps) after every batch: `peak_extra_anon_mb` is the peak over the
stream minus the value before it (acceptance: < 1 GB, whatever the set's size).

`gpu_demand` is arithmetic, not a measurement: the tokens/s an H100-class GPU's fused TopK step at d = 640,
F = 5,120 would consume, from the step's FLOPs per token and the GPU's stated fp32 peak (our Triton kernels run
fp32 products as exact IEEE fp32, on the CUDA cores), the bytes per second that is at fp16 shards, and the gather
threads it needs at the measured per-thread rate.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sae_fast.benchmarks.common import device_name, machine_load, record

BATCH = 4096

_CHILD = r"""
import json, sys, time
import numpy as np
from sae_fast import open_shards
from sae_fast.benchmarks.common import anon_rss_reader
from sae_fast.ops import row_gatherer

mode, path, threads, block = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
shards = open_shards(path)
files = [shards.path(i) for i in range(len(shards.shard_names))]
row_gatherer()  # load the C++ extension (a once-per-process cost) before the clock starts
anon = anon_rss_reader()
anon0 = anon()
peak = anon0
t0 = time.perf_counter()
if mode == "copy":
    buf = bytearray(BATCH * shards.d * 2)
    view = memoryview(buf)
    n = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while (got := fh.readinto(view)):
                n += got
elif mode == "mapcopy":
    out = np.empty(BATCH * shards.d * 2, np.uint8)
    n = 0
    for f in files:
        a = np.memmap(f, dtype=np.uint8, mode="r")
        for lo in range(0, len(a), len(out)):
            part = a[lo:lo + len(out)]
            np.copyto(out[:len(part)], part)
            n += len(part)
        del a
else:
    n = 0
    kw = {"block_tokens": block} if block else {}
    for x in shards.iter_batches(BATCH, shuffle=True, seed=0, threads=threads, **kw):
        n += x.shape[0]
        peak = max(peak, anon())
print(json.dumps({"seconds": time.perf_counter() - t0, "n": n, "peak_extra_anon": peak - anon0}))
""".replace("BATCH", str(BATCH))

# H100 SXM's stated dense fp32 (CUDA-core) peak, from NVIDIA's H100 datasheet; PCIe Gen5 x16 is ~64 GB/s per
# direction. Used only for the arithmetic in gpu_demand.
H100_FP32_FLOPS = 67e12
PCIE5_BYTES_S = 64e9


def _write(dir: Path, n_shards: int, per_shard: int, d: int) -> None:
    from sae_fast.activations import ShardWriter

    w = ShardWriter(dir, d, dtype="float16", shard_tokens=per_shard, meta={"model": "bench", "layer": 0})
    block = np.random.default_rng(0).standard_normal((per_shard, d), dtype=np.float32).astype(np.float16)
    ids = np.arange(per_shard)
    for _ in range(n_shards):
        w.add(block, ids, ids % 19264)
    w.close()


def _child(mode: str, path: Path, threads: int = 0, block: int = 0) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(path), str(threads), str(block)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loader bench child ({mode}, threads={threads}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_demand(d: int, F: int, k: int, per_thread_gb_s: float) -> dict:
    """Tokens/s a fused fp32 TopK step at the H100's stated fp32 peak would consume, and the loader it needs."""
    flops = 2 * d * F + 4 * 2 * k * d  # encoder GEMM + decode, its two gradients and the encoder gradient
    tokens_s = H100_FP32_FLOPS / flops
    need = tokens_s * d * 2  # fp16 shard bytes
    return {"note": "arithmetic from FLOPs and a stated peak rate, not a measurement",
            "flops_per_token": flops, "gpu_fp32_flops_per_s": H100_FP32_FLOPS,
            "tokens_per_s_at_peak": tokens_s, "shard_bytes_per_token": d * 2, "loader_gb_s_needed": need / 1e9,
            "pcie5_gb_s": PCIE5_BYTES_S / 1e9, "per_thread_gb_s_measured": per_thread_gb_s,
            "gather_threads_needed": math.ceil(need / 1e9 / per_thread_gb_s) if per_thread_gb_s > 0 else None}


def run(quick: bool = False) -> list[dict]:
    from sae_fast import open_shards

    d, per_shard, n_shards = 640, 2**18, (1 if quick else 6)
    if quick:
        per_shard = 40_000  # 51 MB
    tmp = Path(tempfile.mkdtemp(prefix="sae_fast_bench_loader_"))
    try:
        path = tmp / "s"
        _write(path, n_shards, per_shard, d)
        shards = open_shards(path)
        nbytes = shards.n_tokens * d * 2
        variants = {"copy": ("copy", 0, 0), "mapcopy": ("mapcopy", 0, 0), "t1": ("ours", 1, 0),
                    "t2": ("ours", 2, 0), "tokens": ("ours", 2, 1)}
        _child("copy", path)  # into the page cache
        load_before = machine_load()
        runs = {name: [] for name in variants}
        for _ in range(2 if quick else 5):
            for name, (mode, threads, block) in variants.items():
                got = _child(mode, path, threads, block)
                if mode == "ours":
                    assert got["n"] == shards.n_tokens, (name, got["n"], shards.n_tokens)
                runs[name].append(got)
        load = {"before": load_before, "after": machine_load()}
        best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
        ref = min(best["copy"], best["mapcopy"])
        copies = {"readinto_s": best["copy"], "memory_map_s": best["mapcopy"]}
        demand = gpu_demand(d, 5120, 32, nbytes / best["t1"] / 1e9)
        block = shards.loader(BATCH).block_tokens  # the loader's default shuffle unit at this width
        blocks = f"{block}-token ({block * d * 2 // 1024} KB) blocks"
        rows = []
        for name, threads, shuffle in [("t1", 1, blocks), ("t2", 2, blocks), ("tokens", 2, "single tokens")]:
            ours = best[name]
            extra = {"thread_scaling_1_to_2": best["t1"] / best["t2"]} if name == "t2" else {}
            if name == "t1":
                extra["gpu_demand"] = demand
            rows.append(record(
                "loader", {"gb": round(nbytes / 1e9, 3), "d": d, "dtype": "float16", "batch": BATCH,
                           "shuffle": shuffle, "threads": threads},
                device_name("cpu"), ours, ref,
                reference="single-threaded contiguous copy, own process: the faster of readinto and a memory-mapped "
                          "np.copyto", reference_copies_s=copies,
                ours_gb_s=nbytes / ours / 1e9, reference_gb_s=nbytes / ref / 1e9,
                peak_extra_anon_mb=max(r["peak_extra_anon"] for r in runs[name]) / 2**20,
                rounds=len(runs[name]), timing="minimum over rounds; each run a fresh process, contenders in turn",
                load=load, **extra))
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
