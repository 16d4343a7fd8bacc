"""Batch removal ([P]) on the embedded demo model `mini`, the tables committed in bench/results/:

  kang   Kang 2018 IFN-beta, `stim` (CTRL / STIM) as the batch          -> debatch_kang_mini.csv
  tech   PBMC3K (10x 3' v1) + Kang 2018 CTRL cells (10x 3' v2), the
         data set (= chemistry and lab) as the batch                   -> debatch_tech_mini.csv

For each: a random subset of cells, equal per batch (--cells; seed 0) is scored; a BatchTopK SAE ([P]: k=10,
F=512) is trained on block `--layer`'s tokens (256 sampled per cell, [P]) of a disjoint subset of the same data
(--train-cells), then sae_fast.steer.debatch runs n in {0, 10, 20, 50}, c = -2, random seeds 42, 43, 44.
These are `mini`'s numbers (a 4-block model pretrained on 360 bundled cells), not scGPT's or scFoundation's.

    python bench/debatch_mini.py [--cells 600] [--train-cells 600] [--epochs 10] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def split(adata, key: str, n_score: int, n_train: int, seed: int = 0):
    """Disjoint random subsets (score, train) with equal numbers of cells per value of obs[key]."""
    rng = np.random.default_rng(seed)
    values = adata.obs[key].astype(str).to_numpy()
    groups = [np.flatnonzero(values == v) for v in sorted(set(values))]
    score, train = [], []
    for g in groups:
        g = rng.permutation(g)
        a, b = n_score // len(groups), n_train // len(groups)
        score.append(g[:a])
        train.append(g[a:a + b])
    return adata[np.sort(np.concatenate(score))].copy(), adata[np.sort(np.concatenate(train))].copy()


def train_sae(model, adata, layer: int, epochs: int, seed: int = 0):
    """[P]'s SAE: BatchTopK k=10, F=512, 256 tokens sampled per cell, batches of 4096 tokens, lr 1e-3."""
    from sae_fast.activations.fused import fused_source
    from sae_fast.sae.train import train_sae as train

    tokens = list(fused_source(model, adata, layer, tokens="sample:256", batch_size=4096, seed=seed))
    return train(tokens, arch="batchtopk", k=10, n_features=512, lr=1e-3, epochs=epochs, batch_size=4096, seed=seed,
                 log_every=10_000)


def experiment(name, adata, batch_key, args, model):
    from sae_fast.steer.debatch import debatch, format_debatch, write_debatch

    score, train = split(adata, batch_key, args.cells, args.train_cells)
    t0 = time.perf_counter()
    sae = train_sae(model, train, args.layer, args.epochs)
    t_train = time.perf_counter() - t0
    res = debatch(sae, model, score, args.layer, batch_key=batch_key, label_key="cell_type",
                  n_features=[0, 10, 20, 50], clamp=[-2.0], seeds=[42, 43, 44], umap_n=[20])
    out = Path(args.out)
    res.table.to_csv(out / f"debatch_{name}_mini.csv", index=False)
    text = format_debatch(res)
    (out / f"debatch_{name}_mini.txt").write_text(text + "\n")
    write_debatch(res, out / f"debatch_{name}_mini")
    print(text, flush=True)
    return {"experiment": name, "cells_scored": int(score.n_obs), "cells_train": int(train.n_obs),
            "layer": args.layer, "train_s": round(t_train, 1), "total_s": round(time.perf_counter() - t0, 1)}


def main():
    import anndata as ad

    from sae_fast import datasets, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=600)
    p.add_argument("--train-cells", type=int, default=600)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--only", choices=["kang", "tech"])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model = load_model("mini")
    kang = datasets.kang2018()
    runs = []
    if args.only in (None, "kang"):
        runs.append(experiment("kang", kang, "stim", args, model))
    if args.only in (None, "tech"):
        ctrl = kang[kang.obs["stim"].astype(str) == "CTRL"]
        both = ad.concat({"pbmc3k_10x_v1": datasets.pbmc3k(), "kang2018_10x_v2": ctrl}, join="inner",
                         label="technology", index_unique="-")
        runs.append(experiment("tech", both, "technology", args, model))
    (Path(args.out) / "debatch_mini.json").write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
