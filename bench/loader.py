"""Shard loader vs a plain sequential numpy memmap copy: `sae-fast bench loader [--quick] [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "loader", *sys.argv[1:]]))
