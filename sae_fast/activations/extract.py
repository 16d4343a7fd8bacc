"""Extraction: run a model up to layer L over an AnnData; write the chosen tokens' residual vectors to shards.

    shards = sae_fast.extract(model, adata, layer=12, out="acts/", tokens="sample:256", dtype="float16")

Token selection (`tokens`), always among gene tokens (those with a gene id, inside the mask):
    all         every gene token. The model's special tokens (AIDO.Cell's two depth tokens, <cls>, padding)
                are left out unless `special_tokens=True`; they are stored with gene id -1.
    expressed   gene tokens whose input expression is > 0.
    sample:N    N gene tokens per cell drawn uniformly without replacement (all of them if the cell has
                fewer), as Pedrocchi et al. [P] (250 in the paper, 256 in their code). The draw for a cell
                depends only on (seed, cell index), not on batching or on resuming.
`gene_filter` (a list of gene names) keeps only those genes' tokens. Everything that shapes the output is
recorded in manifest.json, and `resume=True` refuses a directory written with different settings.

The forward stops at the layer (`stop=True`: no later block runs) under `torch.inference_mode`. Shards end on
forward-batch boundaries and the manifest records how many cells are done with each complete shard, so a
killed run restarted with `resume=True` redoes at most the shard in progress, and its files are byte-identical
to an uninterrupted run's (same model, data, settings, device).

Split by rank (`rank`, `world_size`, or the initialised torch.distributed group): rank r takes a contiguous
block of cells and writes its own shards (`rank00001_00000.*`, manifest.rank00001.json); when all ranks are
done, `merge_ranks(out)` (called by rank 0 after a barrier under torchrun) writes the combined manifest.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from sae_fast.activations.shards import Shards, ShardWriter, _read_manifest, dtype_name, open_shards
from sae_fast.errors import UserError
from sae_fast.utils import progress, say, write_json


def parse_tokens(tokens: str) -> tuple[str, int | None]:
    """'all' | 'expressed' | 'sample:N' -> (rule, N)."""
    t = str(tokens).strip().lower()
    if t in ("all", "expressed"):
        return t, None
    if t.startswith("sample:"):
        try:
            n = int(t.split(":", 1)[1])
        except ValueError:
            n = 0
        if n > 0:
            return "sample", n
    raise UserError(f"tokens={tokens!r}: choose all, expressed or sample:N with N a positive integer "
                    "(e.g. sample:256)")


def gene_mask(model, gene_filter) -> torch.Tensor | None:
    """Bool mask over the model's genes from a list of names (None = all genes); unknown names are errors."""
    if gene_filter is None:
        return None
    genes = list(gene_filter)
    index = {g: i for i, g in enumerate(model.genes)}
    unknown = [g for g in genes if g not in index]
    if unknown:
        raise UserError(f"gene_filter: {len(unknown)} gene(s) not in {model.name}'s vocabulary, e.g. "
                        f"{', '.join(unknown[:5])}; use the model's gene symbols")
    keep = torch.zeros(len(model.genes), dtype=torch.bool)
    keep[[index[g] for g in genes]] = True
    return keep


def select_tokens(batch, rule: str, n: int | None, *, keep_genes: torch.Tensor | None = None,
                  special_tokens: bool = False, seed: int | tuple = 0) -> torch.Tensor:
    """Bool [B, T]: the tokens of a CellBatch to keep under a token-selection rule (see the module docstring).

    A sampled cell's draw is seeded by (*seed, cell index): pass (seed, epoch) to redraw every epoch."""
    gene_ids, mask = batch.gene_ids.cpu(), batch.mask.cpu()
    is_gene = (gene_ids >= 0) & mask
    if keep_genes is not None:
        is_gene &= keep_genes[gene_ids.clamp_min(0)]
    if rule == "expressed":
        is_gene &= batch.expression.cpu() > 0
    elif rule == "sample":
        picked = torch.zeros_like(is_gene)
        for b, cell in enumerate(batch.cell_ids.tolist()):
            cand = torch.nonzero(is_gene[b]).flatten().numpy()
            if len(cand) > n:
                cand = np.random.default_rng([*np.atleast_1d(seed), cell]).choice(cand, n, replace=False)
            picked[b, torch.from_numpy(np.sort(cand))] = True
        is_gene = picked
    if special_tokens:
        is_gene |= (gene_ids < 0) & mask
    return is_gene


