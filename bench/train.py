"""Full TopK SAE training step vs dense PyTorch and sparsify: `sae-fast bench train [--quick] [--json F]`."""

import sys

from sae_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
