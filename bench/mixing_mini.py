"""Does the loader's shuffle block size change what the SAE learns? (bench/results/mixing_mini.json)

The loader (sae_fast.activations.loader) shuffles blocks of `block_tokens` consecutive tokens inside each mixing
window; larger blocks stream faster (bench/results/loader.json) but mix more coarsely within a cell. This trains
the demo's SAE on the demo's activations with blocks of 1 token, 16 tokens (the default at d = 128 in float16:
4 KB) and 64 tokens (16 KB at d = 128), over 8 seeds, and compares FVU and the dead-feature fraction over
every token. The default's rule (16 tokens, fewer where 16 rows would pass 16 KB: 13 at AIDO.Cell-100M's
d = 640) never makes a block longer than the 16 tokens tested here.

Activations: the embedded model `mini` v2 at block 4 on the full PBMC3K (2,700 cells) x the demo's context
(hvg:512: the 512 most variable of mini's genes), every gene token, float16 shards, as `sae-fast demo` writes
them (written once to --work, resumable). SAE: TopK, k = 32, 1,024 features, batch 4,096, lr 1e-3, --epochs
passes. These are `mini`'s numbers, not those of a released model.

    python bench/mixing_mini.py [--blocks 1 16 64] [--seeds 0 1 ... 7] [--epochs 2] [--threads 2]
                                [--work /tmp/mixing_mini] [--out bench/results/mixing_mini.json]
"""

import argparse
import time
from pathlib import Path

import numpy as np


def main():
    import torch

    from sae_fast import datasets, extract, load_model
    from sae_fast.activations.loader import ShardLoader
    from sae_fast.benchmarks.common import device_name
    from sae_fast.models.genes import context_genes
    from sae_fast.sae.train import evaluate, train_sae
    from sae_fast.utils import machine_description, write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/mixing_mini")
    p.add_argument("--out", default="bench/results/mixing_mini.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cells = datasets.pbmc3k()
    model = load_model("mini")
    model = model.restrict(context_genes(model, cells, "hvg:512"))
    shards = extract(model, cells, layer=4, out=args.work, tokens="all", dtype="float16", resume=True)
    t_extract = time.perf_counter() - t0
    runs = []
    for seed in args.seeds:
        for block in args.blocks:
            t = time.perf_counter()
            sae = train_sae(ShardLoader(shards, 4096, seed=seed, block_tokens=block), arch="topk", d_in=shards.d,
                            expansion=8, k=32, lr=1e-3, epochs=args.epochs, batch_size=4096, seed=seed,
                            log_every=10**9, checkpoint_every=10**9)
            ev = evaluate(sae, ShardLoader(shards, 8192, shuffle=False))
            runs.append({"seed": seed, "block_tokens": block, "fvu": ev.fvu, "dead_fraction": ev.dead_fraction,
                         "l0": ev.l0, "seconds": time.perf_counter() - t})
            print(f"seed {seed} block {block:3d}: FVU {ev.fvu:.5f} dead {ev.dead_fraction:.1%} "
                  f"({runs[-1]['seconds']:.0f} s)", flush=True)
    summary = []
    for block in args.blocks:
        fvu = np.array([r["fvu"] for r in runs if r["block_tokens"] == block])
        dead = np.array([r["dead_fraction"] for r in runs if r["block_tokens"] == block])
        summary.append({"block_tokens": block, "block_bytes": block * shards.d * 2, "fvu_mean": fvu.mean(),
                        "fvu_sd": fvu.std(ddof=1) if len(fvu) > 1 else 0.0, "dead_mean": dead.mean()})
        print(f"block {block:3d} tokens ({block * shards.d * 2 / 1024:g} KB): FVU {fvu.mean():.5f} "
              f"+- {summary[-1]['fvu_sd']:.5f}, dead {dead.mean():.1%}")
    result = {"bench": "mixing_mini", "device": device_name("cpu"), "machine": machine_description(),
              "activations": {"model": "mini", "layer": 4, "data": "pbmc3k", "context": "hvg:512",
                              "tokens": shards.n_tokens, "d": shards.d, "dtype": "float16"},
              "sae": {"arch": "topk", "k": 32, "n_features": 8 * shards.d, "batch": 4096, "lr": 1e-3,
                      "epochs": args.epochs},
              "summary": summary, "runs": runs, "extract_s": t_extract,
              "total_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
