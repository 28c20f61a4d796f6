"""Shared test set-up: parity runs in strict float32."""

import os

# MLX must not trade float32 accuracy for TF32 speed in parity runs (matters on GPUs).
os.environ.setdefault("MLX_ENABLE_TF32", "0")
# Keep the tokenizer cache inside the test session's own temporary area only when asked; the default
# user cache is fine and makes repeated runs fast.
