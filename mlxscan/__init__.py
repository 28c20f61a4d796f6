"""mlxscan: an fMRI for language models.

Load a model through MLX, record any site of its forward pass as NumPy arrays, intervene on it, and
check it against transformers:

    import mlxscan
    model = mlxscan.load()                      # the bundled SmolLM2-135M-Instruct
    r = model.run(["The cat sat"], sites=["resid_post", "mlp_act"], logits=True)
    r["resid_post"].shape                       # [batch, layers, seq, d_model]

Names are imported on first use, so NumPy-only parts (stimuli, store, analyses) and `mlxscan --help`
never load MLX.
"""

from __future__ import annotations

import importlib

from . import _blas

_blas.preload()  # before anything imports mlx.core: MLX's Linux build then uses MKL, not its slow BLAS

__version__ = "0.1.0"

_EXPORTS = {
    "load": "mlxscan.models",
    "HookedModel": "mlxscan.models",
    "Recording": "mlxscan.capture.recording",
    "InterventionEffect": "mlxscan.capture.recording",
    "Intervention": "mlxscan.capture.interventions",
    "Add": "mlxscan.capture.interventions",
    "Ablate": "mlxscan.capture.interventions",
    "Project": "mlxscan.capture.interventions",
    "Scale": "mlxscan.capture.interventions",
    "Map": "mlxscan.capture.interventions",
    "AblateHeads": "mlxscan.capture.interventions",
    "ALL_SITES": "mlxscan.capture.sites",
    "LAYER_SITES": "mlxscan.capture.sites",
    "MODEL_SITES": "mlxscan.capture.sites",
    "HEAD_SITES": "mlxscan.capture.sites",
    "MlxscanError": "mlxscan.errors",
    "open_scan": "mlxscan.store",
    "load_stimuli": "mlxscan.stimuli",
    "SparseAutoencoder": "mlxscan.sae",
    "load_sae": "mlxscan.sae",
    "train_sae": "mlxscan.sae",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlxscan' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
