"""`sae-fast run CONFIG.toml`: the whole job (extract, train, evaluate, interpret, summary), one config."""

from __future__ import annotations

HELP = "run the whole job from one TOML config: extract, train an SAE, evaluate, interpret, summarise"
DESCRIPTION = """\
Run the whole job described by one TOML config, in a run folder:

  load the model and the cells, check them  ->  extract the residual stream (or train fused)
  ->  train the SAE  ->  evaluate it on held-out cells (FVU, L0, dead %)
  ->  interpret its features with GO enrichment (against raw neurons and ICA)
  ->  print a summary that ends with `finished in N s`.

Sections: [model] name, path, batch_size, device, dtype; [data] path (an .h5ad or a bundled name), counts,
max_cells, holdout (10% of cells held out for the evaluation);
[extract] layer, tokens, mode (shards | fused), dtype; [sae] every `sae-fast train` option (arch, k,
expansion, lr, epochs, ...); [interpret] every `sae-fast interpret` option (gene_sets, gene_filter, top_rule,
alpha, baselines, ...) plus features (examples to show); [run] out, sae, threads. Every key has a default: Yanovsky &
Chernomoretz's (AIDO.Cell-100M, layer 12, TopK k=32, 8x, lr 1e-3, 10 epochs, 8 cells per forward pass), except
sae.batch_size, 8,192 tokens (Pedrocchi et al.'s step; for [Y]'s step of 8 whole cells set it to 8 x tokens per
cell, as examples/aido_cell_100m_pbmc3k.toml does). See examples/*.toml and docs/run.md.

The run folder holds config.resolved.toml, environment.json, log.jsonl (stage timings and the trainer's
per-step metrics), state.json, sae/ (checkpoint), shards/ (mode shards), tables/, annotated.h5ad, summary.txt.
Running the same command again on the same folder resumes: finished stages are skipped, an interrupted
extraction continues after its last complete shard and training from its last checkpoint. --force starts
fresh.

Examples:
  sae-fast run examples/demo.toml --out runs/demo
  sae-fast run examples/aido_cell_100m_pbmc3k.toml --set model.path=/ckpt/AIDO.Cell-100M
  sae-fast run examples/demo.toml --set sae.epochs=1 --set data.max_cells=40 --out /tmp/quick
"""


def add_arguments(parser):
    parser.add_argument("config", help="the run config, a TOML file (see examples/ and docs/run.md)")
    add_run_options(parser)


def add_run_options(parser, default_out: str | None = None):
    """Options shared by `run` and `demo`."""
    where = default_out or "[run] out of the config, else runs/<config name>"
    parser.add_argument("--out", metavar="DIR", default=default_out,
                        help=f"run folder (default: {where}); an existing run folder of the same config is "
                        "resumed")
    parser.add_argument("--force", action="store_true",
                        help="delete the run folder's previous contents and start fresh instead of resuming")
    parser.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one config key (TOML value syntax), e.g. --set sae.epochs=2; "
                        "repeatable")


def run(args):
    from pathlib import Path

    from sae_fast.run import load_config, run_pipeline

    config = load_config(args.config, args.overrides)
    out = args.out or config.run.out or str(Path("runs") / Path(args.config).stem)
    result = run_pipeline(config, out, force=args.force)
    print(result.summary)
    return 0
