"""The main job as one config: model -> data -> extract -> train -> evaluate -> interpret -> ... -> summary.

    from sae_fast.run import load_config, run_pipeline
    result = run_pipeline(load_config("examples/demo.toml"), out="runs/demo")
    print(result.summary)

A run config is a TOML file with one section per stage; every key is a field of the section's dataclass
(sae_fast/run/config.py; `[sae]` is sae_fast.sae.train.TrainConfig, `[interpret]` sae_fast.interpret's
InterpretConfig plus `features`). Every default is Yanovsky & Chernomoretz's [Y] except `[sae] batch_size`
(8,192 tokens, [P]'s; [Y] steps on 8 whole cells, 8 x tokens per cell: see examples/aido_cell_100m_pbmc3k.toml).

    [model]      name, path, batch_size, device  which scFM (sae_fast.load_model), where, in which dtype
    [data]       path, counts, holdout           the cells (an .h5ad or a bundled name); 10% held out
    [extract]    layer, tokens, mode, dtype      where to read the residual stream, shards or fused
    [sae]        arch, k, expansion, lr, epochs  the SAE and its trainer (TrainConfig)
    [interpret]  gene_sets, gene_filter, ...     GO enrichment, baselines, example features
    [run]        out, sae, threads               the run folder; a trained SAE to use instead; CPU threads
    [<stage>]    ...                             optional: a plug-in stage's own section (absent: skipped)

The run folder holds config.resolved.toml, environment.json, log.jsonl (one JSON object a line: stage starts and
ends with their seconds, the trainer's per-step metrics), state.json (the config, and what each finished stage
returned), sae/ (the checkpoint, with the trainer state for an exact resume), shards/train and shards/heldout
(mode "shards"), tables/ (cells: which were held out; sae_metrics.json: the held-out evaluation; ...),
annotated.h5ad and summary.txt. Every file is written under a temporary name and renamed, and a stage is marked
done in state.json only after it returns, so a killed run never leaves output that claims success. Running the
same config on the same folder again skips the stages that are done and resumes the interrupted one (extraction
after its last complete shard, training from its last checkpoint); `force=True` starts fresh.

Modules: config.py (sections, TOML, `--set`, read_cells), folder.py (RunFolder: state, log, atomic table
writes; the environment probe), context.py (Stage, Context), stages.py (one function per stage, STAGES in
order), summary.py (summary.txt), runner.py (run_pipeline: load, check, walk STAGES).

Adding a stage (the plug-in contract)
-------------------------------------
A new stage NAME is one file, sae_fast/run/NAME.py, plus one line in STAGES (sae_fast/run/stages.py): `_plugin(
"NAME"),`, before the summary stage (after it only for a stage that reads summary.txt, such as report; its
summary block is then not in summary.txt). The file defines

    @dataclass
    class NameSection:                           # the optional [NAME] section of the run config
        '''[NAME]: one line on what the stage does.'''
        alpha: float = option(1.0, "help: what it means ([paper]: its value)")   # sae_fast.config.option

    def check(ctx: Context) -> None: ...         # optional: up-front checks, raise UserError naming the key
    def run(ctx: Context) -> dict | None: ...    # the work
    def summary(ctx: Context) -> list[str]: ...  # optional: its block of summary.txt

    STAGE = Stage("NAME", run, section=NameSection, check=check, summary=summary)

importing only light modules at module level (sae_fast.config, sae_fast.errors, sae_fast.run.context, the
module defining its section): it is imported whenever a config is loaded, so heavy imports go inside the
functions. Document every key of [NAME] in docs/NAME.md or docs/run.md (tests/test_pipeline.py checks), and
commit the file and its STAGES line together: STAGES imports it, so one without the other breaks every run.

The section. `[NAME]` becomes `config.NAME` (an instance of NameSection, keys checked by type like every
section, with the same one-line errors); `--set NAME.key=value` works. The section is optional: when the TOML
has no `[NAME]` table, `config.NAME` is None and the stage is skipped (an empty `[NAME]` table runs it with
the defaults). `Stage(when=lambda config: ...)` can skip it on further conditions.

What a stage receives: `ctx`, a sae_fast.run.context.Context with
  ctx.config    the resolved RunConfig: ctx.config.NAME (its section), ctx.config.extract.layer, ...
  ctx.folder    the RunFolder: .path, .tables, .sae (trained SAE dir), .shards; write_table / write_json /
                write_text / read_table / read_json (atomic files under tables/), log(event, **fields)
  ctx.model     the loaded ScFM (sae_fast.load_model), ready for model.forward(..., layer=, hook=)
  ctx.adata     the cells, AnnData with raw counts in X (as read by read_cells; not normalised)
  ctx.sae       the SAE: [run] sae, or the one the train stage wrote to sae/ (loaded on first use)
  ctx.results   stage name -> the dict each earlier stage's run() returned (for stages done by an earlier,
                interrupted invocation: read back from state.json, with their "seconds")
  ctx.say(msg)  a progress line (silent under -q); long loops use sae_fast.utils.progress
`check(ctx)` runs before the run folder is opened (for every active stage, before any stage runs), so it
must not write; ctx.sae is available there only with [run] sae.

What it returns: a JSON-able dict of small facts (counts, paths, seconds of sub-steps), or None. It is stored in
state.json under done.NAME, logged in log.jsonl's stage_done event and put in ctx.results["NAME"]. Once run()
returns the stage is done: a resumed run skips it, so run() must write every file it makes before returning
(through ctx.folder, so a kill never leaves a half-written file under its final name).

Tables: `ctx.folder.write_table("NAME_something", df)` writes tables/NAME_something.parquet (CSV without
pyarrow); prefix table names with the stage's name. Small dicts: `ctx.folder.write_json("NAME", obj)`.
Other files (AnnData, figures) go to `ctx.folder.path / NAME / ...` via sae_fast.utils.atomic_path.

The summary: `summary(ctx)` returns the lines of the stage's block (a heading line, then indented lines), read
from the files the stage wrote (not from ctx.results alone: the summary is recomposed on every invocation,
including a resume that skipped the stage). Blocks appear in STAGES order between the title and `finished in
N s`.

Cells: ctx.train_cells / ctx.heldout_cells are the rows of ctx.adata the SAE trains on and the ones held out of
training ([data] holdout, 10%: the evaluation's cells); stages that measure how well something generalises use
the held-out ones (`ctx.adata[ctx.heldout_cells]`).
"""

from sae_fast.lazy import lazy_getattr

_ATTRS = {
    "load_config": "sae_fast.run.config",
    "RunConfig": "sae_fast.run.config",
    "read_cells": "sae_fast.run.config",
    "to_toml": "sae_fast.run.config",
    "sections": "sae_fast.run.config",
    "RunFolder": "sae_fast.run.folder",
    "Stage": "sae_fast.run.context",
    "Context": "sae_fast.run.context",
    "STAGES": "sae_fast.run.stages",
    "run_pipeline": "sae_fast.run.runner",
    "RunResult": "sae_fast.run.runner",
}

__all__ = sorted(_ATTRS)


__getattr__ = lazy_getattr(__name__, _ATTRS)
