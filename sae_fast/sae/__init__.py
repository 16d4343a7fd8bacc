"""Sparse autoencoders: the architectures (modules), the trainer (train) and safetensors checkpoints."""

from sae_fast.sae.checkpoint import load_sae, save_sae
from sae_fast.sae.modules import (
    BatchTopKSAE,
    GatedSAE,
    MatryoshkaSAE,
    ReLUSAE,
    SAEConfig,
    SAELoss,
    SparseAutoencoder,
    TopKSAE,
)
from sae_fast.sae.train import EvalResult, TrainConfig, evaluate, train_sae

__all__ = ["BatchTopKSAE", "EvalResult", "GatedSAE", "MatryoshkaSAE", "ReLUSAE", "SAEConfig", "SAELoss",
           "SparseAutoencoder", "TopKSAE", "TrainConfig", "evaluate", "load_sae", "save_sae", "train_sae"]
