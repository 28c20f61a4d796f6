"""Sparse autoencoders in MLX: the model, its training, and reading the published layouts."""

from .io import load_sae, sae_files
from .model import SaeConfig, SparseAutoencoder
from .train import TrainResult, TrainSettings, train_sae

__all__ = ["SaeConfig", "SparseAutoencoder", "TrainSettings", "TrainResult", "train_sae", "load_sae", "sae_files"]
