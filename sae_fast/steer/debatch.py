"""Batch removal by clamp steering, scored with scIB metrics ([P], SPEC §3).

    ranked = rank_features(sae, model, adata, layer=L, label="batch")     # feature, ami, ... best first
    res = debatch(sae, model, adata, layer=L, batch_key="stim", label_key="cell_type")
    print(format_debatch(res)); write_debatch(res, "runs/kang")            # tables/debatch.csv, figures/*.png

1. Rank features by label ([P]'s rule, sae4scfm core/analysis.py): each feature's per-cell max over the cell's
   gene tokens, divided by its max over all tokens; for t in {0, .2, .4, .6, .8} the AMI between one label value
   (one vs rest) and "some token of the cell is above t"; the feature's score is the max over t and over the
   label's values. The statistics are sae_fast.interpret.cells' (`rank_by_label`).
2. Clamp the top n batch features to c (sae_fast.steer.Clamp: where active, z_i := c, and the reconstruction
   replaces x at every real token, [P]'s code) and re-embed. One streamed pass (sae_fast.steer.run_pass) runs
   blocks 0..L once per batch of cells and every clamp set's suffix from that prefix.
3. Baselines: the unsteered embedding (which is also n = 0: Clamp on no feature is no edit), the unintegrated
   embedding (scanpy: normalise to 10^4, log1p, 5,000 HVGs flavor cell_ranger with the batch key, PCA 30) and
   random feature sets of the same n (seeds 42, 43, 44; np.random.RandomState(seed).choice, as [P]).
4. Score every embedding with scib-metrics (sae_fast.steer.scib: Leiden NMI/ARI, default BatchCorrection,
   no min-max scaling, total = 0.6 bio + 0.4 batch), the unintegrated PCA as PCR comparison's reference.

The tidy table has one row per (n, c, selector, seed): selector ami | random | unsteered | unintegrated; each
metric, bio, batch, total.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sae_fast.config import option
from sae_fast.errors import UserError

if TYPE_CHECKING:
    import pandas as pd


@dataclasses.dataclass
class DebatchConfig:
    """[debatch]: clamp the top batch features ([P]), re-embed, and score with scIB metrics."""

    batch_key: str = option("batch", "obs column of the batch whose features are clamped and whose mixing scIB "
                            "scores (Kang 2018: stim; bundled data: batch)")
    label_key: str = option("cell_type", "obs column of the cell types (bio conservation)")
    n_features: list[int] = option(default_factory=lambda: list(range(0, 101, 10)),
                                   help="numbers of top batch features to clamp ([P]: 0..100 step 10)")
    clamp: list[float] = option(default_factory=lambda: [-2.0, 0.0],
                                help="clamp values c ([P]: -2; 0 = ablate)")
    seeds: list[int] = option(default_factory=lambda: [42, 43, 44],
                              help="seeds of the random feature sets of the same n ([P]: 42, 43, 44)")
    error_term: bool = option(False, "keep the SAE error term x - SAE(x) (false = [P]'s code: the edited "
                              "reconstruction replaces x)")
    encode: str = option("batch", "BatchTopK SAEs: encode over the batch's tokens ([P]'s code) or by the learned "
                         "threshold", choices=("batch", "threshold"))
    n_hvg: int = option(5000, "highly variable genes of the unintegrated baseline ([P]: 5,000, cell_ranger)")
    n_pcs: int = option(30, "principal components of the unintegrated baseline ([P]: 30)")
    max_cells: int | None = option(None, "score a random subset of this many cells (seeded; None = all)")
    seed: int = option(0, "seed of the cell subset")
    umap_n: list[int] = option(default_factory=lambda: [20],
                               help="draw UMAPs of the top-n clamp at these n (first c), beside the unsteered and "
                               "unintegrated ones ([] = none)")
    batch_size: int = option(8, "cells per forward batch")


class DebatchResult(NamedTuple):
    table: pd.DataFrame  # tidy: n, c, selector, seed, embedding, each metric, bio, batch, total
    ranking: pd.DataFrame  # feature, ami, label, ami_threshold: best batch features first
    embeddings: dict  # embedding name -> [n_cells, d] array (unsteered, unintegrated, clamp arms)
    obs: pd.DataFrame  # the scored cells' obs
    config: DebatchConfig
    layer: int


# ----------------------------------------------------------------------------------------- feature ranking


def cell_max_pool(sae, model, adata, layer: int, *, batch_size: int = 8) -> np.ndarray:
    """[n_cells, F]: each SAE feature's maximum over each cell's gene tokens at block `layer` (0 if never
    active), from one forward pass to block `layer`."""
    import torch

    from sae_fast.interpret.pipeline import model_tokens
    from sae_fast.steer.interventions import encode
    from sae_fast.utils import progress

    F = int(sae.W_dec.shape[0])
    out = torch.zeros(adata.n_obs, F)
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad(), progress(total=adata.n_obs, desc="rank features", unit="cell") as bar:
            for x, _, cells, _ in model_tokens(model, adata, layer, batch_size):
                code = encode(sae, x.to(sae.W_dec.device))
                v = code.values.float().clamp_min(0).cpu()
                rows = cells.cpu()[:, None].expand_as(code.indices) * F + code.indices.cpu()
                out.view(-1).scatter_reduce_(0, rows.reshape(-1), v.reshape(-1), "amax")
                bar.update(int(cells.unique().numel()))
    finally:
        sae.train(was_training)
    return out.numpy()


def rank_features(sae, model, adata, layer: int, label: str, *, batch_size: int = 8) -> pd.DataFrame:
    """Every SAE feature ranked by [P]'s AMI with the obs column `label` (batch, technology, condition, cell
    type; see the module docstring). Columns: feature, ami, label (the value that gave it), ami_threshold."""
    from sae_fast.interpret.cells import normalise_by_max, rank_by_label

    if label not in adata.obs:
        raise UserError(f"obs has no column {label!r}; columns: {', '.join(map(str, adata.obs.columns))}")
    if adata.obs[label].nunique() < 2:
        raise UserError(f"obs column {label!r} has a single value; ranking features needs at least two")
    X = normalise_by_max(cell_max_pool(sae, model, adata, layer, batch_size=batch_size))
    return rank_by_label(X, adata.obs[label].to_numpy())


# ------------------------------------------------------------------------------------------------ baselines


def unintegrated_embedding(adata, batch_key: str, n_hvg: int = 5000, n_pcs: int = 30) -> np.ndarray:
    """[P]'s unintegrated baseline: normalise_total(1e4) + log1p of the raw counts, the `n_hvg` highly variable
    genes (flavor cell_ranger, batch_key), PCA with `n_pcs` components (scanpy, arpack)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    a = ad.AnnData(X=adata.X.copy(), obs=adata.obs[[batch_key]].copy(), var=pd.DataFrame(index=adata.var_names))
    a.var_names_make_unique()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(n_hvg, a.n_vars), flavor="cell_ranger", batch_key=batch_key)
    a = a[:, a.var.highly_variable].copy()
    n_comps = min(n_pcs, a.n_vars - 1, a.n_obs - 1)
    sc.tl.pca(a, n_comps=n_comps, svd_solver="arpack", random_state=0)
    return np.asarray(a.obsm["X_pca"], np.float32)


