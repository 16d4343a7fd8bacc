"""Residual-stream activations: memory-mapped shards, extraction, the shuffling loader, fused and DDP sources.

    shards = sae_fast.extract(model, adata, layer, out, tokens="sample:256")  # out/manifest.json + shards
    shards = sae_fast.open_shards(out)                 # validated, memory-mapped, random access
    shards.read(0, 1000); shards.iter_batches(4096, shuffle=True, seed=0)
    ShardWriter(dir, d, dtype="float16").add(acts, cell_ids, gene_ids); .close()
"""

from sae_fast.activations.extract import extract
from sae_fast.activations.shards import Shards, ShardWriter, open_shards

__all__ = ["ShardWriter", "Shards", "extract", "open_shards"]
