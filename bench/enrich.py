"""ORA of 5,120 gene lists against GO BP: sae-fast vs gseapy.enrich.

Same as `sae-fast bench enrich [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "enrich", *sys.argv[1:]]))
