"""Batch removal ([P]) on the embedded demo model `mini` (v2), the tables committed in bench/results/:

  kang   Kang 2018 IFN-beta, `stim` (CTRL / STIM) as the batch              -> debatch_kang_mini.{csv,txt}
  tech   PBMC3K (10x 3' v1) + Kang 2018 CTRL cells (10x 3' v2), the data set
         (= chemistry and lab) as the batch `technology`                   -> debatch_tech_mini.{csv,txt}
  donor  Wu 2020 T cells (10x 5'), the patients as the batch `patient`     -> debatch_donor_mini.{csv,txt}

Model: mini v2 (AIDO.Cell-3M's shape: 6 blocks x 128, 2,048 genes, pretrained on 15,317 of the 17,035 bundled
cells) on a restricted gene context (--context, default hvg:512: the 512 genes of mini's vocabulary that scanpy's
seurat flavour ranks most variable in the experiment's own cells, sae_fast.models.genes.context_genes, each kept at
its own position by AIDOCell.restrict; the full 2,048-gene context costs ~3.5x more on the CPU). The cell
embedding is then the mean over those 512 genes. Layer: --layer 2 (0-based), the output of block 3 of 6, i.e. half
the model's depth: [P] steer scGPT at layer 5 of 0..11, the output of block 6 of 12 (their interpretation layer,
10, is the later one). Cells: kang / tech score cells that mini's pretraining held out (training_log.json's
heldout_cells: 637 Kang CTRL, 721 STIM, 271 PBMC3K), equal numbers per batch (--cells; seed 0), and train the SAE
on a disjoint set of pretraining cells (--train-cells, equal per batch). donor has only 200 cells in 14 patients
(33 held out); it keeps the 8 patients with >= 15 cells (--min-donor-cells; 157 cells: scanpy's per-batch
cell_ranger HVG of the unintegrated baseline fails with "bin edges must be unique" on smaller patients), trains the
SAE on those cells and scores the same cells (stated in its summary). The SAE is [P]'s: BatchTopK k = 10, F = 512,
lr 1e-3, batches of 4,096 tokens, 256 tokens sampled per cell (one draw, --epochs passes over it); then
sae_fast.steer.debatch runs n in {0, 10, 20, 50}, c = -2, random seeds 42, 43, 44, bio label `cell_type`.
Timings and settings go to debatch_mini.json. These are `mini`'s numbers, not scGPT's or scFoundation's.

    python bench/debatch_mini.py [--cells 600] [--train-cells 600] [--layer 2] [--epochs 10] [--context hvg:512]
                                 [--only kang|tech|donor] [--threads 1] [--runs DIR] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def heldout_cells() -> set[str]:
    """The cells that mini v2's pretraining held out (sae_fast/models/mini/training_log.json)."""
    from importlib import resources

    log = json.loads(resources.files("sae_fast.models").joinpath("mini/training_log.json").read_text())
    return set(log["heldout_cells"])


