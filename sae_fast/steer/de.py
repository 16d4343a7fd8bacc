"""Differentially expressed genes of a steered run, and GO enrichment of each side (SPEC §3, [Y]'s code rules).

    table = deg(res)                      # gene, n, mean_diff, t, p, p_adj, significant, direction
    up, down = top_degs(table)            # the top 100 significant genes up / down by mean difference
    sweep = alpha_sweep(sae, model, adata, feature=123, alphas=[-5, -2, 2, 5], layer=12)
    sweep.table                           # [Y]'s Table 1: per alpha, n DEGs up / down and top terms each side

The test is scipy's `ttest_rel` (steered vs unsteered predictions of the same cells) computed from the streamed
per-gene statistics of `steer` (count, mean and sum of squared deviations of the paired differences), so no
[cells x genes] matrix is needed. [Y]'s rules (scripts/utils/data_utils.py compute_de_genes): a NaN t (a gene
whose difference has zero variance) gives t = 0 and p = 1; a gene is significant where p < 0.05 / n_genes
(Bonferroni over the expressed genes: mean raw count > 0.01 or non-zero in > 0.5% of cells) and |t| > 0;
genes are ranked by mean difference; the top 100 up and the top 100 down are each tested for GO enrichment
(our `ora`) against the expressed genes as background. `alpha_sweep` also compares every alpha against alpha = 0
(all the feature's activity removed) as well as against the unsteered model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from sae_fast.errors import UserError


def paired_t(n, mean, m2) -> tuple[np.ndarray, np.ndarray]:
    """scipy.stats.ttest_rel's t and two-sided p from the count, mean and m2 of the paired differences, with
    [Y]'s rule: NaN (zero variance with zero mean, or n < 2) -> t = 0, p = 1."""
    from scipy import stats

    n = np.asarray(n, np.float64)
    mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = np.where(n > 1, m2 / (n - 1), np.nan)
        t = mean / np.sqrt(var / n)
        p = 2 * stats.t.sf(np.abs(t), n - 1)
    bad = np.isnan(t) | np.isnan(p)
    return np.where(bad, 0.0, t), np.where(bad, 1.0, p)


def deg_table(genes, n, mean, m2, expressed, *, alpha: float = 0.05, expressed_only: bool = True) -> pd.DataFrame:
    """The DEG table from per-gene statistics of paired differences (see `deg`)."""
    t, p = paired_t(n, mean, m2)
    expressed = np.asarray(expressed, bool)
    df = pd.DataFrame({"gene": np.asarray(genes, dtype=object), "n": np.asarray(n), "mean_diff": mean,
                       "t": t, "p": p, "expressed": expressed})
    if expressed_only:
        df = df[expressed].reset_index(drop=True)
    n_tests = int(df["expressed"].sum()) if not expressed_only else len(df)
    n_tests = max(n_tests, 1)
    df["p_adj"] = np.minimum(df["p"] * n_tests, 1.0)
    df["significant"] = (df["p"] < alpha / n_tests) & (df["t"].abs() > 0) & df["expressed"]
    df["direction"] = np.where(df["significant"], np.where(df["mean_diff"] > 0, "up", "down"), "")
    return df


def deg(res, *, alpha: float = 0.05, expressed_only: bool = True) -> pd.DataFrame:
    """Paired t-test per gene, steered vs unsteered, from the streamed statistics in `res.var` (a `steer`
    result; no predictions layer needed). Columns: gene, n, mean_diff, t, p, expressed, p_adj (Bonferroni
    over the expressed genes), significant, direction (up / down / '')."""
    var = getattr(res, "var", None)
    need = ("n", "mean_diff", "m2_diff", "expressed")
    if var is None or any(c not in var for c in need):
        raise UserError("deg() needs the result of sae_fast.steer.steer (res.var with n, mean_diff, m2_diff, "
                        "expressed)")
    if not res.uns.get("steering", {}).get("has_expression", True):
        raise UserError(f"{res.uns['steering'].get('model')} predicted no expression in this run: nothing to "
                        "test")
    return deg_table(var.index, var["n"].to_numpy(), var["mean_diff"].to_numpy(), var["m2_diff"].to_numpy(),
                     var["expressed"].to_numpy(), alpha=alpha, expressed_only=expressed_only)


def top_degs(table: pd.DataFrame, n_top: int = 100) -> tuple[list[str], list[str]]:
    """The significant genes with the largest positive and the most negative mean differences."""
    sig = table[table["significant"]]
    up = sig[sig["mean_diff"] > 0].sort_values("mean_diff", ascending=False, kind="stable")
    down = sig[sig["mean_diff"] < 0].sort_values("mean_diff", ascending=True, kind="stable")
    return list(up["gene"][:n_top]), list(down["gene"][:n_top])


def enrich_sides(up: list[str], down: list[str], background: list[str], gene_sets="go_bp", *,
                 q: float = 0.05, library=None) -> pd.DataFrame:
    """ORA of the up and the down genes against `background`; the significant rows, column side = up/down."""
    from sae_fast.interpret.enrich import ora

    queries = {k: v for k, v in (("up", up), ("down", down)) if v}
    if not queries:
        return pd.DataFrame(columns=["side", "term", "name", "overlap", "query_size", "q_value"])
    df = ora(queries, gene_sets, background, max_q=q, overlap_genes=True, library=library)
    df = df[df.q_value < q].rename(columns={"query": "side"})
    df["side"] = df["side"].astype(str)
    return df.sort_values(["side", "q_value"], kind="stable").reset_index(drop=True)


