"""Fused training source: token activations straight from the model's forward pass, never touching the disk.

    source = fused_source(model, adata, layer, config)  # what train_sae(model=m, adata=a, layer=L) uses
    for x in source: ...                                  # x: [n, d] float32 tensors on the model's device

Two batching schemes, chosen by the token selection:
  * whole cells (Yanovsky & Chernomoretz [Y]; `tokens` all or expressed): each item is every selected token
    of one forward batch of `cells_per_batch` cells (8 in [Y]: ~154k tokens for AIDO.Cell). Cells come in a
    seeded random order that changes every epoch.
  * per-cell token sampling (Pedrocchi et al. [P]; `tokens="sample:N"`): N tokens of each cell go into a
    mixing buffer of `buffer_tokens` rows; when it is full its rows are permuted and batches of `batch_size`
    tokens are cut from it (the rest is carried over). The draw changes every epoch, as does the mix.
Both are deterministic for (seed, epoch). Each `iter()` is an epoch; `set_epoch(e)` sets it for resume. The
trainer re-batches the stream to its `batch_size`: for [Y]'s scheme set it to cells_per_batch x tokens per
cell (8 x 19,264 for AIDO.Cell) so that one forward batch is one step.

Options are read from `config` (a TrainConfig or any object) by attribute name, and keyword arguments win:
tokens ("all"), cells_per_batch (8), buffer_tokens (2**18), batch_size (4096; tokens per item, scheme [P]),
seed (0). Under torch.distributed each rank takes an equal share of the cells; its token count can still
differ from the other ranks' (expressed genes, sampled cells with fewer genes than N), so the trainer, not this
source, keeps the ranks in step (sae_fast.sae.train: one agreement per SAE step). Iterating runs no collective
operation, so a rank may read ahead of the others.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sae_fast.activations.extract import parse_tokens, select_tokens

DEFAULTS = {"tokens": "all", "cells_per_batch": 8, "buffer_tokens": 1 << 18, "batch_size": 4096, "seed": 0}


class FusedSource:
    """A re-iterable of [n, d] activation batches computed by the forward pass (see the module docstring)."""

    def __init__(self, model, adata, layer: int, config=None, **options):
        from sae_fast.activations.distributed import world

        model.check_layer(layer)
        self.model, self.adata, self.layer = model, adata, int(layer)
        opt = {k: options.get(k, getattr(config, k, None)) for k in DEFAULTS}
        opt = {k: DEFAULTS[k] if v is None else v for k, v in opt.items()}
        self.rule, self.n_sample = parse_tokens(opt["tokens"])
        self.cells_per_batch, self.buffer_tokens = int(opt["cells_per_batch"]), int(opt["buffer_tokens"])
        self.batch_size, self.seed = int(opt["batch_size"]), int(opt["seed"])
        self.rank, self.world_size = world()
        self.epoch = 0
        self.d = model.d_model

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @functools.cached_property
    def n_tokens(self) -> int:
        """Tokens this rank yields per epoch, counted by tokenising without the forward pass (cheap), so that
        the trainer can size its schedule without an extra pass through the model."""
        cells = np.sort(self._cells(0))
        n = sum(int(select_tokens(b, self.rule, self.n_sample, seed=(self.seed, 0)).sum())
                for b in self.model.prepare(self.adata[cells], batch_size=64))
        if self.world_size > 1:  # every rank must plan the same number of steps
            from sae_fast.activations.distributed import min_over_ranks

            n = min_over_ranks(n)
        return n

    def _cells(self, epoch: int) -> np.ndarray:
        """This rank's cells for an epoch, in a seeded random order (equal counts on every rank)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.adata.n_obs)
        per_rank = self.adata.n_obs // self.world_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def _forward_tokens(self, epoch: int):
        """[n, d] selected activations of each forward batch of cells."""
        cells = self._cells(epoch)
        device = next(self.model.parameters()).device
        view = self.adata[cells]  # one prepare per epoch, cells in shuffled order
        for batch in self.model.prepare(view, batch_size=self.cells_per_batch):
            batch = batch._replace(cell_ids=torch.from_numpy(cells)[batch.cell_ids])
            with torch.no_grad():  # not around the yield: the consumer's autograd must stay on
                hidden = self.model.forward(batch.to(device), layer=self.layer, stop=True).hidden
            keep = select_tokens(batch, self.rule, self.n_sample, seed=(self.seed, epoch))
            yield hidden[keep.to(hidden.device)].float()

    def _mixed(self, epoch: int):
        """Scheme [P]: sampled tokens through a mixing buffer, cut into batches of `batch_size`."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        held: list[torch.Tensor] = []
        n_held = 0
        for x in self._forward_tokens(epoch):
            held.append(x)
            n_held += len(x)
            if n_held >= self.buffer_tokens:
                buf = torch.cat(held)
                buf = buf[torch.from_numpy(rng.permutation(len(buf))).to(buf.device)]
                n_out = len(buf) // self.batch_size * self.batch_size
                yield from buf[:n_out].split(self.batch_size)
                held, n_held = [buf[n_out:]], len(buf) - n_out
        if n_held:
            buf = torch.cat(held)
            buf = buf[torch.from_numpy(rng.permutation(len(buf))).to(buf.device)]
            yield from buf.split(self.batch_size)

    def __iter__(self):
        epoch = self.epoch
        yield from (self._mixed(epoch) if self.rule == "sample" else self._forward_tokens(epoch))
        self.epoch = epoch + 1


def fused_source(model, adata, layer: int, config=None, **options) -> FusedSource:
    """The token stream of `model` at `layer` over `adata`, for `train_sae` without shards; see the module."""
    return FusedSource(model, adata, layer, config, **options)
