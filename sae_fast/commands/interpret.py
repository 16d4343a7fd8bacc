"""`sae-fast interpret`: GO interpretation of a trained SAE's features, with raw-neuron and ICA baselines."""

from __future__ import annotations

HELP = "interpret SAE features: feature x gene matrix, GO enrichment, baselines, cell-level AMI/F1"
DESCRIPTION = """\
Interpret every feature of a trained SAE (SPEC §2, Yanovsky & Chernomoretz; Pedrocchi et al.):
run the model to --layer over the cells (or read --shards from `sae-fast extract`), accumulate the feature x
gene matrix F (mean activation per gene over cells) and per-cell max/mean pools, filter the genes (the
enrichment background), take each feature's top genes by its participation ratio and test them with
hypergeometric ORA + Benjamini-Hochberg against GO (bundled GO BP/CC/MF 2022). Raw residual neurons and ICA
components go through the identical pipeline as baselines. Also: max information content per feature with a
Mann-Whitney test SAE vs raw, the feature overlap graph, cell-level AMI/F1 against obs labels,
expression-level and gene-family features, immune-marker enrichment.

Writes OUT/tables/*.parquet (CSV without pyarrow), OUT/summary.json and OUT/annotated.h5ad (the cells with
obsm['X_sae_max'], obsm['X_sae_mean'] and the tables in uns); prints a short summary.

Examples:
  sae-fast interpret --sae run/sae --model mini --data pbmc3k --layer 3 --out run/interpret
  sae-fast interpret --sae sae/ --model aido_cell_100m:AIDO.Cell-100M --data pbmc3k.h5ad --layer 12 \\
      --out interp/ --gene-filter code --top-rule code --s 1.0 --features 17 42
"""


def add_arguments(parser):
    from sae_fast.commands.extract import add_counts_argument, add_device_arguments
    from sae_fast.config import add_arguments as add_config
    from sae_fast.interpret.pipeline import InterpretConfig

    parser.add_argument("--sae", required=True, metavar="DIR", help="SAE checkpoint directory (sae.save / "
                        "sae-fast train --out)")
    parser.add_argument("--model", default="mini", metavar="NAME[:PATH]",
                        help="the model the SAE was trained on: mini, aido_cell_100m:DIR, scgpt:DIR, "
                        "geneformer:DIR (default: mini)")
    parser.add_argument("--data", default="pbmc3k", metavar="FILE.h5ad",
                        help="cells as raw counts: an .h5ad file or a bundled data set name "
                        "(default: pbmc3k)")
    add_counts_argument(parser)
    parser.add_argument("--layer", type=int, help="block L the SAE reads (default with --shards: the shards' "
                        "layer)")
    parser.add_argument("--shards", metavar="DIR",
                        help="read activations from these shards instead of running the model "
                        "(cell ids must index --data; no expression-level test)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for tables and AnnData")
    parser.add_argument("--features", type=int, nargs="+", metavar="I",
                        help="features to show in the summary (default: the three most significant)")
    add_device_arguments(parser)
    add_config(parser, InterpretConfig)


def run(args):
    from sae_fast.commands.extract import parse_model
    from sae_fast.config import from_args
    from sae_fast.errors import UserError
    from sae_fast.interpret.pipeline import (
        InterpretConfig,
        format_summary,
        interpret_sae,
        shard_tokens,
        write_results,
    )
    from sae_fast.run.config import read_cells
    from sae_fast.sae.checkpoint import load_sae

    cfg = from_args(InterpretConfig, args)
    sae = load_sae(args.sae)
    n_features = int(sae.W_dec.shape[0])
    bad = [f for f in args.features or [] if not 0 <= f < n_features]
    if bad:
        raise UserError(f"--features {bad[0]} is out of range: the SAE in {args.sae} has features "
                        f"0..{n_features - 1}")
    model = parse_model(args.model, args.device, args.model_dtype)
    sae = sae.to(next(model.parameters()).device)
    adata = read_cells(args.data, args.counts, where="--counts")
    tokens, layer = None, args.layer
    if args.shards:
        from sae_fast.activations.shards import open_shards

        shards = open_shards(args.shards)
        layer = shards.manifest.get("layer") if layer is None else layer
        tokens = shard_tokens(shards, model)
    if layer is None:
        raise UserError("--layer is required (the block whose output the SAE was trained on)")
    model.check_layer(layer)
    result = interpret_sae(sae, model, adata, layer, config=cfg, tokens=tokens)
    paths = write_results(result, args.out)
    print(format_summary(result, features=args.features))
    if not args.quiet:
        print(f"wrote {len(paths)} files to {args.out}: " + ", ".join(p.name for p in paths))
    return 0
