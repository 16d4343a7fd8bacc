"""The stages of a run, in order: one function per stage, and STAGES, the list the runner walks.

A new stage is one file sae_fast/run/<name>.py that defines `STAGE = Stage(...)` (see sae_fast/run/__init__.py
for the contract) and one line in STAGES below: `_plugin("<name>"),`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np

from sae_fast import utils
from sae_fast.errors import UserError
from sae_fast.run import summary
from sae_fast.run.context import Context, Stage


def n_features(train_cfg, d_model: int) -> int:
    """The SAE's dictionary size the trainer will use: n_features, else expansion x d."""
    return int(train_cfg.n_features or train_cfg.expansion * d_model)


def cell_sets(ctx: Context) -> dict:
    """{"train": rows, "heldout": rows} of ctx.adata: the cells the SAE trains on and those it is evaluated on
    (the same cells when data.holdout = 0)."""
    return {"train": ctx.train_cells, "heldout": ctx.heldout_cells}


def token_source(ctx: Context, which: str, shuffle: bool):
    """The tokens of the `which` ("train" or "heldout") cells: the shards (mode shards, shards/<which>) or the
    forward pass (mode fused), in batches of `sae.batch_size` tokens ([Y]'s whole-cell batches of
    `model.batch_size` cells when fused)."""
    config = ctx.config
    cfg = config.sae
    if config.extract.mode == "shards":
        from sae_fast import open_shards

        return open_shards(ctx.folder.shards / which).loader(cfg.batch_size, shuffle=shuffle, seed=cfg.seed)
    from sae_fast.activations.fused import fused_source

    return fused_source(ctx.model, ctx.adata[cell_sets(ctx)[which]], config.extract.layer, cfg,
                        tokens=config.extract.tokens, cells_per_batch=config.model.batch_size)


# ------------------------------------------------------------------------------------------------- extract


def extract(ctx: Context) -> dict:
    """Mode shards: the residual stream at [extract] layer of the training cells into shards/train and of the
    held-out cells into shards/heldout (each resumes after its last full shard); tables/cells lists which cell
    went where."""
    from sae_fast import extract as extract_shards

    cfg = ctx.config.extract
    info = {}
    for which, rows in cell_sets(ctx).items():
        shards = extract_shards(ctx.model, ctx.adata[rows], cfg.layer, ctx.folder.shards / which,
                                tokens=cfg.tokens, dtype=cfg.dtype, resume=True,
                                batch_size=ctx.config.model.batch_size)
        info[f"{which}_tokens"] = int(shards.n_tokens)
    return info


def write_cell_sets(ctx: Context) -> None:
    """tables/cells: each cell's obs name and whether the SAE trained on it or it was held out."""
    import pandas as pd

    held = np.zeros(ctx.adata.n_obs, bool)
    held[ctx.heldout_cells] = True
    if ctx.config.data.holdout == 0:
        held[:] = False
    ctx.folder.write_table("cells", pd.DataFrame({"cell": ctx.adata.obs_names.astype(str),
                                                  "set": np.where(held, "heldout", "train")}))


# --------------------------------------------------------------------------------------------------- train


def check_train(ctx: Context) -> None:
    """[sae]'s architecture, dictionary size and k against the model's width, before any extraction."""
    try:
        ctx.config.sae.sae_config().resolved(d_in=ctx.model.d_model)
    except UserError as e:
        raise UserError(f"[sae] {e}") from None


def train(ctx: Context) -> dict:
    """Train (or resume training) into sae/, then copy the trainer's per-step metrics into log.jsonl."""
    from sae_fast import train_sae
    from sae_fast.sae.checkpoint import save_sae
    from sae_fast.sae.train import LOG

    sae_dir = ctx.folder.sae
    cfg = dataclasses.replace(ctx.config.sae, out_dir=sae_dir)
    sae = train_sae(token_source(ctx, "train", shuffle=True), config=cfg)
    layer = ctx.config.extract.layer
    save_sae(sae, sae_dir, model_name=ctx.model.name, hook_name=f"blocks.{layer}.hook_resid_post",
             hook_layer=layer)
    if (sae_dir / LOG).is_file():
        for line in (sae_dir / LOG).read_text().splitlines():
            ctx.folder.log("train_step", **json.loads(line))
    ctx.sae = sae
    return {"n_features": int(sae.W_dec.shape[0]), "d": int(sae.W_dec.shape[1])}


# ------------------------------------------------------------------------------------------------ evaluate


