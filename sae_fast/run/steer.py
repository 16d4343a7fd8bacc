"""The optional `steer` stage ([Y]'s steering, SPEC §3) with the run's SAE, after interpretation: an alpha sweep
of one feature ([Y]'s Table 1) and contrastive steering of `source` cells toward `target` cells, each against
its reference ([Y]'s numbers; a random-feature control). Runs when the config has a [steer] section;
`sae-fast steer CONFIG.toml` runs the same job on its own (sae_fast/commands/steer.py).

Tables (tables/<name>.parquet, CSV without pyarrow):
    alpha_sweep           feature, alpha, n_up, n_down, top_up_terms, top_down_terms (+ the same _vs0: vs alpha=0)
    alpha_sweep_flipped   terms enriched up at one alpha and down at the opposite one
    deg_f<F>_a<alpha>     the DEG table of each alpha vs the unsteered model (gene, t, p, p_adj, mean_diff, ...)
    contrast_alphas       feature, alpha, changed (|alpha - 1| > 0.3), top_terms (by IC)
    contrast_cells        cell, dist_pre, dist_post, closer, heldout
    contrast_gap          gene, src, tgt, steered, gap, correct, direction, effect_size, cum_share_correct
    contrast_history      epoch, loss, control_loss
and tables/steer_summary.json (the headline numbers the summary prints).
"""

from __future__ import annotations

import dataclasses

from sae_fast.config import option
from sae_fast.errors import UserError
from sae_fast.run.context import Context, Stage
from sae_fast.run.summary import num

Y_CLOSER = 0.81  # [Y], AIDO.Cell-100M, CD4 T -> CD8 T, PBMC3K
Y_GAP_UP, Y_GAP_DOWN = 0.70, 0.65


@dataclasses.dataclass
class SteerSection:
    """[steer]: steer cell identity with the run's SAE ([Y]): an alpha sweep and contrastive steering."""

    sweep: bool = option(True, "run an alpha sweep of one feature ([Y]'s Table 1)")
    feature: int | None = option(None, "feature of the alpha sweep (default: the annotated feature with the most "
                                 "significant GO term)")
    alphas: list[float] = option(default_factory=lambda: [-5.0, 5.0],
                                 help="alphas of the sweep ([Y] sweeps within [-5, 5]); each is also compared "
                                 "with alpha = 0")
    sweep_cells: int | None = option(None, "use only the first N cells for the sweep (default: all)")
    n_top: int = option(100, "top DEGs per side tested for enrichment ([Y]: 100)")
    source: str | None = option(None, "contrastive steering from cells of this label value (e.g. 'CD4 T'); "
                                "with target")
    target: str | None = option(None, "... toward the mean embedding of cells of this label value (e.g. "
                                "'CD8 T')")
    label: str = option("cell_type", "obs column holding source and target")
    objective: str = option("embedding", "embedding ([Y]) or expression", choices=("embedding", "expression"))
    distance: str = option("unsquared", "unsquared ([Y]'s code) or squared ([Y]'s paper)",
                           choices=("unsquared", "squared"))
    epochs: int = option(100, "contrastive optimisation epochs ([Y]: 100)")
    lr: float = option(0.01, "Adam learning rate ([Y]: 0.01)")
    lam: float = option(1e-3, "L1 weight on |alpha - 1| ([Y]: 1e-3)")
    source_cells: int | None = option(None, "use only N of the source cells, drawn at random (seeded; default: all)",
                                      bounds="[2, inf)")
    heldout: float = option(0.2, "share of source cells never seen by the optimisation")
    control: bool = option(True, "also learn alphas over as many randomly chosen features (the control)")
    checkpointing: bool = option(False, "gradient checkpointing of the suffix blocks (long contexts)")
    gene_sets: str = option("go_bp", "gene sets for the DEG enrichment ([Y]: GO BP)")
    seed: int = option(0, "seed of the held-out split, cell order and control features")


