"""The layer curve of the embedded demo model `mini` v2 (docs/img/layers.png, bench/results/layers_mini.csv).

Model: mini v2 (AIDO.Cell-3M's shape: 6 blocks x 128, 2,048 genes, pretrained on 15,317 of the 17,035 bundled
cells), on a restricted gene context (--context, default hvg:512: the 512 genes of mini's vocabulary that scanpy's
seurat flavour ranks most variable in these cells, sae_fast.models.genes.context_genes + AIDOCell.restrict, each
gene at its own position; the cell embedding, hence the ERS, is the mean over those genes). Cells: 200 PBMC3K
(10x 3' v1) + 200 Kang 2018 CTRL + 200 Kang 2018 STIM (10x 3' v2) (--per-group), drawn (seed 0) from the cells
that mini's pretraining held out (training_log.json's heldout_cells), so no cell here was seen in pretraining; 30%
of them held out of SAE training. Labels counted: cell_type, condition (Kang's stim, the "batch" of the
integration tutorial) and chemistry (the technology), AMI > 0.1. One TopK SAE per block (k = 16, 512 features,
10 epochs over 256 tokens sampled per cell, batches of 2,048 tokens). Column gene_identity_share: the share of
the layer's token variance that the per-gene mean token explains (1 - within-gene / total sum of squares, over the
context genes of every 10th cell, 60 cells). Runs on --threads threads (1). These are
`mini`'s numbers, not those of a released model.

    python bench/layers_mini.py [--per-group 200] [--context hvg:512] [--epochs 10] [--threads 1]
                                [--out bench/results] [--figure docs/img/layers.png]
"""

import argparse
import json
import time
from importlib import resources
from pathlib import Path

import numpy as np


def main():
    import anndata as ad
    import torch

    from sae_fast import datasets, load_model
    from sae_fast.models.genes import context_genes
    from sae_fast.sae.train import TrainConfig
    from sae_fast.steer.recovery import layer_curve, layer_figure

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-group", type=int, default=200)
    p.add_argument("--context", default="hvg:512")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--figure", default="docs/img/layers.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log = json.loads(resources.files("sae_fast.models").joinpath("mini/training_log.json").read_text())
    held = list(log["heldout_cells"])
    rng = np.random.default_rng(0)
    kang, pbmc = datasets.kang2018(), datasets.pbmc3k()
    pool = np.flatnonzero(pbmc.obs_names.isin(held))
    parts = {"pbmc3k": pbmc[np.sort(rng.choice(pool, min(args.per_group, len(pool)), replace=False))]}
    for stim in ("CTRL", "STIM"):
        idx = np.flatnonzero((kang.obs["stim"].astype(str).to_numpy() == stim) & kang.obs_names.isin(held))
        parts[f"kang_{stim}"] = kang[np.sort(rng.choice(idx, args.per_group, replace=False))]
    cells = ad.concat(parts, join="inner", label="part", index_unique=None)
    model = load_model("mini")
    genes = context_genes(model, cells, args.context)
    if genes is not None:
        model = model.restrict(genes)
    train = TrainConfig(arch="topk", k=16, n_features=512, epochs=args.epochs, batch_size=2048, log_every=10_000)
    table = layer_curve(model, cells, train=train, heldout=0.3, tokens="sample:256",
                        label_keys=["cell_type", "condition", "chemistry"], ami_threshold=0.1)
    sub = cells[::10]  # how much of the token variance is gene identity (each gene sits at its own position)
    shares = []
    for L in table.layer:
        H = []
        for b in model.prepare(sub, batch_size=8):
            with torch.no_grad():
                H.append(model.forward(b, layer=int(L), stop=True).hidden[:, :len(model.genes)].double())
        H = torch.cat(H)  # [cells, genes, d]: every context gene of every cell
        total = ((H - H.mean((0, 1))) ** 2).sum()
        shares.append(float(1 - ((H - H.mean(0, keepdim=True)) ** 2).sum() / total))
    table.insert(len(table.columns) - 1, "gene_identity_share", shares)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "layers_mini.csv", index=False)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    layer_figure(table, args.figure, title=f"mini v2 ({args.context} context): one SAE per layer, "
                 f"{table.attrs['n_train']} training / {table.attrs['n_heldout']} held-out cells")
    print(table.to_string(index=False))
    print(f"cells {cells.n_obs} ({', '.join(f'{k} {v.n_obs}' for k, v in parts.items())}), context {args.context}, "
          f"threads {args.threads}, total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
