"""`steer()`: one streamed pass of an intervention over a whole AnnData.

    res = steer(sae, model, adata, Scale({123: 2.0}), layer=12, predictions=True)
    res.obsm["X_emb_base"], res.obsm["X_emb_steered"]     # [cells, d]
    res.layers["pred_base"], res.layers["pred_steered"]   # [cells, genes] (predictions=True only)
    res.var                                               # per-gene streamed statistics (see below)
    res.uns["steering"]                                   # the recipe: model, SAE, layer, edit, versions

Per batch of cells, blocks 0..L run once (`forward(layer=L, stop=True)`); the unsteered and the steered
suffixes both start from that prefix (`forward(layer=L, start=...)`), so a steered run costs L+1 + 2 (n-L-1)
blocks instead of the 2 n of two hooked full forwards. An edit that is a no-op by construction reuses the
unsteered suffix.

Statistics per gene are streamed, so memory does not grow with the number of cells: for each output (base,
steered) and for the paired difference steered - base, the count n, the mean and the sum of squared
deviations m2 (Chan et al.'s pairwise merge of per-batch sums: the sums and sums of squares of the paired
differences, in the numerically stable centred form). That is all the paired t-test needs (`deg`).
`res.var` holds them: n, mean_base, m2_base, mean_steered, m2_steered, mean_diff, m2_diff, and `expressed`
([Y]'s code rule: mean raw count > 0.01 or non-zero in > 0.5% of cells). Genes are the model's vocabulary
genes present in the AnnData, in model order.

`out=DIR` makes the run resumable: the state (statistics, embeddings, cells done) is saved atomically every
`checkpoint_every` batches as DIR/steer.partial.npz; a rerun with the same recipe continues from there, and
the finished result is DIR/steered.h5ad. Under torchrun each rank takes a contiguous block of cells (as
`extract`); rank 0 gathers the statistics and embeddings and returns the AnnData, the other ranks None.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from sae_fast.errors import UserError
from sae_fast.steer.interventions import Intervention
from sae_fast.utils import atomic_path, progress

STATE = "steer.partial.npz"
RESULT = "steered.h5ad"


class GeneStats:
    """Streamed per-gene count, mean and sum of squared deviations (m2), merged batch by batch (Chan et al.
    1979), in float64."""

    def __init__(self, n_genes: int):
        self.n = np.zeros(n_genes, np.int64)
        self.mean = np.zeros(n_genes)
        self.m2 = np.zeros(n_genes)

    def add(self, values: np.ndarray, genes: np.ndarray) -> None:
        G = self.n.size
        nb = np.bincount(genes, minlength=G)
        sb = np.bincount(genes, weights=values, minlength=G)
        mb = np.divide(sb, nb, out=np.zeros(G), where=nb > 0)
        m2b = np.bincount(genes, weights=(values - mb[genes]) ** 2, minlength=G)
        self.merge(nb, mb, m2b)

    def merge(self, nb, mb, m2b) -> None:
        n = self.n + nb
        delta = mb - self.mean
        safe = np.maximum(n, 1)
        self.mean = self.mean + delta * nb / safe
        self.m2 = self.m2 + m2b + delta ** 2 * self.n * nb / safe
        self.n = n

    def state(self) -> tuple:
        return self.n, self.mean, self.m2

    @property
    def var(self) -> np.ndarray:
        """Unbiased variance (ddof = 1); NaN where n < 2."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 1, self.m2 / np.maximum(self.n - 1, 1), np.nan)


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("sae-fast", "torch", "numpy", "scipy", "anndata"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def sae_recipe(sae) -> dict:
    import dataclasses

    cfg = getattr(sae, "cfg", None)
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
    d = {k: ("none" if v is None else v) for k, v in d.items()}
    return {"path": str(getattr(sae, "source_path", "none")), **d}


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


class SteerPass:
    """A streamed pass with several edited arms sharing one prefix and one unsteered suffix per batch.

    arms: name -> Intervention (one steered suffix each). compare: (a, b) pairs whose paired differences
    a - b are accumulated per gene ("base" is the unsteered output). Embeddings (and predictions, if asked)
    are kept per arm for the cells [lo, hi)."""

    def __init__(self, sae, model, arms: Mapping[str, Intervention], layer: int, genes: list[str], lo: int,
                 hi: int, *, compare: Iterable[tuple[str, str]] = (), predictions: bool = False,
                 base: bool = True):
        self.sae, self.model, self.layer = sae, model, layer
        self.arms = dict(arms)
        if "base" in self.arms:
            raise UserError("an intervention cannot be named 'base' (the unsteered output's name)")
        self.outputs = (["base"] if base else []) + list(self.arms)
        self.compare = [tuple(c) for c in compare]
        for a, b in self.compare:
            if a not in self.outputs or b not in self.outputs:
                raise UserError(f"compare {a!r} - {b!r}: both must be among {self.outputs}")
        self.genes = genes
        index = {g: i for i, g in enumerate(map(str, model.genes))}
        self.lut = np.full(len(model.genes), -1, np.int64)
        self.lut[[index[g] for g in genes]] = np.arange(len(genes))
        self.lo, self.hi = lo, hi
        n, d = hi - lo, model.embedding_dim
        self.emb = {k: np.full((n, d), np.nan, np.float32) for k in self.outputs}
        self.pred = {k: np.full((n, len(genes)), np.nan, np.float32) for k in self.outputs} if predictions \
            else None
        self.stats = {k: GeneStats(len(genes)) for k in self.outputs}
        self.diffs = {c: GeneStats(len(genes)) for c in self.compare}
        self.done = lo
        self.has_expression = True

    # ------------------------------------------------------------------ one batch
    def step(self, batch, prefix: torch.Tensor) -> None:
        model, L = self.model, self.layer
        outs = {}
        base = model.forward(batch, layer=L, start=prefix) if "base" in self.outputs else None
        if base is not None:
            outs["base"] = base
        for name, iv in self.arms.items():
            edited = iv(prefix, batch, self.sae, model)
            if edited is None and base is None:
                edited = prefix
            outs[name] = base if edited is None else model.forward(batch, layer=L, start=edited)
        rows = batch.cell_ids.cpu().numpy() - self.lo
        first = next(iter(outs.values()))
        if first.embedding is None:
            raise UserError(f"{model.name} gives no cell embedding when steered at layer {L} (its embedding is "
                            "read before that block); steer at an earlier layer")
        for k, o in outs.items():
            self.emb[k][rows] = o.embedding.float().cpu().numpy()
        if first.expression is None:
            self.has_expression = False
        else:
            E = first.expression.shape[1]
            gid = batch.gene_ids[:, :E].cpu().numpy()
            valid = (gid >= 0) & batch.mask[:, :E].cpu().numpy()
            cols = np.where(valid, self.lut[np.maximum(gid, 0)], -1)
            keep = cols >= 0
            b_idx, t_idx = np.nonzero(keep)
            col = cols[keep]
            values = {k: o.expression[:, :E].double().cpu().numpy()[b_idx, t_idx] for k, o in outs.items()}
            for k, v in values.items():
                self.stats[k].add(v, col)
                if self.pred is not None:
                    self.pred[k][rows[b_idx], col] = v
            for a, b in self.compare:
                self.diffs[(a, b)].add(values[a] - values[b], col)
        self.done = int(batch.cell_ids.max()) + 1

    # ------------------------------------------------------------------ state (resume, ranks)
    def state(self) -> dict:
        out = {"done": np.array(self.done), "has_expression": np.array(self.has_expression)}
        for k in self.outputs:
            out[f"emb/{k}"] = self.emb[k]
            if self.pred is not None:
                out[f"pred/{k}"] = self.pred[k]
            for name, a in zip(("n", "mean", "m2"), self.stats[k].state()):
                out[f"stats/{k}/{name}"] = a
        for i, c in enumerate(self.compare):
            for name, a in zip(("n", "mean", "m2"), self.diffs[c].state()):
                out[f"diff/{i}/{name}"] = a
        return out

    def load(self, state: Mapping) -> None:
        self.done = int(state["done"])
        self.has_expression = bool(state["has_expression"])
        for k in self.outputs:
            self.emb[k] = np.array(state[f"emb/{k}"])
            if self.pred is not None:
                self.pred[k] = np.array(state[f"pred/{k}"])
            s = self.stats[k]
            s.n, s.mean, s.m2 = (np.array(state[f"stats/{k}/{n}"]) for n in ("n", "mean", "m2"))
        for i, c in enumerate(self.compare):
            s = self.diffs[c]
            s.n, s.mean, s.m2 = (np.array(state[f"diff/{i}/{n}"]) for n in ("n", "mean", "m2"))

    def absorb(self, other: SteerPass) -> None:
        """Append another rank's cells (the next block) and merge its statistics."""
        for k in self.outputs:
            self.emb[k] = np.concatenate([self.emb[k], other.emb[k]])
            if self.pred is not None:
                self.pred[k] = np.concatenate([self.pred[k], other.pred[k]])
            self.stats[k].merge(*other.stats[k].state())
        for c in self.compare:
            self.diffs[c].merge(*other.diffs[c].state())
        self.hi, self.done = other.hi, other.done
        self.has_expression &= other.has_expression


def prefixes(model, prepared, layer: int, offset: int = 0):
    """Yield (batch, block-L output) for each batch of a prepared stream: the shared prefix."""
    device = _model_device(model)
    for batch in prepared:
        batch = batch._replace(cell_ids=batch.cell_ids + offset).to(device)
        yield batch, model.forward(batch, layer=layer, stop=True).hidden


def data_genes(model, adata) -> list[str]:
    """The model's vocabulary genes present in the AnnData, in model order."""
    names = set(map(str, adata.var_names))
    return [g for g in map(str, model.genes) if g in names]


def expressed_genes(adata, genes: list[str]) -> np.ndarray:
    """Bool per gene of `genes`: [Y]'s code rule (mean raw count > 0.01 or non-zero in > 0.5% of cells)."""
    from sae_fast.interpret.features import gene_filter

    keep = gene_filter(adata, "code")
    kept = set(map(str, adata.var_names[keep]))
    return np.array([g in kept for g in genes], bool)


def validate(sae, model, layer: int, interventions) -> None:
    model.check_layer(layer)
    if sae.W_dec.shape[1] != model.d_model:
        raise UserError(f"the SAE reads d = {sae.W_dec.shape[1]} but {model.name} has d_model = "
                        f"{model.d_model}; use an SAE trained on this model")
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise UserError(f"intervention {iv!r} is not a Scale, Add, Clamp or Ablate")
        iv.validate(sae, model)


def prepare_sae(sae, model):
    """The SAE on the model's device, in eval mode (a BatchTopK SAE then encodes by its threshold)."""
    return sae.to(_model_device(model)).eval()


def run_pass(sae, model, adata, arms: Mapping[str, Intervention], layer: int, *, compare=(),
             predictions: bool = False, base: bool = True, batch_size: int = 8, out=None,
             recipe: dict | None = None, checkpoint_every: int = 64, rank: int | None = None,
             world_size: int | None = None, desc: str = "steer") -> SteerPass | None:
    """The streamed pass behind `steer` and `alpha_sweep` (see the module docstring)."""
    validate(sae, model, layer, arms.values())
    sae = prepare_sae(sae, model)
    if rank is None or world_size is None:
        from sae_fast.activations.loader import world

        rank, world_size = world()
    n = adata.n_obs
    if n == 0:
        raise UserError("the AnnData has no cells to steer")
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    genes = data_genes(model, adata)
    p = SteerPass(sae, model, arms, layer, genes, lo, hi, compare=compare, predictions=predictions, base=base)
    state_path = None
    if out is not None:
        out = Path(out)
        state_path = out / (STATE if world_size == 1 else f"steer.rank{rank:05d}.partial.npz")
        key = json.dumps({**(recipe or {}), "cells": [lo, hi], "world_size": world_size}, sort_keys=True,
                         default=str)
        if state_path.exists():
            with np.load(state_path, allow_pickle=False) as z:
                if str(z["recipe"]) != key:
                    raise UserError(f"{state_path}: a partial steering run of another recipe; delete it or "
                                    "choose another out folder")
                p.load(z)
            print(f"resuming steering in {out}: {p.done - lo}/{hi - lo} cells done")
    skip = p.done - lo
    todo = model.prepare(adata[p.done:hi] if (p.done, hi) != (0, n) else adata, batch_size=batch_size)
    bar = progress(total=hi - lo, desc=desc, unit="cell", disable=rank != 0)
    bar.update(skip)
    t0, seen = time.perf_counter(), 0
    with torch.inference_mode():
        for i, (batch, prefix) in enumerate(prefixes(model, todo, layer, offset=p.done), 1):
            p.step(batch, prefix)
            seen += len(batch.cell_ids)
            bar.update(len(batch.cell_ids))
            bar.set_postfix_str(f"{seen / max(time.perf_counter() - t0, 1e-9):.1f} cells/s")
            if state_path is not None and i % checkpoint_every == 0 and p.done < hi:
                _save_state(state_path, p, key)
    bar.close()
    import torch.distributed as dist

    if world_size > 1 and dist.is_available() and dist.is_initialized():
        p = _gather(p, rank, world_size)
    if state_path is not None and state_path.exists():
        state_path.unlink()
    return p


def _save_state(path: Path, p: SteerPass, key: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, recipe=np.array(key), **p.state())


def _gather(p: SteerPass, rank: int, world_size: int) -> SteerPass | None:
    import torch.distributed as dist

    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(p.state() | {"lo": p.lo, "hi": p.hi}, parts, dst=0)
    if rank != 0:
        return None
    for part in parts[1:]:
        other = SteerPass(p.sae, p.model, p.arms, p.layer, p.genes, int(part["lo"]), int(part["hi"]),
                          compare=p.compare, predictions=p.pred is not None, base="base" in p.outputs)
        other.load(part)
        p.absorb(other)
    return p


def _h5ad_value(v):
    """uns-safe: None (which h5ad cannot store) -> 'none', recursively."""
    if v is None:
        return "none"
    if isinstance(v, Mapping):
        return {str(k): _h5ad_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_h5ad_value(x) for x in v] if v else []
    return v


def to_anndata(p: SteerPass, adata, arm: str, expressed: np.ndarray, recipe: dict):
    """The result AnnData of one steered arm against the unsteered output."""
    import anndata as ad
    import pandas as pd

    var = pd.DataFrame(index=pd.Index(p.genes, name="gene"))
    var["expressed"] = expressed
    for k, name in (("base", "base"), (arm, "steered")):
        s = p.stats[k]
        var[f"n_{name}"], var[f"mean_{name}"], var[f"m2_{name}"] = s.n, s.mean, s.m2
    d = p.diffs[(arm, "base")]
    var["n"], var["mean_diff"], var["m2_diff"] = d.n, d.mean, d.m2
    res = ad.AnnData(obs=adata.obs.iloc[p.lo:p.hi].copy(), var=var)
    res.obsm["X_emb_base"] = p.emb["base"]
    res.obsm["X_emb_steered"] = p.emb[arm]
    if p.pred is not None:
        res.layers["pred_base"] = p.pred["base"]
        res.layers["pred_steered"] = p.pred[arm]
    res.uns["steering"] = _h5ad_value({**recipe, "has_expression": p.has_expression})
    return res


def make_recipe(sae, model, layer: int, interventions: Mapping[str, Intervention], batch_size: int,
                **extra) -> dict:
    return {"model": model.name, "model_layers": int(model.n_layers), "d_model": int(model.d_model),
            "sae": sae_recipe(sae), "layer": int(layer), "batch_size": int(batch_size),
            "interventions": {k: iv.recipe() for k, iv in interventions.items()}, "versions": _versions(),
            **extra}


def steer(sae, model, adata, intervention: Intervention, layer: int, *, predictions: bool = False,
          batch_size: int = 8, out=None, checkpoint_every: int = 64, rank: int | None = None,
          world_size: int | None = None):
    """Run `intervention` at block `layer` over every cell of `adata`; see the module docstring.

    predictions: keep [cells x genes] predicted expression as layers pred_base / pred_steered (small data
    only; the per-gene statistics in `var` are streamed either way). out: a folder for resumable state and
    the finished steered.h5ad. Returns the AnnData (None on ranks other than 0 under torchrun)."""
    recipe = make_recipe(sae, model, layer, {"steered": intervention}, batch_size,
                         intervention=intervention.recipe(),
                         tokens=intervention.tokens if isinstance(intervention.tokens, str)
                         else list(intervention.tokens), n_cells=int(adata.n_obs))
    p = run_pass(sae, model, adata, {"steered": intervention}, layer, compare=[("steered", "base")],
                 predictions=predictions, batch_size=batch_size, out=out, recipe=recipe,
                 checkpoint_every=checkpoint_every, rank=rank, world_size=world_size)
    if p is None:
        return None
    res = to_anndata(p, adata, "steered", expressed_genes(adata, p.genes), recipe)
    if out is not None:
        with atomic_path(Path(out) / RESULT) as tmp:
            res.write_h5ad(tmp)
    return res


__all__ = ["GeneStats", "SteerPass", "steer", "run_pass", "prefixes", "data_genes", "expressed_genes"]
