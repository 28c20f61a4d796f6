"""mlxscan: an fMRI for language models.

Load a model through MLX, record any site of its forward pass as NumPy arrays, intervene on it, and
check it against transformers:

    import mlxscan
    model = mlxscan.load()                      # the bundled SmolLM2-135M-Instruct
    r = model.run(["The cat sat"], sites=["resid_post", "mlp_act"], logits=True)
    r["resid_post"].shape                       # [batch, layers, seq, d_model]
"""

from __future__ import annotations

from . import _blas

_blas.preload()  # before anything imports mlx.core: MLX's Linux build then uses MKL, not its slow BLAS

from .capture.interventions import Ablate, Add, Intervention, Project, Scale  # noqa: E402
from .capture.recording import InterventionEffect, Recording  # noqa: E402
from .capture.sites import ALL_SITES, LAYER_SITES, MODEL_SITES  # noqa: E402
from .errors import MlxscanError  # noqa: E402
from .models import HookedModel, load  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "load", "HookedModel", "Recording", "InterventionEffect",
    "Add", "Ablate", "Project", "Scale", "Intervention",
    "ALL_SITES", "LAYER_SITES", "MODEL_SITES", "MlxscanError", "__version__",
]
