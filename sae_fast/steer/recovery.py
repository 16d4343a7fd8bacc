"""Embedding Recovery Score (ERS) of [P]: how much of the model's cell embedding survives when block L's output
is replaced by the SAE's reconstruction.

    ers = embedding_recovery(sae, model, adata, layer=L)
    ers.ratio      # paper: MSE(X_0, X_orig) / MSE(X_orig, X_rec)            (1 = no better than zeros)
    ers.fraction   # code (sae4scfm core/evaluation.py): 1 - sum SE(X_orig, X_rec) / sum SE(X_0, X_orig)

X_orig is the unedited embedding, X_rec the embedding with block L's output replaced by SAE(x) at every
non-padding token (no error term), X_0 the embedding with block L's output zeroed everywhere. Blocks 0..L run
once per batch (`stop=True`); the three embeddings come from the suffix alone (`start=`), so the cost is one
prefix plus three suffixes. Squared errors are summed in float64 over all cells and embedding dimensions, so
both forms use the same two sums (the paper's MSE ratio equals the ratio of the sums: same element count).
The SAE encodes in eval mode (BatchTopK: its learned threshold), as [P]'s evaluation does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from sae_fast.config import option
from sae_fast.errors import UserError
from sae_fast.utils import progress


class EmbeddingRecovery(NamedTuple):
    ratio: float  # paper: MSE(X_0, X_orig) / MSE(X_orig, X_rec)
    fraction: float  # code: 1 - SE(X_orig, X_rec) / SE(X_0, X_orig)
    se_zero: float  # sum of squared errors between X_0 and X_orig
    se_rec: float  # sum of squared errors between X_orig and X_rec
    n_cells: int


def _sae_device(sae) -> torch.device:
    return sae.W_dec.device


def replace_with_reconstruction(sae, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of `hidden` [B, T, d] with SAE(x) at the tokens where `mask` [B, T] is True."""
    out = hidden.clone()
    m = mask.to(hidden.device)
    x = hidden[m]
    x_hat, _ = sae(x.to(device=_sae_device(sae), dtype=torch.float32))
    out[m] = x_hat.to(device=hidden.device, dtype=hidden.dtype)
    return out


def embedding_recovery(sae, model, adata, layer: int, *, batch_size: int = 8) -> EmbeddingRecovery:
    """Both forms of [P]'s Embedding Recovery Score over all cells of `adata` (see the module docstring)."""
    model.check_layer(layer)
    if sae.W_dec.shape[1] != model.d_model:
        raise UserError(f"the SAE reads d={sae.W_dec.shape[1]} but {model.name} has d_model={model.d_model}; "
                        "use an SAE trained on this model")
    device = next(model.parameters()).device
    se_zero = se_rec = 0.0
    n = 0
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad(), progress(total=adata.n_obs, desc="embedding recovery", unit="cell") as bar:
            for batch in model.prepare(adata, batch_size=batch_size):
                batch = batch.to(device)
                h = model.forward(batch, layer=layer, stop=True).hidden
                orig = model.forward(batch, layer=layer, start=h).embedding.double()
                rec = model.forward(batch, layer=layer,
                                    start=replace_with_reconstruction(sae, h, batch.mask)).embedding.double()
                zero = model.forward(batch, layer=layer, start=torch.zeros_like(h)).embedding.double()
                se_zero += float((zero - orig).pow(2).sum())
                se_rec += float((orig - rec).pow(2).sum())
                n += h.shape[0]
                bar.update(h.shape[0])
    finally:
        sae.train(was_training)
    if n == 0:
        raise UserError("embedding_recovery: the AnnData has no cells")
    ratio = se_zero / se_rec if se_rec > 0 else float("inf")
    fraction = 1.0 - se_rec / se_zero if se_zero > 0 else float("nan")
    return EmbeddingRecovery(ratio, fraction, se_zero, se_rec, n)


# ------------------------------------------------------------------------------------------------ layer curves


@dataclasses.dataclass
class LayersConfig:
    """Layer-wise curves: one SAE per layer, FVU on held-out cells, ERS, and label-feature counts."""

    layers: list[int] = option(default_factory=list, help="blocks to train an SAE on (empty: every block)")
    heldout: float = option(0.2, "share of the cells held out of training; FVU, ERS and the feature counts are "
                            "measured on them")
    label_keys: list[str] = option(default_factory=lambda: ["cell_type", "batch", "chemistry"],
                                   help="obs columns whose associated features are counted (cell type, batch, "
                                   "technology); missing or single-valued columns are skipped")
    ami_threshold: float = option(0.1, "a feature counts for a label when its [P] AMI (one vs rest, max over "
                                  "thresholds and values) exceeds this")
    tokens: str = option("sample:256", "training tokens per cell ([P]: sample:256; all = every gene token)")
    max_cells: int | None = option(None, "use a random subset of this many cells (seeded; None = all)")
    seed: int = option(0, "seed of the cell subset, the held-out split and the SAE's training")
    batch_size: int = option(8, "cells per forward batch")


