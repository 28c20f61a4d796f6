"""Analyses of recorded activations: plain NumPy arrays in, frozen result dataclasses out; never mlx or click.

Names load on first use, so importing one analysis does not import every other one's dependencies.
"""

from __future__ import annotations

import importlib

_EXPORTS = {name: "mlxscan.analysis.probes" for name in (
    "probe_layers", "ProbeReport", "LayerProbe", "decodable_span", "holm_reject",
    "concept_rank", "RankResult", "retention", "RetentionResult", "mlp_gap", "GapResult",
    "linear_probe", "make_folds", "permute_labels_by_group",
)}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlxscan.analysis' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
