"""`sae-fast extract`: write a model's residual stream at one layer to memory-mapped activation shards."""

from __future__ import annotations

HELP = "write a model's residual stream at layer L to memory-mapped activation shards"
DESCRIPTION = """\
Run a single-cell foundation model up to block L (nothing beyond it is computed) over the cells of an .h5ad
file and write the selected tokens' residual vectors to a shard directory: manifest.json (model, layer, d,
dtype, token selection, gene filter, shard names, token counts, CRC-32 checksums) plus per shard the
activations [n, d] and each token's cell and gene index, all written atomically. Train on them with
`sae-fast train --shards DIR`, or read them in Python with `sae_fast.open_shards(DIR)`.

A killed run continues with --resume after its last complete shard; the result is byte-identical to an
uninterrupted run. Under torchrun (`torchrun --nproc-per-node N -m sae_fast extract ...`) each rank extracts
its own block of cells and rank 0 writes the combined manifest.

Disk: tokens x d x 2 bytes in float16 (AIDO.Cell-100M, all tokens: 19,264 x 640 x 2 = 24.7 MB per cell).

Examples:
  sae-fast extract --model mini --data pbmc3k --layer 3 --out acts/ --tokens sample:256
  sae-fast extract --model aido_cell_100m:AIDO.Cell-100M --data pbmc3k.h5ad --layer 12 --out acts/ --resume
"""


def add_arguments(parser):
    parser.add_argument("--model", required=True, metavar="NAME[:PATH]",
                        help="model name (mini, aido_cell_3m/10m/100m/650m, aido_cell, scgpt, geneformer), "
                        "with ':PATH' to its checkpoint directory for every model except mini")
    parser.add_argument("--data", required=True, metavar="FILE.h5ad",
                        help="cells as raw counts: an .h5ad file or a bundled data set (pbmc3k, kang2018)")
    add_counts_argument(parser)
    parser.add_argument("--layer", required=True, type=int,
                        help="output of block L counted from 0, before the final norm")
    parser.add_argument("--out", required=True, metavar="DIR", help="shard directory to write")
    parser.add_argument("--tokens", default="all",
                        help="token selection: all (every gene token), expressed (input value > 0) or "
                        "sample:N (N tokens per cell, as Pedrocchi et al. with N=250/256) (default: all)")
    parser.add_argument("--special-tokens", action="store_true",
                        help="also keep the model's special tokens (AIDO.Cell's 2 depth tokens; gene id -1)")
    parser.add_argument("--genes", default=None, metavar="FILE",
                        help="keep only the genes listed in FILE (one symbol per line)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="storage dtype of the activations (default: float16)")
    parser.add_argument("--batch-size", type=int, default=8, help="cells per forward pass (default: 8)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 18,
                        help="minimum tokens per shard file; a kill loses at most one shard (default: 2^18)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample:N token draw (default: 0)")
    add_device_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted extraction in DIR after its last complete shard")


def add_counts_argument(parser):
    parser.add_argument("--counts", default="X", metavar="WHERE",
                        help="where the raw counts are: X, raw (adata.raw.X) or an adata.layers key (default: X)")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_arguments(parser, device: bool = True) -> None:
    """--device and --model-dtype, shared by extract, interpret and train (whose --device is TrainConfig's)."""
    if device:
        parser.add_argument("--device", default="auto", help="torch device for the model (and the SAE): auto "
                            "(cuda if available, else cpu), cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--model-dtype", default="auto", choices=DTYPES,
                        help="the model's weights and compute dtype: auto = bfloat16 on CUDA, float32 on the CPU "
                        "(default: auto)")


def parse_model(spec: str, device: str = "auto", dtype: str = "auto"):
    """'NAME[:PATH]' -> the model on `device` in `dtype` (sae_fast.run.config.load_model_on)."""
    from sae_fast.run.config import load_model_on

    name, _, path = spec.partition(":")
    return load_model_on(name, path or None, device, dtype)


def read_gene_list(path: str) -> list[str]:
    from pathlib import Path

    from sae_fast.errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: gene list not found (--genes: one gene symbol per line)")
    genes = [line.split("\t")[0].strip() for line in p.read_text().splitlines()]
    return [g for g in genes if g and not g.startswith("#")]


def run(args):
    from sae_fast.activations import extract
    from sae_fast.activations.distributed import process_group
    from sae_fast.run.config import read_cells

    model = parse_model(args.model, args.device, args.model_dtype)
    model.check_layer(args.layer)
    adata = read_cells(args.data, args.counts, where="--counts")
    genes = read_gene_list(args.genes) if args.genes else None
    with process_group() as (rank, _):
        shards = extract(model, adata, args.layer, args.out, tokens=args.tokens, gene_filter=genes,
                         dtype=args.dtype, batch_size=args.batch_size, shard_tokens=args.shard_tokens,
                         resume=args.resume, seed=args.seed, special_tokens=args.special_tokens)
        if rank == 0 and shards is not None:
            print(f"wrote {shards.n_tokens:,} tokens x {shards.d} ({shards.dtype}) from {adata.n_obs} cells "
                  f"in {len(shards.shard_names)} shards to {args.out}")
    return 0
