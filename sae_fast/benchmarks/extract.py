"""Extraction overhead: `extract(...)` vs a plain forward to the same layer over the same cells, same process.

The reference is the loop extraction cannot avoid: `model.prepare(adata)` and `model.forward(batch, layer=L,
stop=True)` for every batch of 8 cells, under `torch.inference_mode`. Ours is `sae_fast.extract` with every
gene token (`tokens="all"`) written as float16 shards to a temporary directory (token selection, the
device-to-host copy, fp16 conversion, CRC-32, atomic writes and manifests included). Model: the embedded
`mini` (the AIDO.Cell code path) over the first 360 cells of `sae_fast.datasets.pbmc3k()`, at its middle
layer; --quick uses 16 cells. speedup = reference / ours, so the acceptance "extraction <= 1.15x a plain
forward" is speedup >= 0.87.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from sae_fast.benchmarks.common import device_name, record


def _forward(model, adata, layer: int) -> int:
    n = 0
    with torch.inference_mode():
        for batch in model.prepare(adata, batch_size=8):
            n += model.forward(batch, layer=layer, stop=True).hidden.shape[0]
    return n


def run(quick: bool = False, model=None, adata=None) -> list[dict]:
    from sae_fast import datasets, extract, load_model, utils

    model = model if model is not None else load_model("mini")
    adata = adata if adata is not None else datasets.pbmc3k()[:360].copy()
    if quick:
        adata = adata[:16].copy()
    layer = model.n_layers // 2
    verbosity, utils.VERBOSITY = utils.VERBOSITY, 0
    tmp = Path(tempfile.mkdtemp(prefix="sae_fast_bench_extract_"))
    times = {"forward": [], "extract": []}
    try:
        _forward(model, adata[:8], layer)  # warm-up
        for i in range(2 if quick else 3):
            t0 = time.perf_counter()
            _forward(model, adata, layer)
            times["forward"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            shards = extract(model, adata, layer, tmp / f"run{i}", tokens="all", dtype="float16")
            times["extract"].append(time.perf_counter() - t0)
        ours, ref = min(times["extract"]), min(times["forward"])
        config = {"model": model.name, "layer": layer, "cells": adata.n_obs, "tokens": "all",
                  "dtype": "float16"}
        return [record("extract", config, device_name(next(model.parameters()).device), ours, ref,
                       overhead=ours / ref, n_tokens=shards.n_tokens,
                       shard_mb=shards.n_tokens * shards.d * 2 / 2**20)]
    finally:
        utils.VERBOSITY = verbosity
        shutil.rmtree(tmp, ignore_errors=True)
