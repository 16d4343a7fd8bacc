"""`sae-fast demo`: exactly `sae-fast run examples/demo.toml` (the embedded mini model, the bundled cells)."""

from __future__ import annotations

from pathlib import Path

from sae_fast.commands.run import add_run_options

HELP = "the whole story in minutes on a CPU: `run examples/demo.toml` on the embedded mini model"
DESCRIPTION = """\
Run examples/demo.toml: the embedded demo model `mini` (a small AIDO.Cell-architecture model pretrained on
the bundled PBMC cells, NOT AIDO.Cell-100M) reads the bundled cells, its residual stream is extracted, a TopK
SAE is trained on it and evaluated, and its features are interpreted with GO enrichment against the raw
neurons. It ends with a summary table (FVU, L0, dead %, the share of features with significant GO terms for
the SAE and for raw neurons, three example features with their genes and terms) and the line
`finished in N s`.

Takes a few minutes on a 2-core laptop CPU, no GPU needed. Running it again on the same --out resumes
(finished stages are skipped); --force starts fresh. The same as
`sae-fast run examples/demo.toml --out runs/demo`.
"""


def demo_config_path() -> Path:
    """The demo config shipped with the package (sae_fast/configs/demo.toml; examples/ links there)."""
    return Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def add_arguments(parser):
    add_run_options(parser, default_out="runs/demo")


def run(args):
    from sae_fast.run import load_config, run_pipeline

    config = load_config(demo_config_path(), args.overrides)
    result = run_pipeline(config, args.out, force=args.force,
                          title="sae-fast demo: TopK SAE on the embedded mini model (not AIDO.Cell-100M)")
    print(result.summary)
    return 0