def random_features(n_features: int, n: int, seed: int) -> list[int]:
    """[P]'s random selector: np.random.RandomState(seed).choice(F, n, replace=False)."""
    return [int(f) for f in np.random.RandomState(seed).choice(n_features, size=n, replace=False)]


# -------------------------------------------------------------------------------------------------- the sweep


def _arms(ranking: pd.DataFrame, F: int, cfg: DebatchConfig) -> tuple[dict, list[dict]]:
    """Clamp arms {name: Clamp} and the table rows [{n, c, selector, seed, embedding}]."""
    from sae_fast.steer.interventions import Clamp

    arms, rows = {}, []
    top = ranking["feature"].to_numpy()
    for c in cfg.clamp:
        for n in cfg.n_features:
            if not 0 <= n <= F:
                raise UserError(f"debatch.n_features: {n} is out of range: the SAE has {F} features")
            sets = [("ami", None, top[:n].tolist())] + [("random", s, random_features(F, n, s)) for s in cfg.seeds]
            for selector, seed, feats in sets:
                name = "unsteered" if n == 0 else f"{selector}_n{n}_c{c:g}" + (f"_seed{seed}" if seed is not None
                                                                                 else "")
                if n > 0:
                    arms[name] = Clamp(feats, value=c, error_term=cfg.error_term, encode=cfg.encode)
                rows.append({"n": n, "c": c, "selector": selector, "seed": seed, "embedding": name})
    return arms, rows


def debatch(sae, model, adata, layer: int, *, config: DebatchConfig | None = None, ranking=None,
            **overrides) -> DebatchResult:
    """The whole batch-removal experiment (see the module docstring). Keyword overrides set DebatchConfig
    fields; `ranking` (a `rank_features` table) skips the ranking pass."""
    import pandas as pd

    from sae_fast.steer.runner import run_pass
    from sae_fast.steer.scib import require_scib, scib_scores

    cfg = dataclasses.replace(config or DebatchConfig(), **overrides)
    require_scib()  # before any forward pass
    for key in (cfg.batch_key, cfg.label_key):
        if key not in adata.obs:
            raise UserError(f"obs has no column {key!r} (debatch); columns: {', '.join(map(str, adata.obs.columns))}")
    if cfg.max_cells is not None and cfg.max_cells < adata.n_obs:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(adata.n_obs, cfg.max_cells, replace=False))
        adata = adata[keep].copy()
    if ranking is None:
        ranking = rank_features(sae, model, adata, layer, cfg.batch_key, batch_size=cfg.batch_size)
    arms, rows = _arms(ranking, int(sae.W_dec.shape[0]), cfg)
    p = run_pass(sae, model, adata, arms, layer, batch_size=cfg.batch_size, desc="debatch")
    embeddings = {"unsteered": p.emb["base"], **{k: p.emb[k] for k in arms}}
    embeddings["unintegrated"] = unintegrated_embedding(adata, cfg.batch_key, cfg.n_hvg, cfg.n_pcs)
    scores = scib_scores(adata, embeddings, cfg.batch_key, cfg.label_key, pre_integrated="unintegrated")
    rows = [{"n": 0, "c": np.nan, "selector": "unsteered", "seed": None, "embedding": "unsteered"},
            {"n": np.nan, "c": np.nan, "selector": "unintegrated", "seed": None, "embedding": "unintegrated"}] + rows
    table = pd.DataFrame(rows)
    table["seed"] = table["seed"].astype("Int64")
    table = table.join(scores, on="embedding")
    return DebatchResult(table, ranking, embeddings, adata.obs.copy(), cfg, layer)


