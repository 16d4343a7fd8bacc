"""`sae-fast debatch CONFIG.toml --out DIR`: the run of CONFIG with its [debatch] stage (batch removal, [P])."""

from __future__ import annotations

HELP = "remove batch effects by clamping the top batch features ([P]) and score them with scIB metrics"
DESCRIPTION = """\
Batch removal by clamp steering, as Pedrocchi et al. [P]: rank the SAE's features by their AMI with the batch
label, clamp the top n to c wherever they are active, re-embed the cells, and score every embedding with the
scIB metrics of scib-metrics (Leiden NMI/ARI, the default batch-correction metrics, total = 0.6 bio + 0.4
batch) against the unsteered embedding, the unintegrated one (5,000 HVGs cell_ranger, PCA 30) and random
feature sets of the same n (seeds 42, 43, 44).

This is `sae-fast run CONFIG.toml` with the [debatch] section switched on (its defaults when the config has
none): the SAE is trained (or taken from [run] sae), evaluated and interpreted as usual, then the debatch
stage writes into the run folder
  tables/debatch.csv           tidy: n, c, selector, seed, embedding, each metric, bio, batch, total
  tables/debatch_ranking.csv   every feature's batch AMI, best first
  figures/umap_*.png           UMAPs (scanpy) of the unsteered, unintegrated and clamped embeddings, coloured by
                               batch and by cell type
and prints the summary. [debatch] keys (every one can be set with --set debatch.KEY=VALUE): batch_key,
label_key, n_features (0..100 step 10), clamp (-2, 0), seeds (42 43 44), error_term, encode, n_hvg, n_pcs,
max_cells, seed, umap_n, batch_size. Needs the extra: pip install 'sae-fast[scib]'. See docs/debatch.md.

Examples:
  sae-fast debatch examples/demo.toml --out runs/debatch --set debatch.n_features=[0,10,20,50]
  sae-fast debatch my.toml --set debatch.batch_key=stim --set run.sae=runs/kang/sae
"""


def add_arguments(parser):
    from sae_fast.commands.run import add_run_options

    parser.add_argument("config", help="the run config, a TOML file (see examples/ and docs/debatch.md)")
    add_run_options(parser)


def run(args):
    from pathlib import Path

    from sae_fast.run import load_config, run_pipeline
    from sae_fast.run.config import RunConfig
    from sae_fast.steer.debatch import DebatchConfig

    config = load_config(args.config, args.overrides)
    if config.debatch is None:
        config = RunConfig({**dict(config.items()), "debatch": DebatchConfig()})
    out = args.out or config.run.out or str(Path("runs") / Path(args.config).stem)
    result = run_pipeline(config, out, force=args.force)
    print(result.summary)
    return 0
