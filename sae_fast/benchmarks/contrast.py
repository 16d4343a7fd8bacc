"""`sae-fast bench contrast`: one epoch of contrastive steering on the cached prefix against full forwards.

Ours = one epoch of `sae_fast.steer.contrastive`'s optimisation: the source cells' block-L outputs and SAE codes
were computed once (outside the timing: they serve all 100 epochs), and every step runs blocks L+1.. forward
and backward. Reference = what [Y]'s code does each step: a full forward with the Scale edit as a hook on block
L (the SAE encode inside the hook), then the backward. Same cells, batches of 4, loss, Adam; the model's
parameters are frozen in both. At L = 12 of 18 (AIDO.Cell-100M's config, random weights) the bound without
checkpointing is about 1.9x (the reference's 18 forward blocks + 5 backward vs our 5 + 5, a backward costing
about twice a forward).

Full: 8 source and 4 target cells with 1,024 vocabulary genes (1,026 tokens). --quick: the 3M config, 256 genes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sae_fast.benchmarks.common import device_name, record


def _reference_epoch(prob, features: list[int], train: np.ndarray, adata, src: np.ndarray) -> None:
    from torch import nn

    from sae_fast.steer.contrastive import frozen
    from sae_fast.steer.interventions import encode, scale_delta

    sae, model, cfg, layer = prob.sae, prob.model, prob.cfg, prob.layer
    F, W = int(sae.W_dec.shape[0]), sae.W_dec.detach()
    feats = torch.tensor(features)
    alpha = nn.Parameter(torch.ones(len(features)))
    opt = torch.optim.Adam([alpha], lr=cfg.lr)

    def hook(h, batch):
        full = torch.ones(F).index_put((feats,), alpha)
        code = encode(sae, h.reshape(-1, h.shape[-1]))
        return h + scale_delta(code, full, W, sae.cfg.backend).view_as(h)

    with frozen(model), frozen(sae):
        for batch in model.prepare(adata[src[train]], batch_size=cfg.batch_size):
            out = model.forward(batch, layer=layer, hook=hook)
            loss = prob.loss(out, batch) + cfg.lam * (alpha - 1).abs().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def run(quick: bool = False) -> list[dict]:
    from sae_fast import utils
    from sae_fast.benchmarks.steer import setup
    from sae_fast.steer.contrastive import ContrastConfig, _Problem

    model, sae, adata, layer, size = setup(quick)
    if not quick:
        from sae_fast.benchmarks.steer import _counts

        adata = _counts(12, list(model.genes))
    n = adata.n_obs
    src, tgt = np.arange(0, n - n // 3), np.arange(n - n // 3, n)
    train = np.arange(src.size)
    features = list(range(0, int(sae.W_dec.shape[0]), 4))  # a quarter of the features learnable
    cfg = ContrastConfig(epochs=1, control=False)
    verbosity, utils.VERBOSITY = utils.VERBOSITY, 0
    try:
        prob = _Problem(sae, model, adata, layer, src, tgt, cfg)  # the cache: built once, not timed
        prob.optimise(features, train[:4], "warm-up")
        ours, ref = [], []
        for _ in range(1 if quick else 2):
            t0 = time.perf_counter()
            prob.optimise(features, train, "epoch")
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _reference_epoch(prob, features, train, adata, src)
            ref.append(time.perf_counter() - t0)
    finally:
        utils.VERBOSITY = verbosity
    config = {"model": f"aido_cell_{size} config, random weights", "layer": layer, "n_layers": model.n_layers,
              "source_cells": int(src.size), "tokens": adata.n_vars + 2, "batch": cfg.batch_size,
              "learnable_features": len(features), "checkpointing": False}
    return [record("contrast", config, device_name(), min(ours), min(ref), times_ours=ours, times_reference=ref)]
