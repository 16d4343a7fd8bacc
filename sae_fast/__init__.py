"""sae-fast: sparse autoencoders for single-cell foundation models.

The public API is small and imported lazily, so `import sae_fast` (and the CLI's start-up) stays cheap:

    sae_fast.TopKSAE, BatchTopKSAE, ReLUSAE, GatedSAE, MatryoshkaSAE   the SAE family
    sae_fast.train_sae(source, config=None, **overrides)             train on tensors, shards or a model
    sae_fast.evaluate(sae, source)                                   FVU, L0, dead % on held-out data
    sae_fast.load_sae(dir)                                           safetensors + cfg.json, never pickle
    sae_fast.load_model(name, path=None)                             scFMs: aido_cell_*, scgpt, geneformer,
                                                                     scfoundation, mini (docs/models.md)
    sae_fast.extract(model, adata, layer, out, ...)                  residual stream -> memory-mapped shards
    sae_fast.open_shards(dir)                                        random access to shards
    sae_fast.ops, sae_fast.datasets, sae_fast.interpret, sae_fast.activations
"""

from sae_fast.lazy import lazy_getattr

__version__ = "0.1.0"

_ATTRS = {
    "TopKSAE": "sae_fast.sae.modules",
    "BatchTopKSAE": "sae_fast.sae.modules",
    "ReLUSAE": "sae_fast.sae.modules",
    "GatedSAE": "sae_fast.sae.modules",
    "MatryoshkaSAE": "sae_fast.sae.modules",
    "SAEConfig": "sae_fast.sae.modules",
    "TrainConfig": "sae_fast.sae.train",
    "train_sae": "sae_fast.sae.train",
    "evaluate": "sae_fast.sae.train",
    "load_sae": "sae_fast.sae.checkpoint",
    "load_model": "sae_fast.models.registry",
    "extract": "sae_fast.activations.extract",
    "open_shards": "sae_fast.activations.shards",
    "SparseCode": "sae_fast.ops",
}
_MODULES = {"ops", "datasets", "interpret", "activations", "models", "sae"}

__all__ = sorted(_ATTRS) + sorted(_MODULES)


__getattr__ = lazy_getattr(__name__, _ATTRS, frozenset(_MODULES))
