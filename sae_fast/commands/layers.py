"""`sae-fast layers CONFIG.toml --out DIR`: layer-wise curves, one SAE per layer ([P]'s ERS across layers)."""

from __future__ import annotations

HELP = "train one SAE per layer and report FVU, Embedding Recovery Score and label-feature counts per layer"
DESCRIPTION = """\
Layer-wise curves of a model (Pedrocchi et al. [P]): for every block L (or --layers), train an SAE on block L's
tokens of the training cells (fused: tokens straight from the forward pass, nothing on disk), then measure on
held-out cells (--heldout, default 20%)
  FVU and L0        reconstruction of block L's tokens (fraction of variance unexplained)
  ERS               Embedding Recovery Score, the paper's ratio and the code's fraction (block L replaced by the
                    SAE's reconstruction, the cell embedding compared against the unedited and the zeroed one)
  feature counts    features whose [P] AMI with cell type / batch / technology (--label-keys) exceeds
                    --ami-threshold (default 0.1)
The config's [model], [data] and [sae] sections say which model, which cells and which SAE (architecture, k,
expansion, epochs, ...); the other sections are ignored. Writes DIR/tables/layers.csv and DIR/figures/layers.png
and prints the table. See docs/layers.md.

Example:
  sae-fast layers examples/demo.toml --out runs/layers --set sae.epochs=3 --tokens sample:64
"""


def add_arguments(parser):
    from sae_fast.config import add_arguments as add_config
    from sae_fast.steer.recovery import LayersConfig

    parser.add_argument("config", help="a run config (TOML): its [model], [data] and [sae] sections are used")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (tables/, figures/)")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config key (TOML value syntax), e.g. --set sae.epochs=2; repeatable")
    add_config(parser, LayersConfig)


def run(args):
    from pathlib import Path

    from sae_fast.config import from_args
    from sae_fast.run import load_config
    from sae_fast.run.config import cells_and_model
    from sae_fast.steer.recovery import LayersConfig, layer_curve, layer_figure
    from sae_fast.utils import atomic_path

    config = load_config(args.config, args.overrides)
    cfg = from_args(LayersConfig, args)
    adata, model, _ = cells_and_model(config)
    table = layer_curve(model, adata, config=cfg, train=config.sae)
    out = Path(args.out)
    with atomic_path(out / "tables" / "layers.csv") as tmp:
        table.to_csv(tmp, index=False)
    title = f"{model.name}: one SAE per layer ({table.attrs['n_train']} training / {table.attrs['n_heldout']} " \
            "held-out cells)"
    layer_figure(table, out / "figures" / "layers.png", title=title)
    if model.name == "mini":
        print("These numbers come from the embedded demo model `mini`, not from a released foundation model.")
    print(title)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out / 'tables' / 'layers.csv'} and {out / 'figures' / 'layers.png'}")
    return 0