def split(adata, key: str, n_score: int, n_train: int, score_pool: set[str] | None, seed: int = 0):
    """Disjoint random subsets (score, train) with equal numbers of cells per value of obs[key]. Score cells
    come from `score_pool` (cell names; None = any cell), training cells from the rest."""
    rng = np.random.default_rng(seed)
    values = adata.obs[key].astype(str).to_numpy()
    in_pool = np.ones(adata.n_obs, bool) if score_pool is None else adata.obs_names.isin(list(score_pool))
    groups = [np.flatnonzero(values == v) for v in sorted(set(values))]
    a = min([n_score // len(groups)] + [int(in_pool[g].sum()) for g in groups])
    b = n_train // len(groups)
    score, train = [], []
    for g in groups:
        pool = rng.permutation(g[in_pool[g]])
        score.append(pool[:a])
        rest = pool[a:] if score_pool is None else rng.permutation(g[~in_pool[g]])
        if len(rest) < b:
            raise SystemExit(f"{key} = {values[g[0]]}: only {len(rest)} training cells, {b} asked")
        train.append(rest[:b])
    return adata[np.sort(np.concatenate(score))].copy(), adata[np.sort(np.concatenate(train))].copy()


def train_sae(model, adata, layer: int, epochs: int, seed: int = 0):
    """[P]'s SAE: BatchTopK k=10, F=512, 256 tokens sampled per cell, batches of 4096 tokens, lr 1e-3."""
    from sae_fast.activations.fused import fused_source
    from sae_fast.sae.train import train_sae as train

    tokens = list(fused_source(model, adata, layer, tokens="sample:256", batch_size=4096, seed=seed))
    return train(tokens, arch="batchtopk", k=10, n_features=512, lr=1e-3, epochs=epochs, batch_size=4096, seed=seed,
                 log_every=10_000)


def experiment(name, score, train, batch_key, args, base, note=""):
    import anndata as ad

    from sae_fast.models.genes import context_genes
    from sae_fast.steer.debatch import debatch, format_debatch, write_debatch

    t0 = time.perf_counter()
    seen = score if train is score else ad.concat([score, train], join="inner")
    genes = context_genes(base, seen, args.context)
    model = base if genes is None else base.restrict(genes)
    sae = train_sae(model, train, args.layer, args.epochs)
    t_train = time.perf_counter() - t0
    res = debatch(sae, model, score, args.layer, batch_key=batch_key, label_key="cell_type",
                  n_features=[0, 10, 20, 50], clamp=[-2.0], seeds=[42, 43, 44], umap_n=[20])
    out = Path(args.out)
    res.table.to_csv(out / f"debatch_{name}_mini.csv", index=False)
    head = (f"mini v2, context {args.context}, SAE trained {args.epochs} epochs on {train.n_obs} cells"
            f"{' (the scored cells themselves)' if train is score else ' (disjoint from the scored cells)'}"
            f"{note}")
    text = head + "\n" + format_debatch(res)
    (out / f"debatch_{name}_mini.txt").write_text(text + "\n")
    if args.runs:
        write_debatch(res, Path(args.runs) / f"debatch_{name}_mini")
    total = time.perf_counter() - t0
    print(text, f"\n[{name}: {total:.0f} s]", flush=True)
    return {"experiment": name, "batch_key": batch_key, "cells_scored": int(score.n_obs),
            "cells_train": int(train.n_obs), "train_is_scored": train is score, "layer": args.layer,
            "context": args.context, "epochs": args.epochs, "threads": args.threads,
            "best_batch_ami": round(float(res.ranking.ami.iloc[0]), 4),
            "context_and_train_s": round(t_train, 1), "total_s": round(total, 1)}


def main():
    import anndata as ad
    import torch

    from sae_fast import datasets, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=600)
    p.add_argument("--train-cells", type=int, default=600)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--context", default="hvg:512")
    p.add_argument("--only", choices=["kang", "tech", "donor"], action="append")
    p.add_argument("--min-donor-cells", type=int, default=15,
                   help="donor: keep the patients with at least this many cells (the unintegrated baseline's "
                   "per-batch cell_ranger HVG fails on Wu 2020's smaller patients)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=None, help="also write each experiment's run folder (tables, UMAPs) here")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    only = args.only or ["kang", "tech", "donor"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = load_model("mini")
    held = heldout_cells()
    kang = datasets.kang2018()
    runs = []
    if "kang" in only:
        score, train = split(kang, "stim", args.cells, args.train_cells, held)
        runs.append(experiment("kang", score, train, "stim", args, base,
                               note="; scored cells held out of mini's pretraining"))
    if "tech" in only:
        ctrl = kang[kang.obs["stim"].astype(str) == "CTRL"]
        both = ad.concat({"pbmc3k_10x_v1": datasets.pbmc3k(), "kang2018_10x_v2": ctrl}, join="inner",
                         label="technology", index_unique=None)
        score, train = split(both, "technology", args.cells, args.train_cells, held)
        runs.append(experiment("tech", score, train, "technology", args, base,
                               note="; scored cells held out of mini's pretraining"))
    if "donor" in only:
        wu = datasets.wu2020_tcells()
        counts = wu.obs["patient"].value_counts()
        wu = wu[wu.obs["patient"].isin(counts[counts >= args.min_donor_cells].index)].copy()
        wu.obs["patient"] = wu.obs["patient"].astype(str).astype("category")
        runs.append(experiment("donor", wu, wu, "patient", args, base,
                               note=f"; {wu.obs['patient'].nunique()} patients, {wu.n_obs} cells, "
                                    f"{int(wu.obs_names.isin(list(held)).sum())} of them held out of pretraining"))
    path = Path(args.out) / "debatch_mini.json"
    old = {r["experiment"]: r for r in json.loads(path.read_text())} if path.exists() else {}
    old.update({r["experiment"]: r for r in runs})
    path.write_text(json.dumps(list(old.values()), indent=2) + "\n")


if __name__ == "__main__":
    main()
