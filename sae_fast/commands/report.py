"""`sae-fast report RUN_DIR`: one self-contained HTML page with the run's figures and a feature browser."""

from __future__ import annotations

HELP = "write one self-contained HTML page (figures, metrics, feature browser) from a run folder"
DESCRIPTION = """\
Read a run folder (what `sae-fast run`, `demo` or `interpret` wrote) and write one HTML file that works
offline: every figure is an inline PNG, styles and the few lines of JavaScript are inline, nothing is fetched.

It holds the SAE metrics, the training curves (loss, FVU, L0, dead fraction against tokens, from log.jsonl),
the interpretation (share of features with a GO term per basis; Fig. 1a, PR per feature; Fig. 1b, max IC of
SAE vs raw neurons vs ICA with the Mann-Whitney test), a searchable feature browser (click a feature for its
top genes, GO terms, activation per cell type and gene-family shares), the overlap graph's components, the
cell-level association heatmap, the steering and batch-removal results when the run has them, the config,
environment and stage timings. Sections whose files are absent are left out, so old folders work too.

`sae-fast run` writes RUN_DIR/report.html itself at the end; this command remakes it.

Examples:
  sae-fast report runs/demo                      # -> runs/demo/report.html
  sae-fast report runs/demo --out demo.html
"""


def add_arguments(parser):
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (sae-fast run / demo / interpret --out)")
    parser.add_argument("--out", metavar="FILE.html", help="where to write the page (default: RUN_DIR/report.html)")


def run(args):
    import time

    from sae_fast.report import write_report

    t0 = time.perf_counter()
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0