class _Progress:
    """A re-iterable source of [n, d] batches that advances a progress bar by the rows it yields."""

    def __init__(self, source, bar):
        self.source, self.bar = source, bar

    def __iter__(self):
        for x in self.source:
            yield x
            self.bar.update(x.shape[0])


def evaluate(ctx: Context) -> dict:
    """FVU, L0, dead fraction and the Embedding Recovery Score of the SAE on the held-out cells ->
    tables/sae_metrics.json."""
    from sae_fast.sae.train import evaluate as evaluate_sae

    write_cell_sets(ctx)
    source = token_source(ctx, "heldout", shuffle=False)
    total = getattr(source, "n_tokens", None)
    with utils.progress(total=total, desc="evaluate SAE", unit="tok", unit_scale=True) as bar:
        m = evaluate_sae(ctx.sae, _Progress(source, bar))
    metrics = {k: float(v) if not isinstance(v, int) else v for k, v in m._asdict().items()}
    metrics["n_features"] = int(ctx.sae.W_dec.shape[0])
    metrics["n_cells"] = len(ctx.heldout_cells)
    metrics["holdout"] = ctx.config.data.holdout
    from sae_fast.steer.recovery import embedding_recovery  # [P]'s ERS on the same cells

    ers = embedding_recovery(ctx.sae, ctx.model, ctx.adata[ctx.heldout_cells], ctx.config.extract.layer,
                             batch_size=ctx.config.model.batch_size)
    metrics["ers_ratio"], metrics["ers_fraction"] = ers.ratio, ers.fraction
    ctx.folder.write_json("sae_metrics", metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- interpret


def check_interpret(ctx: Context) -> None:
    """Example features within the dictionary, label columns present in obs, the gene-set libraries found,
    clip_min <= clip_max."""
    from pathlib import Path

    from sae_fast.interpret.genesets import BUNDLED

    config = ctx.config
    cfg = config.interpret
    for key in ("gene_sets", "markers"):
        name = getattr(cfg, key)
        if name and name not in BUNDLED and not name.startswith("enrichr:") and not Path(name).is_file():
            raise UserError(f"interpret.{key} = {name!r}: no such gene-set library or GMT file; choose one of "
                            f"{', '.join(BUNDLED)}, a GMT file path, or enrichr:LIBRARY")
    if cfg.clip_min > cfg.clip_max:
        raise UserError(f"interpret.clip_min = {cfg.clip_min} is above interpret.clip_max = {cfg.clip_max}")
    n = int(ctx.sae.W_dec.shape[0]) if config.run.sae is not None else n_features(config.sae, ctx.model.d_model)
    for f in config.interpret.features:
        if not 0 <= f < n:
            raise UserError(f"interpret.features: feature {f} is out of range: the SAE has features 0..{n - 1}")
    for key in config.interpret.label_keys:
        if key not in ctx.adata.obs:
            columns = ", ".join(ctx.adata.obs.columns) or "none"
            raise UserError(f"{config.data.path}: obs has no column {key!r} (interpret.label_keys); columns: "
                            f"{columns}")


def interpret(ctx: Context) -> None:
    """GO enrichment of the features against the baselines -> tables/, summary.json, annotated.h5ad."""
    from sae_fast.interpret import format_summary, interpret_sae, write_results

    config = ctx.config
    result = interpret_sae(ctx.sae, ctx.model, ctx.adata, config.extract.layer, config=config.interpret)
    write_results(result, ctx.folder.path)
    ctx.folder.write_text("interpret_summary.txt",
                          format_summary(result, features=config.interpret.features or None))


# ------------------------------------------------------------------------------------------------- summary


def _plugin(name: str) -> Stage:
    """The STAGE of sae_fast/run/<name>.py."""
    return importlib.import_module(f"sae_fast.run.{name}").STAGE


STAGES: list[Stage] = [
    Stage("extract", extract, when=lambda config: config.extract.mode == "shards"),
    Stage("train", train, check=check_train, when=lambda config: config.run.sae is None),
    Stage("evaluate", evaluate, summary=summary.sae_block),
    Stage("interpret", interpret, check=check_interpret, summary=summary.interpret_block),
    # optional stages with their own config section go here, one line each: _plugin("steer"),
    _plugin("steer"),
    _plugin("debatch"),
    Stage("summary", summary.write_summary),
    _plugin("report"),  # last: the page holds summary.txt and every other stage's timing
]