def top_terms(enr: pd.DataFrame, side: str, n: int = 3) -> str:
    rows = enr[enr["side"] == side].head(n)
    return "; ".join(f"{r.name} ({r.term})" for r in rows.itertuples())


class SweepResult(NamedTuple):
    table: pd.DataFrame  # [Y]'s Table 1: feature, alpha, n_up, n_down, top_up_terms, top_down_terms (+ _vs0)
    degs: dict  # (alpha, versus) -> DEG table, versus in {"unsteered", "alpha=0"}
    enrichment: pd.DataFrame  # significant ORA rows: alpha, versus, side, term, name, q_value, ...
    flipped: pd.DataFrame  # terms enriched on opposite sides at alpha and -alpha (vs unsteered)


def _arm(alpha: float) -> str:
    return f"alpha={alpha:g}"


def alpha_sweep(sae, model, adata, feature: int, alphas, layer: int, *, gene_sets="go_bp", n_top: int = 100,
                n_terms: int = 3, q: float = 0.05, tokens="all", batch_size: int = 8, out=None) -> SweepResult:
    """Scale one feature by each alpha in one streamed pass (a shared prefix and unsteered suffix per batch);
    per alpha the DEGs against the unsteered model and against alpha = 0, and GO terms of each side."""
    from sae_fast.interpret.enrich import compile_library
    from sae_fast.interpret.genesets import load_gene_sets
    from sae_fast.steer.interventions import Scale, check_features
    from sae_fast.steer.runner import expressed_genes, make_recipe, run_pass

    check_features([feature], sae, "alpha_sweep")
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise UserError("alpha_sweep: give at least one alpha (e.g. alphas=[-5, -2, 0, 2, 5])")
    arms = {_arm(a): Scale({feature: a}, tokens=tokens) for a in dict.fromkeys(alphas + [0.0])}
    compare = [(k, "base") for k in arms] + [(k, _arm(0.0)) for k in arms if k != _arm(0.0)]
    recipe = make_recipe(sae, model, layer, arms, batch_size, feature=int(feature), alphas=alphas)
    p = run_pass(sae, model, adata, arms, layer, compare=compare, batch_size=batch_size, out=out,
                 recipe=recipe, desc=f"alpha sweep f{feature}")
    if p is None:
        return None
    if not p.has_expression:
        model.require_expression(None, hint="an alpha sweep needs predictions")
    expressed = expressed_genes(adata, p.genes)
    background = [g for g, e in zip(p.genes, expressed) if e]
    lib = compile_library(load_gene_sets(gene_sets), background)
    rows, degs, enrs = [], {}, []
    for a in alphas:
        row = {"feature": int(feature), "alpha": a}
        for versus, ref, suffix in (("unsteered", "base", ""), ("alpha=0", _arm(0.0), "_vs0")):
            if ref == _arm(a):
                continue
            s = p.diffs[(_arm(a), ref)]
            table = deg_table(p.genes, s.n, s.mean, s.m2, expressed, alpha=q)
            up, down = top_degs(table, n_top)
            enr = enrich_sides(up, down, background, gene_sets, q=q, library=lib)
            degs[(a, versus)] = table
            enrs.append(enr.assign(alpha=a, versus=versus))
            n_up, n_down = (int((table.direction == d).sum()) for d in ("up", "down"))
            row.update({f"n_up{suffix}": n_up, f"n_down{suffix}": n_down,
                        f"top_up_terms{suffix}": top_terms(enr, "up", n_terms),
                        f"top_down_terms{suffix}": top_terms(enr, "down", n_terms)})
        rows.append(row)
    enrichment = pd.concat(enrs, ignore_index=True) if enrs else pd.DataFrame()
    return SweepResult(pd.DataFrame(rows), degs, enrichment, flipped_terms(enrichment))


def flipped_terms(enrichment: pd.DataFrame) -> pd.DataFrame:
    """Terms enriched up at one alpha and down at another (vs unsteered): [Y]'s Table 1 pattern, where opposite
    alphas enrich the same terms on opposite sides."""
    cols = ["term", "name", "alpha_up", "alpha_down"]
    if enrichment.empty:
        return pd.DataFrame(columns=cols)
    e = enrichment[enrichment["versus"] == "unsteered"]
    up, down = e[e.side == "up"], e[e.side == "down"]
    m = up[["term", "name", "alpha"]].merge(down[["term", "alpha"]], on="term", suffixes=("_up", "_down"))
    m = m[np.sign(m.alpha_up) != np.sign(m.alpha_down)]
    return m[cols].astype({"term": str, "name": str}).drop_duplicates().reset_index(drop=True)


__all__ = ["SweepResult", "alpha_sweep", "deg", "deg_table", "enrich_sides", "flipped_terms", "paired_t",
           "top_degs"]