def heldout_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: a seeded random `share` of n rows held out (at least 1 each)."""
    if not 0 < share < 1:
        raise UserError(f"heldout = {share}: give a share between 0 and 1")
    order = np.random.default_rng(seed).permutation(n)
    k = min(max(1, round(share * n)), n - 1)
    return np.sort(order[k:]), np.sort(order[:k])


def layer_curve(model, adata, *, config: LayersConfig | None = None, train=None, **overrides) -> pd.DataFrame:
    """One SAE per layer of `model` (trained fused, nothing on disk), each measured on held-out cells: FVU, L0,
    dead fraction, both ERS forms, and the number of features whose AMI with each label exceeds the threshold.

    train: a sae_fast.sae.train.TrainConfig (architecture, k, epochs, ...; out_dir is ignored). One row per
    layer: layer, fvu, l0, dead_fraction, ers_ratio, ers_fraction, n_<key>_features (one per label key), seconds."""
    from sae_fast.activations.fused import fused_source
    from sae_fast.interpret.cells import normalise_by_max, rank_by_label
    from sae_fast.sae.train import TrainConfig, evaluate, train_sae
    from sae_fast.steer.debatch import cell_max_pool

    cfg = dataclasses.replace(config or LayersConfig(), **overrides)
    layers = list(cfg.layers) or list(range(model.n_layers))
    for L in layers:
        model.check_layer(L)
    if adata.n_obs < 4:
        raise UserError(f"layer curves need at least 4 cells; got {adata.n_obs}")
    if cfg.max_cells is not None and cfg.max_cells < adata.n_obs:
        adata = adata[np.sort(np.random.default_rng(cfg.seed).choice(adata.n_obs, cfg.max_cells, replace=False))]
    keys = [k for k in cfg.label_keys if k in adata.obs and adata.obs[k].nunique() >= 2]
    tr, ho = heldout_split(adata.n_obs, cfg.heldout, cfg.seed)
    train_cells, held = adata[tr].copy(), adata[ho].copy()
    tcfg = dataclasses.replace(train or TrainConfig(), out_dir=None, seed=cfg.seed)
    rows = []
    for L in layers:
        t0 = time.perf_counter()
        # fused: the training tokens come from the forward pass, read once into memory (no disk)
        tokens = list(fused_source(model, train_cells, L, tcfg, tokens=cfg.tokens,
                                   cells_per_batch=cfg.batch_size))
        sae = train_sae(tokens, config=tcfg)
        m = evaluate(sae, fused_source(model, held, L, tcfg, tokens="all", cells_per_batch=cfg.batch_size))
        ers = embedding_recovery(sae, model, held, L, batch_size=cfg.batch_size)
        row = {"layer": L, "fvu": m.fvu, "l0": m.l0, "dead_fraction": m.dead_fraction, "ers_ratio": ers.ratio,
               "ers_fraction": ers.fraction}
        if keys:
            X = normalise_by_max(cell_max_pool(sae, model, held, L, batch_size=cfg.batch_size))
            for k in keys:
                row[f"n_{k}_features"] = int((rank_by_label(X, held.obs[k].to_numpy()).ami > cfg.ami_threshold).sum())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs.update(n_train=len(tr), n_heldout=len(ho), ami_threshold=cfg.ami_threshold, label_keys=keys)
    return df


def layer_figure(table: pd.DataFrame, path, title: str = "") -> Path:
    """PNG: FVU and ERS (fraction) per layer on the left, label-feature counts per layer on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sae_fast.utils import save_figure

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(table.layer, table.fvu, "o-", label="FVU (held-out cells)")
    a1.plot(table.layer, table.ers_fraction, "s-", label="ERS (fraction, [P]'s code)")
    a1.set_xlabel("layer")
    a1.set_ylim(min(0.0, float(np.nanmin(table[["fvu", "ers_fraction"]].to_numpy()))) - 0.05, 1.05)
    a1.legend(frameon=False)
    a1.set_xticks(table.layer)
    for col in [c for c in table.columns if c.startswith("n_") and c.endswith("_features")]:
        a2.plot(table.layer, table[col], "o-", label=col[2:-9])
    a2.set_xlabel("layer")
    a2.set_ylabel(f"features with AMI > {table.attrs.get('ami_threshold', '')}")
    a2.set_xticks(table.layer)
    a2.legend(frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
