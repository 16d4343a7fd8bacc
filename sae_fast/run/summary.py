"""summary.txt: a title, one block per stage (each stage's `summary(ctx)`, read from its files so that a resumed
run prints the same), the run folder and `finished in N s`."""

from __future__ import annotations

import time

from sae_fast import utils
from sae_fast.run.context import Context

BAR = "=" * 78


def num(x, spec: str) -> str:
    """x formatted with `spec`, or n/a for an undefined number (null in the run's JSON files, NaN in memory)."""
    return "n/a" if x is None or x != x else format(x, spec)


def sae_block(ctx: Context) -> list[str]:
    """The evaluate stage's block: dictionary size, FVU, L0, dead %."""
    m = ctx.folder.read_json("sae_metrics")
    if m["holdout"] == 0:
        cells = f"on the {m['n_cells']} training cells (data.holdout = 0)"
    elif ctx.config.run.sae is not None:
        cells = f"on {m['n_cells']} cells ({100 * m['holdout']:.0f}%; run.sae may have been trained on them)"
    else:
        cells = f"on {m['n_cells']} held-out cells ({100 * m['holdout']:.0f}%, not trained on)"
    return [f"SAE, measured {cells}",
            f"  features            {m['n_features']}",
            f"  FVU                 {num(m['fvu'], '.4f')}   (fraction of variance unexplained)",
            f"  L0                  {m['l0']:.2f}   (active features per token)",
            f"  dead                {100 * m['dead_fraction']:.1f} %   (never active on these cells)",
            *([f"  ERS                 {num(m['ers_fraction'], '.4f')}   (embedding recovery, [P]'s code; "
               f"paper's ratio {num(m['ers_ratio'], '.2f')})"] if "ers_fraction" in m else []),
            f"  tokens evaluated    {int(m['n_tokens']):,}"]


def interpret_block(ctx: Context) -> list[str]:
    """The interpret stage's block: format_summary's text as the stage wrote it."""
    return (ctx.folder.tables / "interpret_summary.txt").read_text().rstrip().splitlines()


def compose(ctx: Context, seconds: float) -> str:
    """The closing table: title, every active stage's block in order, `finished in N s`."""
    from sae_fast.run.stages import STAGES

    config = ctx.config
    lines = [BAR, ctx.title or f"sae-fast run: {ctx.model.name}, layer {config.extract.layer}", BAR]
    if config.model.name == "mini":
        lines.append("These numbers come from the embedded demo model `mini` (a small AIDO.Cell-\n"
                     "architecture model pretrained on the bundled cells), not from AIDO.Cell-100M.")
    for stage in STAGES:
        if stage.name == "summary":  # stages after it (report) cannot be in it
            break
        if stage.summary is not None and stage.active(config):
            lines += ["", *stage.summary(ctx)]
    lines += ["", f"run folder: {ctx.folder.path}", BAR, f"finished in {seconds:.0f} s"]
    return "\n".join(lines)


def write_summary(ctx: Context) -> None:
    """The summary stage: compose the table and write summary.txt."""
    text = compose(ctx, time.perf_counter() - ctx.started)
    with utils.atomic_path(ctx.folder.path / "summary.txt") as tmp:
        tmp.write_text(text + "\n")
