"""Give MLX's CPU build a fast BLAS before it is imported.

MLX's Linux wheel bundles the reference BLAS (about 4 GFLOP/s here). Loading MKL's single dynamic
library with RTLD_GLOBAL before `mlx.core` makes libmlx resolve `cblas_sgemm` and its LAPACK calls
there instead (about 150 GFLOP/s, results equal to numpy's). Only the CPU build on Linux needs it:
on macOS MLX uses Accelerate and Metal.

Set MLXSCAN_BLAS=bundled to keep the bundled BLAS.
"""

from __future__ import annotations

import ctypes
import os
import sys
from importlib import metadata
from pathlib import Path

_loaded: str | None = None


def fast_blas_path() -> Path | None:
    """Where the `mkl` wheel put `libmkl_rt.so.*`, or None when it is not installed."""
    try:
        files = metadata.files("mkl") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmkl_rt.so"):
            path = Path(file.locate()).resolve()
            if path.exists():
                return path
    return None


def preload() -> str | None:
    """Load the fast BLAS process-wide; returns its path, or None if it was not loaded."""
    global _loaded
    if _loaded or not sys.platform.startswith("linux") or os.environ.get("MLXSCAN_BLAS") == "bundled":
        return _loaded
    if "mlx.core" in sys.modules:
        # Too late: libmlx has already bound its BLAS symbols.
        return None
    path = fast_blas_path()
    if path is None:
        return None
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _loaded = str(path)
    return _loaded


def describe() -> str:
    """One line for manifests and `mlxscan verify`: which BLAS MLX's CPU matmuls use."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _loaded:
        return f"MKL ({_loaded})"
    return "MLX's bundled reference BLAS (slow: install the 'mkl' package and import mlxscan before mlx)"
