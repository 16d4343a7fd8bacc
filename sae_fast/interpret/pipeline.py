"""`interpret_sae`: one streaming pass over the data, then every interpretation table of SPEC §2.

    result = interpret_sae(sae, model, adata, layer=12)   # gene_sets="go_bp", gene_filter="paper"
    print(format_summary(result))
    write_results(result, "out/")                          # tables/*.parquet|csv + annotated.h5ad

The pass runs the model to `layer` (nothing beyond it), encodes every gene token with the SAE and feeds the
sparse code into a FeatureGeneAccumulator (F matrix, per-cell max/mean pools, activation-expression pairs);
the raw residual dimensions go through a second accumulator as the "raw neurons" baseline, and a random token
sample feeds the ICA baseline. Then SAE features, raw neurons and ICA components pass through the identical
`annotate_matrix` (PR -> top genes -> ORA over the filtered genes), followed by the comparisons, the overlap
graph, cell-level AMI/F1 against obs labels, gene-level properties and the immune-marker enrichment.

On the bundled mini model the numbers demonstrate the method; they are not [Y]'s AIDO.Cell-100M results, which
need the real checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from sae_fast.config import option
from sae_fast.errors import UserError
from sae_fast.interpret.cells import best_features, normalise_by_max
from sae_fast.interpret.enrich import compile_library, ora
from sae_fast.interpret.features import FeatureGeneAccumulator, gene_filter
from sae_fast.interpret.genes import expression_spearman, family_shares
from sae_fast.interpret.genesets import load_gene_sets
from sae_fast.interpret.overlap import overlap_graph
from sae_fast.interpret.summary import annotate_matrix, compare_bases, ica_matrix
from sae_fast.utils import progress

LABEL_HINTS = ("cell_type", "celltype", "bulk_labels", "lineage", "batch", "patient", "sample", "chemistry",
               "technology", "assay", "source", "disease")


@dataclasses.dataclass
class InterpretConfig:
    """How SAE features are interpreted (SPEC §2): gene filter, top-gene rule, gene sets, baselines."""

    gene_sets: str = option("go_bp", "gene-set library: go_bp, go_cc, go_mf, immune_markers, a GMT file, "
                            "or enrichr:LIBRARY (needs a network)")
    gene_filter: str = option("paper", "background genes: 'paper' ([Y]: non-zero in at least half the "
                              "cells and mean log1p(CPM) >= 0.01), 'code' ([Y]'s code: mean count > 0.01 or "
                              "non-zero in more than 0.5 percent of cells) or 'none'",
                              choices=("paper", "code", "none"))
    top_rule: str = option("paper", "top genes per feature: 'paper' = round(PR), 'code' = clip(int(PR * s), "
                           "clip_min, clip_max)", choices=("paper", "code"))
    s: float = option(0.6, "scale s of the 'code' top-gene rule (0.6 or 1.0 in [Y]'s code)",
                      bounds="(0, inf)")
    clip_min: int = option(10, "lower clip of the 'code' top-gene rule", bounds="[1, inf)")
    clip_max: int = option(100, "upper clip of the 'code' top-gene rule", bounds="[1, inf)")
    alpha: float = option(0.05, "significance level on BH q-values", bounds="(0, 1]")
    baselines: list[str] = option(default_factory=lambda: ["raw", "ica"],
                                  help="baselines through the identical pipeline: raw (residual "
                                  "neurons), ica", choices=("raw", "ica"))
    ica_sample: int = option(5000, "tokens sampled to fit the ICA baseline (FastICA, d components)",
                             bounds="[1, inf)")
    overlap_threshold: float = option(0.2, "edge threshold of the feature overlap graph", bounds="[0, 1]")
    label_keys: list[str] = option(default_factory=list, help="obs columns for the cell-level AMI/F1 tables "
                                   "(default: those among cell_type, batch, chemistry, ... that exist)")
    markers: str = option("immune_markers", "cell-type marker library tested against each feature's top "
                          "genes "
                          "('' to skip)")
    batch_size: int = option(8, "cells per forward batch", bounds="[1, inf)")
    max_pairs: int = option(2_000_000, "activation-expression pairs kept for the Spearman test",
                            bounds="[1, inf)")
    seed: int = option(0, "seed of the token samples (ICA, Spearman pairs)")


class InterpretResult(NamedTuple):
    # one row per SAE feature: pr, top genes, n_sig, best term, max_ic, spearman, families
    features: pd.DataFrame
    enrichment: pd.DataFrame  # significant ORA rows of every basis (column basis: sae / raw / ica)
    bases: pd.DataFrame  # per basis: n_features, n_enriched, share_enriched, median_max_ic
    components: pd.DataFrame  # overlap-graph components with their shared terms
    cell_association: pd.DataFrame  # best features per obs label value (AMI, F1)
    markers: pd.DataFrame  # significant marker-set rows for SAE features
    top_genes: pd.DataFrame  # each SAE feature's top genes (up to TOP_GENES_KEPT) with their F activation
    F: np.ndarray  # [n_features, n_background] SAE feature x gene matrix over the background genes
    genes: list[str]  # the background genes (columns of F)
    adata: object  # the input AnnData, annotated: obsm X_sae_max / X_sae_mean, uns sae_interpret
    summary: dict  # headline numbers (shares, Mann-Whitney, sizes)


def model_tokens(model, adata, layer: int, batch_size: int = 8) -> Iterable[tuple]:
    """Yield (x [N, d], gene_ids [N], cell_ids [N], expression [N]): the gene tokens of each forward batch."""
    model.check_layer(layer)
    prepared = model.prepare(adata, batch_size=batch_size)
    with torch.no_grad():
        for batch in prepared:
            hidden = model.forward(batch, layer=layer, stop=True).hidden
            sel = batch.mask & (batch.gene_ids >= 0)
            cells = batch.cell_ids[:, None].expand_as(batch.gene_ids)
            yield hidden[sel], batch.gene_ids[sel], cells[sel], batch.expression[sel]


def shard_tokens(shards, model=None, batch_tokens: int = 65536) -> Iterable[tuple]:
    """Yield (x, gene_ids, cell_ids, None) over an activation shard directory (`sae_fast.open_shards`), in
    order.

    Shards hold no input expression, so the expression-level Spearman test is skipped (NaN) on this path."""
    if model is not None and shards.genes is not None and list(shards.genes) != list(map(str, model.genes)):
        raise UserError(f"the shards in {shards.dir} index {len(shards.genes)} genes that differ from "
                        f"{getattr(model, 'name', 'the model')}'s {len(model.genes)}; use the model they "
                        "were "
                        "extracted with")
    for start in range(0, shards.n_tokens, batch_tokens):
        stop = min(start + batch_tokens, shards.n_tokens)
        yield (shards.read(start, stop).float(),
               torch.from_numpy(shards.gene_ids(start, stop).astype(np.int64)),
               torch.from_numpy(shards.cell_ids(start, stop).astype(np.int64)), None)


class _TokenSample:
    """A uniform random sample of at most n token vectors from a stream (random keys, keep the n smallest)."""

    def __init__(self, n: int, seed: int):
        self.n, self.gen = n, torch.Generator().manual_seed(seed)
        self.keys, self.rows = torch.zeros(0), None

    def add(self, x: torch.Tensor) -> None:
        keys = torch.cat([self.keys, torch.rand(x.shape[0], generator=self.gen)])
        rows = x.cpu() if self.rows is None else torch.cat([self.rows, x.cpu()])
        if keys.numel() > self.n:
            keep = keys.topk(self.n, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows


def _encode(sae, x):
    code = sae.encode(x.to(next(iter(sae.parameters())).device if hasattr(sae, "parameters") else x.device))
    if isinstance(code, torch.Tensor):
        return code.detach().cpu()
    return type(code)(code.indices.detach().cpu(), code.values.detach().cpu())


def _n_features(sae) -> int:
    for attr in ("n_features", "num_latents"):
        n = getattr(sae, attr, None) or getattr(getattr(sae, "cfg", None), attr, None)
        if n:
            return int(n)
    return int(sae.W_dec.shape[0])


def interpret_sae(sae, model, adata, layer: int, *, config: InterpretConfig | None = None, tokens=None,
                  **overrides) -> InterpretResult:
    """Interpret every feature of `sae` on `model`'s layer `layer` over the cells of `adata` (see module doc).

    tokens: optional iterable of (x, gene_ids, cell_ids, expression) batches to use instead of running the
    model (e.g. read from shards); gene_ids index `model.genes`, cell_ids the rows of `adata`. Keyword
    overrides set InterpretConfig fields (gene_sets=..., gene_filter=..., top_rule=...).
    Like scanpy's tl functions it annotates `adata` in place (obsm X_sae_max / X_sae_mean, uns)."""
    cfg = dataclasses.replace(config or InterpretConfig(), **overrides)
    unknown = set(cfg.baselines) - {"raw", "ica"}
    if unknown:
        raise UserError(f"unknown baseline(s) {sorted(unknown)}; choose from raw, ica")
    if cfg.top_rule not in ("paper", "code"):
        raise UserError(f"top_rule {cfg.top_rule!r} unknown; choose 'paper' or 'code'")
    sets = load_gene_sets(cfg.gene_sets)
    model_genes = list(map(str, model.genes))
    d = int(getattr(model, "d_model", sae.W_dec.shape[1]))
    if sae.W_dec.shape[1] != d:
        raise UserError(f"the SAE reads d={sae.W_dec.shape[1]} but {getattr(model, 'name', 'the model')} has "
                        f"d_model={d}; train the SAE on this model's layer")
    n_feat = _n_features(sae)
    keep = gene_filter(adata, cfg.gene_filter)
    kept = set(map(str, adata.var_names[keep]))
    bg_idx = np.array([i for i, g in enumerate(model_genes) if g in kept], np.int64)
    if bg_idx.size == 0:
        raise UserError(f"no gene passes the {cfg.gene_filter!r} filter and is in the model's vocabulary; "
                        "try --gene-filter code or none")
    genes = [model_genes[i] for i in bg_idx]
    lib = compile_library(sets, genes)

    n_cells = adata.n_obs
    acc = FeatureGeneAccumulator(n_feat, len(model_genes), n_cells, max_pairs=cfg.max_pairs, seed=cfg.seed)
    raw = FeatureGeneAccumulator(d, len(model_genes), n_cells, max_pairs=0) if cfg.baselines else None
    sample, n_seen = _TokenSample(cfg.ica_sample, cfg.seed), 0
    stream = tokens if tokens is not None else model_tokens(model, adata, layer, cfg.batch_size)
    with torch.no_grad(), progress(desc="interpret", unit="tok", unit_scale=True) as bar:
        for x, gene_ids, cell_ids, expr in stream:
            x = torch.as_tensor(x).float()
            acc.add(_encode(sae, x), gene_ids, cell_ids, expr)
            if raw is not None:
                raw.add(x.cpu(), gene_ids, cell_ids)
                if "ica" in cfg.baselines:
                    sample.add(x)
            n_seen += x.shape[0]
            bar.update(x.shape[0])
    if n_seen == 0:
        raise UserError("the model produced no gene tokens for these cells; check the AnnData's genes")
    res = acc.result()
    F = res.F[:, bg_idx]

    ica_converged = None

    def annotate(M):  # the identical pipeline for every basis
        return annotate_matrix(M, genes, sets, rule=cfg.top_rule, s=cfg.s, clip=(cfg.clip_min, cfg.clip_max),
                               alpha=cfg.alpha, library=lib)

    ann = {"sae": annotate(F)}
    if raw is not None:
        F_raw = raw.result().F[:, bg_idx]
        if "raw" in cfg.baselines:
            ann["raw"] = annotate(F_raw)
        if "ica" in cfg.baselines:
            F_ica, ica_converged = _ica(sample.rows.numpy(), F_raw, cfg.seed)
            ann["ica"] = annotate(F_ica)
    comp = compare_bases({k: a.features for k, a in ann.items()})
    enrichment = pd.concat([a.enrichment.assign(basis=k) for k, a in ann.items()], ignore_index=True)

    feats = ann["sae"].features.copy()
    feats["expr_spearman"] = expression_spearman(res.pairs, n_feat)
    feats = pd.concat([feats, family_shares(F, genes).add_prefix("family_")], axis=1)
    graph = overlap_graph(ann["sae"].top, ann["sae"].enrichment, cfg.overlap_threshold)
    feats["component"] = graph.component

    markers = pd.DataFrame()
    if cfg.markers:
        mq = {str(i): t for i, t in enumerate(ann["sae"].top) if t}
        markers = ora(mq, cfg.markers, genes, max_q=cfg.alpha) if mq else markers
        if len(markers):
            markers = markers[markers.q_value < cfg.alpha].rename(columns={"query": "feature"})
            markers["feature"] = markers["feature"].astype(int)
            best = markers.sort_values("q_value", kind="stable").drop_duplicates("feature")
            feats["best_marker"] = best.set_index("feature")["term"].reindex(feats.feature).to_numpy()

    top_genes = top_gene_table(F, genes, ann["sae"].top)
    X = normalise_by_max(res.cell_max)
    keys = cfg.label_keys or [k for k in LABEL_HINTS if k in adata.obs and 2 <= adata.obs[k].nunique() <= 200]
    cells = best_features(X, adata.obs, keys)

    adata.obsm["X_sae_max"] = res.cell_max
    adata.obsm["X_sae_mean"] = res.cell_mean
    summary = {
        "n_features": n_feat, "n_cells": n_cells, "n_tokens": n_seen, "n_background_genes": len(genes),
        "gene_sets": str(cfg.gene_sets), "gene_filter": cfg.gene_filter, "top_rule": cfg.top_rule,
        "layer": layer,
        **{f"share_enriched_{r.basis}": r.share_enriched for r in comp.table.itertuples()},
        "mannwhitney_max_ic_u": comp.mannwhitney_u, "mannwhitney_max_ic_p": comp.mannwhitney_p,
        "n_components": len(graph.components), "label_keys": keys,
        **({} if ica_converged is None else {"ica_converged": ica_converged, "ica_max_iter": ICA_MAX_ITER}),
    }
    adata.uns["sae_interpret"] = {k: (v if not isinstance(v, float) or math.isfinite(v) else "nan")
                                  for k, v in summary.items() if not isinstance(v, list)}
    return InterpretResult(feats, enrichment, comp.table, graph.components, cells, markers, top_genes, F, genes,
                           adata, summary)


