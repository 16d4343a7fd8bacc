"""Shared-prefix steering vs two full hooked forwards per batch: `sae-fast bench steer [--quick] [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "steer", *sys.argv[1:]]))
