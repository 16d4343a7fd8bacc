"""`sae-fast bench steer`: the shared-prefix steering runner against two full hooked forwards per batch.

Ours = `sae_fast.steer.steer` (blocks 0..L once per batch, then the unsteered and the steered suffix from that
prefix, per-gene statistics streamed). Reference = what [Y]'s code does: per batch, one plain forward and one
forward with the edit as a hook on block L, both full (prepare and the same outputs collected). At [Y]'s
layer ratio, L = 12 of 18 blocks (AIDO.Cell-100M's config, random weights: speed does not depend on them),
the block counts bound the gain: 36 / (13 + 5 + 5) = 1.57x. The edit is Scale({f: 2.0}) with a TopK SAE of
[Y]'s size (640 -> 5,120, k = 32).

Full: 8 cells with 1,024 vocabulary genes (1,026 tokens), batches of 4, plus the peak memory of one steered
AIDO.Cell-100M forward at the full 19,266 tokens (batch 1, CPU, in a fresh process; minutes).
--quick: the 3M config (6 blocks, L = 4), 4 cells x 256 genes, no 19,266-token run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from sae_fast.benchmarks.common import device_name, record

_PEAK = r"""
import json, sys, time, torch
from pathlib import Path
from sae_fast import TopKSAE
from sae_fast.models import aido_cell
from sae_fast.models.base import CellBatch
from sae_fast.benchmarks.common import proc_status_bytes as rss
from sae_fast.steer import Scale

T, layer = int(sys.argv[1]), int(sys.argv[2])
model = aido_cell.random_aido_cell(aido_cell.AIDO_CELL_CONFIGS["100m"], device="cpu", dtype=torch.float32)
sae = TopKSAE(640, 5120, k=32).eval()
values = torch.rand(1, T) * 5
gene_ids = torch.cat([torch.arange(T - 2), torch.full((2,), -1)])[None]
batch = CellBatch({"values": values}, gene_ids, torch.zeros(1, dtype=torch.long), torch.ones(1, T, dtype=torch.bool),
                  values)
edit = Scale({7: 2.0})
base = rss("VmRSS")
Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current RSS
t0 = time.perf_counter()
with torch.inference_mode():
    prefix = model(batch, layer=layer, stop=True).hidden
    out = model(batch, layer=layer, start=edit(prefix, batch, sae, model))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_bytes": rss("VmHWM") - base}))
"""


def _counts(n_cells: int, genes: list[str], seed: int = 0):
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.6, 3.0, size=(n_cells, len(genes)))).astype(np.float32)
    X[:, 0] += 1
    a = ad.AnnData(sp.csr_matrix(X))
    a.var_names = genes
    a.obs_names = [f"c{i}" for i in range(n_cells)]
    return a


def setup(quick: bool):
    """(model, sae, adata, layer) at [Y]'s layer ratio, random weights."""
    import dataclasses

    import torch

    from sae_fast import TopKSAE
    from sae_fast.models import aido_cell

    size, genes, cells = ("3m", 256, 4) if quick else ("100m", 1024, 8)
    cfg = dataclasses.replace(aido_cell.AIDO_CELL_CONFIGS[size], max_position_embeddings=genes)
    model = aido_cell.random_aido_cell(cfg, device="cpu", dtype=torch.float32)
    layer = round(model.n_layers * 12 / 18)  # [Y]: block 12 of 18
    torch.manual_seed(0)
    sae = TopKSAE(model.d_model, 8 * model.d_model, k=32).eval()
    return model, sae, _counts(cells, list(model.genes)), layer, size


def _reference(sae, model, adata, edit, layer: int, batch_size: int) -> None:
    """[Y]'s way: a plain and a hooked full forward per batch, outputs collected."""
    import torch

    embs, preds = [], []
    hook = edit.hook(sae, model)
    with torch.inference_mode():
        for batch in model.prepare(adata, batch_size=batch_size):
            base = model.forward(batch)
            steered = model.forward(batch, layer=layer, hook=hook)
            embs.append((base.embedding.numpy(), steered.embedding.numpy()))
            preds.append((base.expression.double().numpy(), steered.expression.double().numpy()))


def _peak_19266(layer: int = 12) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, "19266", str(layer)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"steer peak-memory run: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    from sae_fast import utils
    from sae_fast.steer import Scale, steer

    model, sae, adata, layer, size = setup(quick)
    edit = Scale({7: 2.0})
    batch_size = 4
    verbosity, utils.VERBOSITY = utils.VERBOSITY, 0
    try:
        steer(sae, model, adata[:2], edit, layer=layer, batch_size=2)  # warm-up (kernel builds)
        ours, ref = [], []
        for _ in range(1 if quick else 2):
            t0 = time.perf_counter()
            steer(sae, model, adata, edit, layer=layer, batch_size=batch_size)
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _reference(sae, model, adata, edit, layer, batch_size)
            ref.append(time.perf_counter() - t0)
    finally:
        utils.VERBOSITY = verbosity
    n = model.n_layers
    config = {"model": f"aido_cell_{size} config, random weights", "layer": layer, "n_layers": n,
              "cells": adata.n_obs, "tokens": adata.n_vars + 2, "batch": batch_size, "sae": "topk 8x k=32",
              "edit": "Scale({7: 2.0})"}
    rows = [record("steer", config, device_name(), min(ours), min(ref),
                   block_bound=2 * n / (layer + 1 + 2 * (n - layer - 1)), times_ours=ours, times_reference=ref)]
    if not quick:
        peak = _peak_19266()
        rows.append(record("steer", {"model": "aido_cell_100m config, random weights", "layer": 12, "n_layers": 18,
                                     "cells": 1, "tokens": 19266, "what": "peak memory of one steered forward "
                                     "(prefix to block 12, Scale edit, steered suffix), fresh process"},
                           device_name(), peak["seconds"], float("nan"), peak_rss_bytes=peak["peak_bytes"],
                           peak_rss_gib=peak["peak_bytes"] / 2**30,
                           note="no reference timing: a single measurement of peak resident memory"))
    return rows
