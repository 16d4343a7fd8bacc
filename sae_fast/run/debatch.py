"""The optional `debatch` stage: [P]'s batch removal by clamping the top batch features, scored with scIB metrics
(sae_fast.steer.debatch). Runs when the config has a [debatch] section; writes tables/debatch.csv (tidy: n, c,
selector, seed, each metric, bio, batch, total), tables/debatch_ranking.csv, tables/debatch_summary.txt and
figures/umap_*.png (unsteered, unintegrated, top-n clamp; coloured by batch and by cell type)."""

from __future__ import annotations

from sae_fast.errors import UserError
from sae_fast.run.context import Context, Stage
from sae_fast.steer.debatch import DebatchConfig


def check(ctx: Context) -> None:
    cfg = ctx.config.debatch
    for key in (cfg.batch_key, cfg.label_key):
        if key not in ctx.adata.obs:
            raise UserError(f"debatch: obs has no column {key!r}; columns: "
                            f"{', '.join(map(str, ctx.adata.obs.columns))}")
    if ctx.adata.obs[cfg.batch_key].nunique() < 2:
        raise UserError(f"debatch.batch_key: obs column {cfg.batch_key!r} has a single value; batch removal needs "
                        "two batches or more")
    from sae_fast.steer.scib import require_scib

    require_scib()


def run(ctx: Context) -> dict:
    from sae_fast.steer.debatch import debatch, write_debatch

    res = debatch(ctx.sae, ctx.model, ctx.adata, ctx.config.extract.layer, config=ctx.config.debatch)
    write_debatch(res, ctx.folder.path)
    return {"n_cells": len(res.obs), "n_embeddings": int(res.table.embedding.nunique())}


def summary(ctx: Context) -> list[str]:
    text = (ctx.folder.tables / "debatch_summary.txt").read_text().rstrip().splitlines()
    return ["Batch removal (debatch)", *("  " + line if line else "" for line in text)]


STAGE = Stage("debatch", run, section=DebatchConfig, check=check, summary=summary)
