"""Run `sae-fast bench encode` (see sae_fast/benchmarks/encode.py); arguments pass through, e.g. --quick,
--json FILE."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "encode", *sys.argv[1:]]))
