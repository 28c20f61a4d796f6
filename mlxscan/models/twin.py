"""The untrained twin: the same architecture with fresh random weights, the control every probe needs.

Initialised as the architecture's own Hugging Face init does it: every linear and embedding matrix
from N(0, initializer_range) (0.02 when the config does not say), biases zero, RMSNorm gains at
their identity value (1, or 0 for Gemma's (1 + w) norms). Seeded, so a twin is reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .build import DTYPES
from .mlx_lm_classes import model_module


def _initial_value(name: str, shape: tuple[int, ...], *, std: float, norm_identity: float, rng) -> np.ndarray:
    if name.endswith(".bias"):  # before the norm test: a LayerNorm's bias is zero, not its gain's identity
        return np.zeros(shape, np.float32)
    module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if module_name.endswith("norm"):
        return np.full(shape, norm_identity, np.float32)
    return rng.normal(0.0, std, size=shape).astype(np.float32)


def make_twin(model, seed: int = 0):
    """A HookedModel with `model`'s architecture, tokenizer and dtype and seeded random weights."""
    module = model_module(model.family.mlx_lm_module)
    twin_module = module.Model(module.ModelArgs.from_dict(model.config))
    std = float(model.config.get("initializer_range") or 0.02)
    norm_identity = 0.0 if model.family.sandwich_norms else 1.0  # Gemma stores w and applies (1 + w)
    rng = np.random.default_rng(seed)
    weights = [
        (name, mx.array(_initial_value(name, value.shape, std=std, norm_identity=norm_identity, rng=rng)))
        for name, value in tree_flatten(twin_module.parameters())
    ]
    twin_module.update(tree_unflatten(weights))
    twin_module.set_dtype(DTYPES[model.dtype])
    twin_module.eval()
    mx.eval(twin_module.parameters())
    # The version tag changes whenever the init does, so cached twin scans are not reused across inits.
    identity = hashlib.sha256(f"twin/1|{seed}|{std}|{model.weights_sha256()}".encode()).hexdigest()
    return replace(model, ref=f"twin({model.ref}, seed={seed})", module=twin_module, quantized=False,
                   weights_identity=identity)
