"""Shared test set-up: parity runs in strict float32, and caches stay inside the test session."""

import os

import mlxscan  # noqa: F401  (first, so MLX gets the fast BLAS whatever a test file imports)
import tempfile

# MLX must not trade float32 accuracy for TF32 speed in parity runs (matters on GPUs).
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# Tiny models live in fresh temporary folders, so each would leave a tokenizer in the user's cache.
os.environ["MLXSCAN_CACHE"] = tempfile.mkdtemp(prefix="mlxscan-test-cache-")
