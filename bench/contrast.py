"""One contrastive-steering epoch on the cached prefix vs full forwards:
`sae-fast bench contrast [--quick] [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "contrast", *sys.argv[1:]]))