TOP_GENES_KEPT = 20


def top_gene_table(F: np.ndarray, genes: list[str], top: list[list[str]]) -> pd.DataFrame:
    """One row per (feature, rank) for each feature's first TOP_GENES_KEPT top genes, with F[feature, gene]."""
    col = {g: j for j, g in enumerate(genes)}
    rows = [(i, r, g, float(F[i, col[g]])) for i, t in enumerate(top) for r, g in enumerate(t[:TOP_GENES_KEPT])]
    return pd.DataFrame(rows, columns=["feature", "rank", "gene", "activation"])


TABLES = ("features", "enrichment", "bases", "components", "cell_association", "markers", "top_genes")


def write_results(result: InterpretResult, out_dir, *, h5ad: bool = True) -> list[Path]:
    """Write every table (parquet if pyarrow is installed, else CSV) and the annotated AnnData, atomically.

    Returns the paths written: out_dir/tables/<name>.parquet|csv and out_dir/annotated.h5ad."""
    from sae_fast.utils import atomic_path, write_json, write_table

    out = Path(out_dir)
    paths = [write_table(out / "tables" / name, getattr(result, name)) for name in TABLES]
    write_json(out / "summary.json", result.summary)
    paths.append(out / "summary.json")
    if h5ad and result.adata is not None:
        adata = result.adata
        adata.uns["sae_features"] = _h5ad_safe(result.features)
        adata.uns["sae_bases"] = _h5ad_safe(result.bases)
        adata.uns["sae_cell_association"] = _h5ad_safe(result.cell_association)
        path = out / "annotated.h5ad"
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
        paths.append(path)
    return paths


