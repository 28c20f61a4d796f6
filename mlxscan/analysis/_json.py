"""Values made JSON-ready, shared by the analyses' result records (NumPy only)."""

from __future__ import annotations

import math

import numpy as np


def jsonable(value):
    """Dicts and sequences recursively; arrays become lists, NumPy scalars Python ones, NaN or infinity null."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
