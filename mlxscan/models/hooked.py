"""A loaded model: mlx-lm's module, its family adapter, its tokenizer, and `run`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxscanError
from .families import Family, sliding_layers
from .tokenizer import Tokenizer


@dataclass(eq=False)
class HookedModel:
    """A language model whose forward pass can be recorded and intervened on at every site."""

    ref: str  # what the user asked for: a path, or "bundled:<name>"
    path: Path  # the .gguf file or Hugging Face folder the weights came from
    config: dict  # normalized Hugging Face style config
    family: Family
    module: nn.Module  # mlx-lm's Model
    tokenizer: Tokenizer
    dtype: str
    quantized: bool  # weights kept packed (MLX quantized kernels) rather than dequantized
    # MLX's Linux CPU build computes exp one element at a time; the polynomial form (capture/cpu_math.py)
    # is ~3x faster for the MLP activation and agrees to float32 rounding. Set False for MLX's own ops.
    fast_cpu_math: bool = True
    # Set for models whose weights are not the files at `path` (the untrained twin): what scans record
    # as the weights' identity instead of the files' sha256.
    weights_identity: str | None = None
    sliding_window: int | None = field(init=False)
    sliding_layers: frozenset[int] = field(init=False)

    def __post_init__(self):
        self.sliding_window, self.sliding_layers = sliding_layers(self.config, self.n_layers)

    def gated_activation(self, gate: mx.array, up: mx.array) -> mx.array:
        """The MLP neurons act(gate) * up, in the family's activation."""
        from ..capture.cpu_math import gated_activation

        fast = self.fast_cpu_math and mx.default_device() == mx.cpu and gate.dtype == mx.float32
        return gated_activation(self.family.mlp_activation, fast)(gate, up)

    @property
    def n_layers(self) -> int:
        return len(self.module.model.layers)

    @property
    def d_model(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def d_mlp(self) -> int:
        return int(self.config["intermediate_size"])

    @property
    def n_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def vocab_size(self) -> int:
        return int(self.module.model.embed_tokens.weight.shape[0])

    @property
    def max_context(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return int(value) if value else None

    def __repr__(self) -> str:
        return (f"HookedModel({self.ref!r}, {self.family.name}, layers={self.n_layers}, d_model={self.d_model}, "
                f"d_mlp={self.d_mlp}, dtype={self.dtype}{', quantized' if self.quantized else ''})")

    def weights_sha256(self) -> str:
        """sha256 of the weight files (the .gguf, or the folder's safetensors in name order), cached by size and mtime."""
        from .hashing import files_sha256

        if self.weights_identity:
            return self.weights_identity
        files = [self.path] if self.path.is_file() else sorted(self.path.glob("*.safetensors"))
        return files_sha256(files)

    def tokenize(self, text: str) -> list[int]:
        """Token ids exactly as transformers' tokenizer for this model gives them (BOS never doubled)."""
        if not isinstance(text, str):
            raise MlxscanError(f"tokenize takes a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def lm_head(self, h: mx.array) -> mx.array:
        """Logits from the final-norm output: the tied embeddings or the separate head, then soft-capping."""
        inner = self.module
        logits = inner.lm_head(h) if hasattr(inner, "lm_head") else inner.model.embed_tokens.as_linear(h)
        cap = getattr(inner, "final_logit_softcapping", None)
        if cap:
            logits = mx.tanh(logits / cap) * cap
        return logits

    def token_lists(self, inputs) -> list[list[int]]:
        """Validate inputs (a string, token ids, or a list of either) and tokenize the strings."""
        if isinstance(inputs, np.ndarray):
            inputs = inputs.tolist()
        if isinstance(inputs, str) or (isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], (int, np.integer))):
            inputs = [inputs]
        if not isinstance(inputs, Sequence) or len(inputs) == 0:
            raise MlxscanError("run needs at least one input (a string or a list of token ids)")
        token_lists = []
        for number, item in enumerate(inputs):
            if isinstance(item, str):
                if not item.strip():
                    raise MlxscanError(f"input {number} is an empty text; give every input some text")
                tokens = self.tokenize(item)
            else:
                item = item.tolist() if isinstance(item, np.ndarray) else item
                if not isinstance(item, Sequence) or not all(isinstance(t, (int, np.integer)) for t in item):
                    raise MlxscanError(f"input {number} must be a string or a list of token ids")
                tokens = [int(token) for token in item]
                bad = [t for t in tokens if not 0 <= t < self.vocab_size]
                if bad:
                    raise MlxscanError(f"input {number} has token ids outside 0..{self.vocab_size - 1}: {bad[:3]}")
            if not tokens:
                raise MlxscanError(f"input {number} has no tokens")
            if self.max_context and len(tokens) > self.max_context:
                raise MlxscanError(
                    f"input {number} is {len(tokens)} tokens, longer than the model's context of {self.max_context}; shorten it"
                )
            if self.sliding_window and len(tokens) > self.sliding_window and not self.sliding_layers:
                raise MlxscanError(f"input {number} is longer than the sliding window {self.sliding_window}")
            token_lists.append(tokens)
        return token_lists

    def run(self, inputs, sites: Sequence[str] = (), *, logits: bool = False, layers: Sequence[int] | None = None,
            interventions: Sequence = ()):
        """Run strings or token-id lists (one or a batch) and record `sites`.

        Returns a Recording: `r[site]` is [batch, layers, seq, width] for per-layer sites and
        [batch, seq, width] for embed/final_norm; `r.logits` is [batch, seq, vocab] when `logits=True`;
        `r.lengths` gives true lengths; `r.effects` says how much each intervention changed its site.
        """
        from ..capture.forward import run_tokens

        if isinstance(sites, str):
            sites = [sites]
        sites = [*sites, "logits"] if logits and "logits" not in sites else list(sites)
        return run_tokens(self, self.token_lists(inputs), sites=sites, layers=layers,
                          interventions=list(interventions))
