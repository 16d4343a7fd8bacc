"""scIB scoring of 10,000 cells x 2 embeddings: our wrapper vs scib-metrics called directly with the same kNN, and
exact vs pynndescent kNN: `sae-fast bench scib [--quick] [--json F]` (see sae_fast/benchmarks/scib.py)."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "scib", *sys.argv[1:]]))