# ------------------------------------------------------------------------------------------------ reporting


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per (c, n): bio / batch / total of the top-n clamp and of the random sets (mean and sd over seeds)."""
    steered = table[table.selector.isin(["ami", "random"])]
    g = steered.groupby(["c", "n", "selector"])[["bio", "batch", "total"]]
    out = g.mean().unstack("selector")
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    sd = g.std().unstack("selector")
    for m in ("bio", "batch", "total"):
        if ("random" in steered.selector.values) and (m, "random") in sd.columns:
            out[f"{m}_random_sd"] = sd[(m, "random")]
    return out.reset_index()


def format_debatch(res: DebatchResult) -> str:
    """The printed summary: baselines, then per clamp value the top-n clamp against random sets."""
    t = res.table
    cfg = res.config
    lines = [f"batch removal by clamping ([P]): layer {res.layer}, batch '{cfg.batch_key}', cell type "
             f"'{cfg.label_key}', {len(res.obs)} cells",
             "top batch features: " + ", ".join(f"{r.feature} (AMI {r.ami:.3f})"
                                               for r in res.ranking.head(5).itertuples()),
             "", f"{'embedding':<28}{'bio':>8}{'batch':>8}{'total':>8}"]
    for name in ("unintegrated", "unsteered"):
        r = t[t.selector == name].iloc[0]
        lines.append(f"{name:<28}{r.bio:>8.3f}{r.batch:>8.3f}{r.total:>8.3f}")
    s = summary_table(t)
    for c, block in s.groupby("c"):
        lines += ["", f"clamp c = {c:g}: top-n batch features vs random sets (mean over seeds {cfg.seeds})",
                  f"{'n':>5}{'bio':>8}{'batch':>8}{'total':>8}   {'rand bio':>9}{'rand batch':>11}{'rand total':>11}"]
        for r in block.itertuples():
            lines.append(f"{int(r.n):>5}{r.bio_ami:>8.3f}{r.batch_ami:>8.3f}{r.total_ami:>8.3f}   "
                         f"{getattr(r, 'bio_random', np.nan):>9.3f}{getattr(r, 'batch_random', np.nan):>11.3f}"
                         f"{getattr(r, 'total_random', np.nan):>11.3f}")
    return "\n".join(lines)


def umap_figure(embedding: np.ndarray, obs: pd.DataFrame, keys: list[str], path, title: str = "") -> Path:
    """A PNG of the scanpy UMAP of `embedding`, one panel per obs column in `keys`."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    from sae_fast.utils import save_figure

    a = ad.AnnData(obs=obs[keys].astype(str).astype("category").copy())
    a.obsm["X_emb"] = np.asarray(embedding, np.float32)
    sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=15, random_state=0)
    sc.tl.umap(a, random_state=0)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4.4))
    for ax, key in zip(np.atleast_1d(axes), keys):
        sc.pl.umap(a, color=key, ax=ax, show=False, frameon=False, title=f"{title} - {key}" if title else key)
    fig.tight_layout()
    return save_figure(fig, path)


def write_debatch(res: DebatchResult, out) -> list[Path]:
    """tables/debatch.csv (the tidy table), tables/debatch_ranking.csv, tables/debatch_summary.txt and
    figures/umap_unsteered.png, umap_unintegrated.png, umap_clamp_n{n}.png (batch and cell type)."""
    from sae_fast.utils import atomic_path

    out = Path(out)
    written = []
    for name, df in (("debatch", res.table), ("debatch_ranking", res.ranking)):
        with atomic_path(out / "tables" / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        written.append(out / "tables" / f"{name}.csv")
    with atomic_path(out / "tables" / "debatch_summary.txt") as tmp:
        tmp.write_text(format_debatch(res) + "\n")
    written.append(out / "tables" / "debatch_summary.txt")
    cfg = res.config
    keys = [cfg.batch_key, cfg.label_key]
    figs = {"unsteered": "unsteered", "unintegrated": "unintegrated"}
    c0 = cfg.clamp[0] if cfg.clamp else None
    for n in cfg.umap_n:
        name = f"ami_n{n}_c{c0:g}" if c0 is not None else None
        if name in res.embeddings:
            figs[f"clamp_n{n}"] = name
    for fig, name in figs.items():
        title = name if fig != f"clamp_n{fig[7:]}" else f"top-{fig[7:]} batch features clamped to {c0:g}"
        written.append(umap_figure(res.embeddings[name], res.obs, keys, out / "figures" / f"umap_{fig}.png",
                                   title=title))
    return written
