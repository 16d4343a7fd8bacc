"""`sae-fast report RUN_DIR`: one self-contained HTML page from a run folder's files.

    from sae_fast.report import write_report
    path = write_report("runs/demo")             # runs/demo/report.html

The page reads only the folder's files (config, environment, stage timings, log.jsonl, tables/, annotated.h5ad,
figures/), so it works on any folder `sae-fast run`, `demo` or `interpret` wrote, old ones included; sections
whose files are absent are left out. figures.py draws (matplotlib -> inline PNG), page.py composes the HTML.
"""

from sae_fast.report.page import render as render_report
from sae_fast.report.page import write as write_report

__all__ = ["render_report", "write_report"]
