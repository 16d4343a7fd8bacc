"""The layer curve of the embedded demo model `mini` (docs/img/layers.png, bench/results/layers_mini.csv).

Cells: 100 PBMC3K (10x 3' v1) + 100 Kang 2018 CTRL + 100 Kang 2018 STIM (10x 3' v2), random, seed 0; 30% held
out. Labels counted: cell_type, condition (Kang's stim, the "batch" of the integration tutorial) and chemistry
(the technology). One TopK SAE per layer (k=16, 512 features, 5 epochs, 64 tokens sampled per cell). These are
`mini`'s numbers (4 blocks, pretrained on 360 bundled cells), not those of a released model.

    python bench/layers_mini.py [--per-group 100] [--out bench/results] [--figure docs/img/layers.png]
"""

import argparse
from pathlib import Path

import numpy as np


def main():
    import anndata as ad

    from sae_fast import datasets, load_model
    from sae_fast.sae.train import TrainConfig
    from sae_fast.steer.recovery import layer_curve, layer_figure

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-group", type=int, default=100)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--figure", default="docs/img/layers.png")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    kang, pbmc = datasets.kang2018(), datasets.pbmc3k()
    parts = {"pbmc3k": pbmc[rng.choice(pbmc.n_obs, args.per_group, replace=False)]}
    for stim in ("CTRL", "STIM"):
        idx = np.flatnonzero(kang.obs["stim"].astype(str).to_numpy() == stim)
        parts[f"kang_{stim}"] = kang[rng.choice(idx, args.per_group, replace=False)]
    cells = ad.concat(parts, join="inner", label="part", index_unique="-")
    train = TrainConfig(arch="topk", k=16, n_features=512, epochs=5, batch_size=2048, log_every=10_000)
    table = layer_curve(load_model("mini"), cells, train=train, heldout=0.3, tokens="sample:64",
                        label_keys=["cell_type", "condition", "chemistry"], ami_threshold=0.1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "layers_mini.csv", index=False)
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    layer_figure(table, args.figure, title=f"mini (embedded demo model): one SAE per layer, {table.attrs['n_train']}"
                 f" training / {table.attrs['n_heldout']} held-out cells")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