def extract(model, adata, layer: int, out: str | os.PathLike, *, tokens: str = "all",
            gene_filter: list[str] | None = None, dtype="float16", batch_size: int = 8,
            shard_tokens: int = 1 << 18, resume: bool = False, seed: int = 0, special_tokens: bool = False,
            rank: int | None = None, world_size: int | None = None, device=None) -> Shards | None:
    """Write the residual stream of `model` at block `layer` for the selected tokens of `adata` to `out`.

    Returns the opened shards (None on a rank other than 0 of a split run; see the module docstring).
    `batch_size` cells go through each forward pass; `shard_tokens` is the minimum tokens per shard file."""
    model.check_layer(layer)
    rule, n_sample = parse_tokens(tokens)
    keep_genes = gene_mask(model, gene_filter)
    dtype = dtype_name(dtype)
    if rank is None or world_size is None:
        from sae_fast.activations.loader import world

        rank, world_size = world()
    out = Path(out)
    n_cells = adata.n_obs
    lo, hi = rank * n_cells // world_size, (rank + 1) * n_cells // world_size
    meta = {"model": model.name, "layer": int(layer), "n_cells": n_cells,
            "tokens": {"rule": rule, "n_per_cell": n_sample, "special_tokens": special_tokens, "seed": seed},
            "gene_filter": None if gene_filter is None else sorted(set(gene_filter)),
            "batch_size": batch_size, "world_size": world_size, "cells": [lo, hi], "genes": list(model.genes)}
    writer = ShardWriter(out, model.d_model, dtype, shard_tokens=shard_tokens, meta=meta, resume=resume,
                         prefix="shard" if world_size == 1 else f"rank{rank:05d}")
    if not writer.complete:
        _run(model, adata, layer, writer, lo, hi, rule, n_sample, keep_genes, special_tokens, seed,
             batch_size, device, show=rank == 0)
    if world_size == 1:
        return open_shards(out)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if rank == 0:
            merge_ranks(out)
            return open_shards(out)
    return None


def _run(model, adata, layer, writer: ShardWriter, lo, hi, rule, n_sample, keep_genes, special_tokens, seed,
         batch_size, device, show: bool = True) -> None:
    done = int(writer.state.get("cells_done", lo))
    if done > lo and show:
        say(f"resuming extraction in {writer.dir}: {done - lo}/{hi - lo} cells done, "
            f"{writer.manifest['n_tokens']} tokens in {len(writer.manifest['shards'])} shards")
    part = adata[done:hi] if (done, hi) != (0, adata.n_obs) else adata
    device = torch.device(device) if device is not None else next(model.parameters()).device
    bar = progress(total=hi - done, desc=f"extract layer {layer}", unit="cell",
                   disable=not show)
    n_tok, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for batch in model.prepare(part, batch_size=batch_size):
            batch = batch._replace(cell_ids=batch.cell_ids + done)
            hidden = model.forward(batch.to(device), layer=layer, stop=True).hidden
            keep = select_tokens(batch, rule, n_sample, keep_genes=keep_genes, special_tokens=special_tokens,
                                 seed=seed)
            b_idx, t_idx = torch.nonzero(keep, as_tuple=True)
            acts = hidden[b_idx.to(hidden.device), t_idx.to(hidden.device)]
            cells_done = int(batch.cell_ids[-1]) + 1
            writer.add(acts, batch.cell_ids[b_idx], batch.gene_ids.cpu()[b_idx, t_idx],
                       state={"cells_done": cells_done})
            n_tok += len(b_idx)
            bar.update(len(batch.cell_ids))
            bar.set_postfix_str(f"{n_tok / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
    bar.close()
    writer.close(state={"cells_done": hi})


def merge_ranks(out: str | os.PathLike) -> None:
    """Combine the per-rank manifests of a split extraction into one manifest.json (ranks in order)."""
    out = Path(out)
    parts = sorted(out.glob("manifest.rank*.json"))
    if not parts:
        raise UserError(f"{out}: no per-rank manifests (manifest.rank*.json) to merge")
    ms = [_read_manifest(p) for p in parts]
    if len(ms) != ms[0]["world_size"] or not all(m["complete"] for m in ms):
        raise UserError(f"{out}: {len(ms)} of {ms[0]['world_size']} ranks have manifests, "
                        f"{sum(m['complete'] for m in ms)} complete; rerun the missing ranks with --resume")
    merged = {k: v for k, v in ms[0].items() if k not in ("cells", "state", "shards", "n_tokens")}
    merged.update(cells=[0, ms[0]["n_cells"]], state={}, complete=True,
                  shards=[s for m in ms for s in m["shards"]], n_tokens=sum(m["n_tokens"] for m in ms))
    write_json(out / "manifest.json", merged)
