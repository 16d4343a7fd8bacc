"""run_pipeline: load and check everything, open the run folder, walk STAGES (skipping those done earlier)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sae_fast import utils
from sae_fast.errors import UserError
from sae_fast.models.genes import parse_context
from sae_fast.run.config import RunConfig, cells_and_model
from sae_fast.run.context import Context
from sae_fast.run.folder import RunFolder


class RunResult(NamedTuple):
    out: Path
    summary: str  # the printed summary table, ending with "finished in N s"
    seconds: float  # this invocation's wall time
    resumed: bool
    skipped: list[str]  # stages already done by an earlier invocation


def check_sae(sae, model, where: str) -> None:
    d = sae.W_dec.shape[1]
    if d != model.d_model:
        raise UserError(f"{where}: the SAE reads d = {d} but {model.name} has d_model = {model.d_model}; "
                        "train an SAE on this model (remove run.sae) or load the matching model")


def split_cells(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training cells, held-out cells), sorted row indices: a seeded random `holdout` share of the n cells
    (rounded, at least one when holdout > 0) is held out; with holdout 0 both are all cells."""
    if holdout == 0:
        return np.arange(n), np.arange(n)
    if n < 2:
        raise UserError(f"data.holdout = {holdout}: {n} cell(s) cannot be split into training and held-out "
                        "cells; use more cells or data.holdout = 0")
    n_hold = min(n - 1, max(1, round(holdout * n)))
    hold = np.sort(np.random.default_rng(seed).choice(n, n_hold, replace=False))
    return np.setdiff1d(np.arange(n), hold), hold


def prepare(config: RunConfig, out: str | Path, title: str | None = None) -> Context:
    """Load the model, the cells and [run] sae, and run every active stage's up-front check: everything that
    can be wrong with the input (files, counts, vocabulary, layer, SAE size, feature indices) fails here,
    before the run folder is touched."""
    from sae_fast.activations.extract import parse_tokens
    from sae_fast.run.stages import STAGES

    try:
        parse_tokens(config.extract.tokens)
    except UserError as e:
        raise UserError(f"extract.{e}") from None
    try:
        parse_context(config.model.context)
    except UserError as e:
        raise UserError(f"model.{e}") from None
    data = config.data
    adata, model, alignment = cells_and_model(config)
    try:
        model.check_layer(config.extract.layer)
    except UserError as e:
        raise UserError(f"extract.layer: {e}") from None
    if utils.VERBOSITY >= 2:
        print(f"{data.path}: {alignment.summary()}")
    train_cells, heldout_cells = split_cells(adata.n_obs, data.holdout, data.holdout_seed)
    ctx = Context(config=config, folder=RunFolder(out), model=model, adata=adata, title=title,
                  train_cells=train_cells, heldout_cells=heldout_cells)
    if config.run.sae is not None:
        from sae_fast import load_sae

        ctx.sae = load_sae(config.run.sae)
        check_sae(ctx.sae, model, f"run.sae = {config.run.sae}")
    for stage in STAGES:
        if stage.check is not None and stage.active(config):
            stage.check(ctx)
    return ctx


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run the block with n CPU threads in torch, the BLAS libraries and numba (None: leave them alone); the
    previous settings come back afterwards. Reductions split over threads round differently, so the float
    results of a run depend on n."""
    if n is None:
        yield
        return
    import numba
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def run_pipeline(config: RunConfig, out: str | Path | None = None, *, force: bool = False,
                 title: str | None = None) -> RunResult:
    """Run (or resume) the whole job of `config` in the folder `out` and return the summary."""

    with cpu_threads(config.run.threads):
        return _run(config, Path(out or config.run.out or "runs/run"), force, title)


def _run(config: RunConfig, out: Path, force: bool, title: str | None) -> RunResult:
    from sae_fast.run.stages import STAGES

    t0 = time.perf_counter()
    ctx = prepare(config, out, title)
    ctx.started = t0
    folder = ctx.folder
    resumed = folder.open(config, force)
    folder.log("resume" if resumed else "start", config=config.to_dict() if not resumed else None,
               cells=ctx.adata.n_obs, genes=ctx.adata.n_vars, model=ctx.model.name)
    ctx.say(f"{'resuming' if resumed else 'starting'} run in {out}: {ctx.model.name} layer "
            f"{config.extract.layer}, {ctx.adata.n_obs} cells x {ctx.adata.n_vars} genes")

    skipped = []
    stages = [s for s in STAGES if s.active(config)]
    for i, stage in enumerate(stages, 1):
        earlier = folder.done(stage.name)
        if stage.name != "summary" and earlier is not None:
            skipped.append(stage.name)
            ctx.results[stage.name] = earlier
            ctx.say(f"[{i}/{len(stages)}] {stage.name}: done earlier, skipped")
            continue
        ctx.say(f"[{i}/{len(stages)}] {stage.name}")
        folder.log("stage_start", stage=stage.name)
        ts = time.perf_counter()
        info = stage.run(ctx) or {}
        seconds = time.perf_counter() - ts
        ctx.results[stage.name] = {"seconds": round(seconds, 3), **info}
        folder.log("stage_done", stage=stage.name, seconds=round(seconds, 3), **info)
        folder.mark_done(stage.name, seconds, **info)
        ctx.say(f"    {stage.name} took {seconds:.1f} s")
    if config.extract.mode == "shards" and not config.extract.keep_shards and folder.shards.exists():
        shutil.rmtree(folder.shards)
    summary = (folder.path / "summary.txt").read_text().rstrip("\n")
    return RunResult(out, summary, time.perf_counter() - t0, resumed, skipped)
