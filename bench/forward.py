"""AIDO.Cell forward tokens/s and peak memory vs context: `sae-fast bench forward [--quick] [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "forward", *sys.argv[1:]]))