def _enrichment(ctx: Context):
    """The run's interpretation (its significant enrichment rows), if the interpret stage wrote one."""
    try:
        return ctx.folder.read_table("enrichment")
    except (FileNotFoundError, OSError):
        return None


def check(ctx: Context) -> None:
    cfg, adata = ctx.config.steer, ctx.adata
    if (cfg.source is None) != (cfg.target is None):
        raise UserError("steer: give both source and target for contrastive steering (or neither)")
    if cfg.source is not None:
        if cfg.label not in adata.obs:
            raise UserError(f"steer.label: obs has no column {cfg.label!r}; columns: "
                            f"{', '.join(map(str, adata.obs.columns))}")
        values = adata.obs[cfg.label].astype(str)
        for key in ("source", "target"):
            n = int((values == str(getattr(cfg, key))).sum())
            if n < 2:
                raise UserError(f"steer.{key}: {cfg.label} = {getattr(cfg, key)!r} has {n} cell(s); contrastive "
                                "steering needs at least 2")
    if not cfg.sweep and cfg.source is None:
        raise UserError("steer: nothing to do (sweep = false and no source/target)")
    import math

    for a in cfg.alphas:
        if not math.isfinite(float(a)):
            raise UserError(f"steer.alphas: alpha {a} is not finite")
    if cfg.feature is not None and ctx.config.run.sae is not None:
        from sae_fast.steer.interventions import check_features

        check_features([cfg.feature], ctx.sae, "steer.feature")


def run_steering(cfg: SteerSection, sae, model, adata, layer: int, folder, enrichment=None, say=print) -> dict:
    """The job behind the stage and `sae-fast steer`: write its tables through `folder` (a RunFolder)."""
    from sae_fast.steer import alpha_sweep, contrast

    facts = {"model": model.name, "layer": int(layer)}
    if cfg.sweep:
        feature = cfg.feature
        if feature is None:
            if enrichment is None or enrichment.empty:
                raise UserError("steer.feature: give the feature to sweep (no interpretation to choose one from)")
            e = enrichment[enrichment["basis"] == "sae"] if "basis" in enrichment else enrichment
            feature = int(e.sort_values("q_value", kind="stable").iloc[0]["feature"])
        cells = adata if cfg.sweep_cells is None else adata[: cfg.sweep_cells]
        say(f"    alpha sweep of feature {feature} over {cells.n_obs} cells, alphas {cfg.alphas}")
        sw = alpha_sweep(sae, model, cells, feature, cfg.alphas, layer, gene_sets=cfg.gene_sets, n_top=cfg.n_top)
        folder.write_table("alpha_sweep", sw.table)
        folder.write_table("alpha_sweep_flipped", sw.flipped)
        for (alpha, versus), table in sw.degs.items():
            if versus == "unsteered":
                folder.write_table(f"deg_f{feature}_a{alpha:g}", table)
        facts.update(sweep_feature=feature, sweep_cells=int(cells.n_obs), n_flipped=int(len(sw.flipped)))
    if cfg.source is not None:
        say(f"    contrastive steering {cfg.label}: {cfg.source} -> {cfg.target}")
        annotation = enrichment if enrichment is not None and not enrichment.empty else None
        out = contrast(sae, model, adata, cfg.source, cfg.target, cfg.label, layer, annotation=annotation,
                       objective=cfg.objective, distance=cfg.distance, epochs=cfg.epochs,
                       lr=cfg.lr, lam=cfg.lam, heldout=cfg.heldout, control=cfg.control, source_cells=cfg.source_cells,
                       checkpointing=cfg.checkpointing, seed=cfg.seed)
        folder.write_table("contrast_alphas", out.alphas)
        folder.write_table("contrast_cells", out.cells)
        folder.write_table("contrast_gap", out.gap)
        folder.write_table("contrast_history", out.history)
        facts.update({k: v for k, v in out.summary.items() if isinstance(v, (int, float, str, bool))})
        facts["changed_features"] = [
            {"feature": int(r.feature), "alpha": float(r.alpha), "top_terms": str(r.top_terms)}
            for r in out.features.head(10).itertuples()]
    folder.write_json("steer_summary", facts)
    return {k: v for k, v in facts.items() if not isinstance(v, list)}


