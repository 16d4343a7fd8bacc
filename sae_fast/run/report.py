"""The `report` stage: the run's self-contained HTML page, RUN_DIR/report.html (sae_fast.report), written last.

It has no config section, so every run makes it. It comes after the summary stage so that the page holds
summary.txt and every other stage's timing; `sae-fast report RUN_DIR` remakes it from the folder's files alone.
"""

from __future__ import annotations

from sae_fast.run.context import Context, Stage


def run(ctx: Context) -> dict:
    from sae_fast.report import write_report

    path = write_report(ctx.folder.path)
    ctx.say(f"    report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return {"bytes": path.stat().st_size}


STAGE = Stage("report", run)
