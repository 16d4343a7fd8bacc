"""Run `sae-fast bench decode` (see sae_fast/benchmarks/decode.py); arguments pass through, e.g. --quick,
--json FILE."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
