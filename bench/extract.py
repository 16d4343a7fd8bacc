"""Extraction vs a plain forward to the same layer: `sae-fast bench extract [--quick] [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "extract", *sys.argv[1:]]))