def run(ctx: Context) -> dict:
    return run_steering(ctx.config.steer, ctx.sae, ctx.model, ctx.adata, ctx.config.extract.layer, ctx.folder,
                        _enrichment(ctx), ctx.say)


def _pct(x) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.0f}%"


def summary_lines(folder, model_name: str) -> list[str]:
    """The steering block, from tables/steer_summary.json and the sweep table."""
    s = folder.read_json("steer_summary")
    ours = "the embedded mini model's" if model_name == "mini" else f"{model_name}'s"
    lines = [f"Steering ({ours} numbers; [Y]'s are AIDO.Cell-100M's on PBMC3K)"]
    if "sweep_feature" in s:
        sw = folder.read_table("alpha_sweep")
        lines.append(f"  alpha sweep of feature {s['sweep_feature']} over {s['sweep_cells']} cells (DEGs vs the "
                     "unsteered model; top GO BP terms of each side):")
        for r in sw.itertuples():
            lines.append(f"    alpha {r.alpha:+g}: {r.n_up} up, {r.n_down} down")
            for side in ("up", "down"):
                terms = getattr(r, f"top_{side}_terms")
                if isinstance(terms, str) and terms:
                    lines.append(f"      {side:>4}: {terms}")
        flipped = folder.read_table("alpha_sweep_flipped")
        if len(flipped):
            shown = "; ".join(list(dict.fromkeys(flipped["name"].astype(str)))[:4])  # most significant first
            lines.append(f"    terms flipping sides with the sign of alpha ([Y]'s Table 1 pattern): {shown}")
        else:
            lines.append("    no term flips sides with the sign of alpha here")
    if "closer_fraction" in s:
        lines.append(f"  contrastive steering {s['label']}: {s['source']} -> {s['target']} (layer {s['layer']}, "
                     f"{s['n_features']} annotated features learnable, {s['epochs']} epochs)")
        lines.append(f"    closer to the target: {_pct(s['closer_fraction'])} of {s['n_source']} source cells, "
                     f"{_pct(s['closer_fraction_heldout'])} of the {s['n_heldout']} held out   ([Y]: "
                     f"{_pct(Y_CLOSER)}, all cells)")
        if "control_closer_fraction" in s:
            beat = s["closer_fraction"] > s["control_closer_fraction"]
            lines.append(f"    control, as many random features: {_pct(s['control_closer_fraction'])} "
                         f"(held out {_pct(s['control_closer_fraction_heldout'])}) -> annotated features "
                         f"{'beat' if beat else 'do NOT beat'} the control")
        lines.append(f"    gap fraction: {_pct(s['gap_share_correct_up'])} of {s['gap_n_up']} up genes and "
                     f"{_pct(s['gap_share_correct_down'])} of {s['gap_n_down']} down genes moved toward the "
                     f"target ([Y]: {_pct(Y_GAP_UP)} / {_pct(Y_GAP_DOWN)}); binomial p "
                     f"{num(s['gap_binom_p_up'], '.2g')} / {num(s['gap_binom_p_down'], '.2g')}; median gap "
                     f"{num(s['gap_median_gap'], '.2f')}")
        lines.append(f"    {s['n_changed']} features with |alpha - 1| > 0.3")
        for f in s.get("changed_features", [])[:3]:
            lines.append(f"      f{f['feature']} alpha {f['alpha']:.2f}: {f['top_terms'] or '(no term)'}")
    return lines


def summary(ctx: Context) -> list[str]:
    return summary_lines(ctx.folder, ctx.model.name)


STAGE = Stage("steer", run, section=SteerSection, check=check, summary=summary)