def _h5ad_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns as plain strings (h5ad cannot store mixed None/str columns)."""
    df = df.copy()
    for c in df.columns:
        if df[c].dtype == object or isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(str).replace({"None": "", "nan": ""})
    return df


ICA_MAX_ITER = 200


def _ica(sample: np.ndarray, F_raw: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
    """The ICA baseline's F and whether FastICA converged within ICA_MAX_ITER iterations (its
    ConvergenceWarning is caught and counted, not shown mid-progress-bar nor hidden)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        F_ica = ica_matrix(sample, F_raw, seed=seed, max_iter=ICA_MAX_ITER)[0]
    return F_ica, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def format_summary(result: InterpretResult, features: list[int] | None = None, n_examples: int = 3) -> str:
    """A short text summary: enriched shares per basis, the Mann-Whitney test on max IC, a few example
    features (given, or the most significant ones with distinct best terms) with their top genes and terms."""
    s = result.summary
    lines = [f"Interpretation of {s['n_features']} SAE features over {s['n_cells']} cells "
             f"({s['n_tokens']:,} gene tokens; background {s['n_background_genes']} genes, "
             f"filter {s['gene_filter']!r}; {s['gene_sets']})"]
    for r in result.bases.itertuples():
        lines.append(f"  {r.basis:>4}: {r.n_enriched}/{r.n_features} features with >= 1 significant term "
                     f"({100 * r.share_enriched:.1f}%), median max IC {r.median_max_ic:.2f}")
    if s.get("ica_converged") is False:
        lines.append(f"  ica: FastICA reached its {s['ica_max_iter']}-iteration limit without converging; its "
                     "components are approximate")
    if math.isfinite(s.get("mannwhitney_max_ic_p", float("nan"))):
        lines.append(f"  Mann-Whitney U on max IC, SAE vs raw neurons: U = {s['mannwhitney_max_ic_u']:.0f}, "
                     f"p = {s['mannwhitney_max_ic_p']:.3g}")
    feats = result.features
    if features is not None:
        bad = [f for f in features if not 0 <= f < len(feats)]
        if bad:
            raise UserError(f"feature {bad[0]} is out of range: the SAE has features 0..{len(feats) - 1}")
        chosen = list(features)
    else:
        # the most significant feature of each distinct best term: examples that show different biology
        enriched = feats[feats.n_sig > 0].sort_values("best_q", kind="stable")
        chosen = list(enriched.drop_duplicates("best_term").feature[:n_examples])
    enr = result.enrichment[result.enrichment.basis == "sae"]
    for f in chosen:
        row = feats.iloc[f]
        terms = enr[enr.feature == f].sort_values("q_value", kind="stable").head(3)
        shown = ", ".join(str(row.top_genes).split(";")[:8])
        lines.append(f"  feature {f}: PR {row.pr:.1f}, top genes {shown}")
        for t in terms.itertuples():
            lines.append(f"      {t.term} {t.name} (q = {t.q_value:.2g}, overlap {t.overlap}/{t.query_size})")
        if terms.empty:
            lines.append("      no significant term")
    if len(result.components):
        c = result.components.iloc[0]
        lines.append(f"  overlap graph: {len(result.components)} components of >= 2 features; largest has "
                     f"{c.n_features} features" + (f", sharing {c.shared_terms}" if c.shared_terms else ""))
    assoc = result.cell_association
    if len(assoc):
        best = assoc.sort_values("rank", kind="stable").groupby(["key", "label"], sort=False).head(1)
        for key, rows in best.groupby("key", sort=False):
            shown = "; ".join(f"{r.label} f{r.feature} ({r.ami:.2f}, {r.f1:.2f})" for r in rows.itertuples())
            lines.append(f"  best feature per {key} (AMI, F1): {shown}")
    fam = [c for c in feats.columns if c.startswith("family_")]
    if fam:
        dominated = {c[7:]: int((feats[c] > 0.5).sum()) for c in fam}
        listed = ", ".join(f"{k} {v}" for k, v in dominated.items() if v)
        lines.append(f"  gene-family features (> 50% of active genes): {listed or 'none'}")
    return "\n".join(lines)


__all__ = ["InterpretConfig", "InterpretResult", "interpret_sae", "write_results", "format_summary",
           "model_tokens", "shard_tokens"]
