"""Steering (SPEC §3): edit SAE features inside the forward pass and measure what changes.

    from sae_fast.steer import Scale, Add, Clamp, Ablate, steer, deg, alpha_sweep, contrast
    res = steer(sae, model, adata, Scale({123: 2.0}), layer=L, predictions=True)   # AnnData, one row per cell
    table = deg(res)                                   # paired t-test per gene from the streamed sums
    sweep = alpha_sweep(sae, model, adata, 123, [-5, -2, 0, 2, 5], layer=L)        # [Y]'s Table 1
    out = contrast(sae, model, adata, source="CD4 T", target="CD8 T", label="cell_type", layer=L)

Lower-level pieces: `run_pass` / `SteerPass` (several edits sharing one prefix and one unsteered suffix per
batch), `prefixes` (block-L outputs of a prepared stream), `encode` (an SAE code by the SAE's own kernels),
every intervention's `.hook(sae, model)` for `model.forward(..., hook=)`.
"""

from sae_fast.steer.contrast import ContrastConfig, ContrastResult, contrast
from sae_fast.steer.deg import SweepResult, alpha_sweep, deg, deg_table, paired_t, top_degs
from sae_fast.steer.interventions import Ablate, Add, Clamp, Intervention, Scale, encode, from_recipe, scale_delta
from sae_fast.steer.runner import GeneStats, SteerPass, prefixes, run_pass, steer

__all__ = ["Ablate", "Add", "Clamp", "ContrastConfig", "ContrastResult", "GeneStats", "Intervention", "Scale",
           "SteerPass", "SweepResult", "alpha_sweep", "contrast", "deg", "deg_table", "encode", "from_recipe",
           "paired_t", "prefixes", "run_pass", "scale_delta", "steer", "top_degs"]
