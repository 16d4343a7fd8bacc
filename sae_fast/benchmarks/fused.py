"""`sae-fast bench fused`: [Y]'s setting end to end on one device. AIDO.Cell-100M (random weights) reads a
batch of 8 cells x 19,266 tokens in bf16 up to block 12; the block's output (154,128 tokens x 640) feeds one
fused TopK SAE training step (fp32, F = 5,120, k = 32, Adam, decoder constraint), the loop that
`train_sae(model=..., adata=..., layer=12)` runs. A second row times a steered forward at the same size: the
full model with a `Scale` edit of 8 features at block 12 (only when sae_fast.steer is installed).

Each row reports tokens/s and, on CUDA, the peak of `torch.cuda.max_memory_allocated` over the measurement
(design goal: <= 24 GB, [Y]'s GPU). There is no reference implementation to race here: reference_s is the
plain forward to block 12 (unsteered full forward for the steering row), so speedup < 1 says what the SAE
step (or the edit) adds.

The full size needs a GPU (on a CPU, one 19,266-token cell of the 100M model takes minutes). --quick: the 3M
config, 2 cells x 256 tokens at block 2, on whatever device is there (the CPU dry run of bench/gpu_suite.sh).
"""

from __future__ import annotations

import importlib.util

import torch

from sae_fast.benchmarks.common import device_name, record, time_fn
from sae_fast.errors import UserError

GOAL_BYTES = 24 * 10**9  # [Y] trained on one 24 GB GPU


def _sizes(quick: bool) -> dict:
    if quick:
        return {"model": "3m", "cells": 2, "tokens": 256, "layer": 2, "F": 1024, "k": 8}
    return {"model": "100m", "cells": 8, "tokens": 19266, "layer": 12, "F": 5120, "k": 32}


def _batch(cells: int, tokens: int, device):
    from sae_fast.models.base import CellBatch

    g = torch.Generator().manual_seed(0)
    values = torch.rand(cells, tokens, generator=g) * 5
    return CellBatch({"values": values}, torch.zeros(cells, tokens, dtype=torch.long),
                     torch.arange(cells), torch.ones(cells, tokens, dtype=torch.bool), values).to(device)


class _Peak:
    """Peak device memory over a block (CUDA: max_memory_allocated after a reset; elsewhere None)."""

    def __init__(self, device: torch.device):
        self.cuda, self.bytes = device.type == "cuda", None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()


def _mem_fields(peak: _Peak) -> dict:
    if peak.bytes is None:
        return {"peak_bytes": None, "peak_note": "not measured: torch.cuda.max_memory_allocated needs CUDA"}
    return {"peak_bytes": peak.bytes, "peak_gb": peak.bytes / 1e9, "goal_bytes": GOAL_BYTES,
            "within_goal": peak.bytes <= GOAL_BYTES}


def run(quick: bool = False) -> list[dict]:
    from sae_fast import TopKSAE
    from sae_fast.models.aido_cell import AIDO_CELL_CONFIGS, random_aido_cell
    from sae_fast.sae.train import make_optimizer, train_step

    s = _sizes(quick)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not quick:
        raise UserError("bench fused runs AIDO.Cell-100M on 8 cells x 19,266 tokens: it needs a CUDA GPU; on the "
                        "CPU use --quick (the 3M config, tiny sizes)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_aido_cell(AIDO_CELL_CONFIGS[s["model"]], device=device, dtype=dtype)
    batch = _batch(s["cells"], s["tokens"], device)
    n_tok, layer = s["cells"] * s["tokens"], s["layer"]
    sae = TopKSAE(model.d_model, s["F"], s["k"]).to(device)
    opt = make_optimizer(sae, 1e-3)
    repeat = 1 if quick else 3
    cfg = {"model": f"aido_cell_{s['model']}", "cells": s["cells"], "tokens_per_cell": s["tokens"],
           "layer": layer, "dtype": str(dtype).removeprefix("torch."), "sae": "topk", "F": s["F"], "k": s["k"]}

    def forward_to_layer():
        with torch.no_grad():
            return model.forward(batch, layer=layer, stop=True).hidden

    def fused_step():
        x = forward_to_layer().reshape(-1, model.d_model).float()
        train_step(sae, opt, x)

    t_fwd = time_fn(forward_to_layer, repeat=repeat)
    with _Peak(device) as peak:
        t_step = time_fn(fused_step, repeat=repeat)
    rows = [record("fused", cfg, device_name(device), t_step, t_fwd, reference="forward to the layer alone",
                   tokens_per_s=n_tok / t_step, forward_tokens_per_s=n_tok / t_fwd, **_mem_fields(peak))]

    if importlib.util.find_spec("sae_fast.steer") is None:
        rows.append(record("fused-steer", cfg, device_name(device), None, None,
                           skipped="sae_fast.steer is not installed in this tree"))
        return rows
    from sae_fast.steer import Scale

    sae.eval()
    hook = Scale({f: 2.0 for f in range(8)}).hook(sae, model)

    def full(hook=None):
        with torch.no_grad():
            model.forward(batch, layer=layer, hook=hook)

    t_plain = time_fn(full, repeat=repeat)
    with _Peak(device) as peak:
        t_steer = time_fn(lambda: full(hook), repeat=repeat)
    rows.append(record("fused-steer", cfg | {"edit": "Scale x2 on features 0-7, all tokens"}, device_name(device),
                       t_steer, t_plain, reference="unsteered full forward", tokens_per_s=n_tok / t_steer,
                       **_mem_fields(peak)))
    return rows
