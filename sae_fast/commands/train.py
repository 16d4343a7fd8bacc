"""`sae-fast train`: train an SAE on activation shards, or fused inside a model's forward pass."""

from __future__ import annotations

HELP = "train a sparse autoencoder on activation shards (--shards) or inside the forward pass (--model)"
DESCRIPTION = """\
Train a sparse autoencoder on residual-stream activations, from either source:
  shards  --shards DIR (made by `sae-fast extract`): streamed through a shuffling mixing buffer whose memory
          does not depend on the data set's size;
  fused   --model NAME[:PATH] --data FILE.h5ad --layer L: the SAE trains inside the model's forward pass and
          nothing is written to disk; --tokens all streams whole cells ([Y]: steps of 8 cells = --batch-size
          8 x tokens per cell), --tokens sample:N gives [P]'s per-cell token sampling through a mixing buffer.
The checkpoint (SAELens-style safetensors + cfg.json) and the trainer state go to --out; rerunning the same
command after a kill resumes exactly where the last checkpoint left off.

Data-parallel: `torchrun --nproc-per-node N -m sae_fast train ...` runs N processes (NCCL on GPUs, gloo on the
CPU); --batch-size stays the global batch: each rank takes its 1/N slice of every global batch, gradients and
dead-latent counters are averaged, and only rank 0 writes.

Examples:
  sae-fast train --shards acts/ --out sae/ --arch topk --k 32 --expansion 8
  sae-fast train --model mini --data pbmc3k --layer 3 --out sae/ --tokens sample:256 --epochs 2
"""

SOURCE_OPTIONS = ("tokens", "cells_per_batch", "buffer_tokens")


def _train_config():
    from sae_fast.sae.train import TrainConfig

    return TrainConfig


def add_arguments(parser):
    from sae_fast.commands.extract import add_counts_argument, add_device_arguments
    from sae_fast.config import add_arguments as add_config

    src = parser.add_argument_group("source (one of --shards or --model/--data/--layer)")
    src.add_argument("--shards", metavar="DIR", help="activation shard directory from `sae-fast extract`")
    src.add_argument("--model", metavar="NAME[:PATH]", help="train fused inside this model's forward pass "
                     "(mini, aido_cell_100m:DIR, ...)")
    src.add_argument("--data", metavar="FILE.h5ad", help="cells as raw counts for --model (.h5ad or a "
                     "bundled name such as pbmc3k)")
    add_counts_argument(src)
    add_device_arguments(src, device=False)
    src.add_argument("--layer", type=int, help="block L whose output the SAE reads (with --model)")
    src.add_argument("--tokens", default="all", help="with --model: all / expressed ([Y]'s whole-cell "
                     "batches) or sample:N ([P]'s per-cell sampling through a mixing buffer) (default: all)")
    src.add_argument("--cells-per-batch", type=int, default=8, help="with --model: cells per forward pass "
                     "([Y]: 8; for [Y]'s whole-cell steps also set --batch-size to 8 x tokens per cell) "
                     "(default: 8)")
    src.add_argument("--buffer-tokens", type=int, default=1 << 18,
                     help="with --model --tokens sample:N: mixing-buffer rows (default: 262144)")
    src.add_argument("--buffer-mb", type=float, default=32,
                     help="with --shards: mixing-window size in MB; bounds the loader's RAM (default: 32)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory: SAE checkpoint + "
                        "trainer state (resumes if present)")
    add_config(parser, _train_config(), skip=("out_dir",))


def run(args):
    import dataclasses

    from sae_fast.activations.distributed import process_group
    from sae_fast.config import from_args
    from sae_fast.errors import UserError

    cfg = from_args(_train_config(), args)
    cfg = dataclasses.replace(cfg, out_dir=args.out)
    fused = args.model is not None
    if fused == (args.shards is not None):
        raise UserError("give exactly one source: --shards DIR, or --model NAME --data FILE --layer L")
    if fused and (args.data is None or args.layer is None):
        raise UserError("--model needs --data FILE.h5ad and --layer L (fused training)")
    from sae_fast import train_sae

    with process_group() as (rank, world_size):
        if cfg.batch_size % world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must be a multiple of "
                            f"the {world_size} processes")
        per_rank = dataclasses.replace(cfg, batch_size=cfg.batch_size // world_size)
        if fused:
            from sae_fast.activations.fused import fused_source
            from sae_fast.commands.extract import parse_model
            from sae_fast.run.config import read_cells

            model = parse_model(args.model, cfg.device, args.model_dtype)  # the model where the SAE trains
            model.check_layer(args.layer)
            _check_d(cfg, model.d_model, f"model {model.name}")
            source = fused_source(model, read_cells(args.data, args.counts, where="--counts"), args.layer, per_rank,
                                  tokens=args.tokens, cells_per_batch=args.cells_per_batch,
                                  buffer_tokens=args.buffer_tokens)
        else:
            from sae_fast import open_shards

            shards = open_shards(args.shards)
            _check_d(cfg, shards.d, f"shards {args.shards}")
            source = shards.loader(cfg.batch_size, seed=cfg.seed, buffer_mb=args.buffer_mb)
        sae = train_sae(source, config=per_rank)
        if rank == 0:
            print(f"trained {type(sae).__name__} ({sae.W_dec.shape[0]} features x {sae.W_dec.shape[1]}) "
                  f"on {world_size} process(es); saved to {args.out}")
    return 0


def _check_d(cfg, d: int, what: str) -> None:
    from sae_fast.errors import UserError

    if cfg.d_in is not None and cfg.d_in != d:
        raise UserError(f"{what} has d = {d} but --d-in is {cfg.d_in}; drop --d-in or use matching "
                        "activations")
