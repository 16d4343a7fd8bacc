"""Steering (SPEC §3): edit SAE features inside the forward pass and measure what changes.

    from sae_fast.steer import Scale, Add, Clamp, Ablate, steer, deg, alpha_sweep, contrast
    res = steer(sae, model, adata, Scale({123: 2.0}), layer=L, predictions=True)   # AnnData, one row per cell
    table = deg(res)                                   # paired t-test per gene from the streamed sums
    sweep = alpha_sweep(sae, model, adata, 123, [-5, -2, 0, 2, 5], layer=L)        # [Y]'s Table 1
    out = contrast(sae, model, adata, source="CD4 T", target="CD8 T", label="cell_type", layer=L)

Lower-level pieces: `run_pass` / `SteerPass` (several edits sharing one prefix and one unsteered suffix per
batch), `prefixes` (block-L outputs of a prepared stream), `encode` (an SAE code by the SAE's own kernels),
every intervention's `.hook(sae, model)` for `model.forward(..., hook=)`. Names are imported lazily, so that
`import sae_fast.steer.<module>` (e.g. a run stage's config section) stays light.
"""

from sae_fast.lazy import lazy_getattr

_ATTRS = {
    **dict.fromkeys(["Ablate", "Add", "Clamp", "Intervention", "Scale", "encode", "from_recipe", "scale_delta"],
                    "sae_fast.steer.interventions"),
    **dict.fromkeys(["GeneStats", "SteerPass", "prefixes", "run_pass", "steer"], "sae_fast.steer.runner"),
    **dict.fromkeys(["SweepResult", "alpha_sweep", "deg", "deg_table", "paired_t", "top_degs"],
                    "sae_fast.steer.de"),
    **dict.fromkeys(["ContrastConfig", "ContrastResult", "contrast"], "sae_fast.steer.contrastive"),
    **dict.fromkeys(["DebatchConfig", "DebatchResult", "debatch", "rank_features"], "sae_fast.steer.debatch"),
    **dict.fromkeys(["EmbeddingRecovery", "LayersConfig", "embedding_recovery", "layer_curve"],
                    "sae_fast.steer.recovery"),
    "scib_scores": "sae_fast.steer.scib",
}

__all__ = sorted(_ATTRS)


__getattr__ = lazy_getattr(__name__, _ATTRS)
