"""A sparse autoencoder in MLX: f = act((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec.

One class covers the three activations found in published SAEs:
  topk      ReLU of the k largest pre-activations, the rest 0 (Gao et al. 2024; SAELens "topk")
  relu      ReLU, trained with an L1 penalty (SAELens "standard")
  jumprelu  pre-activation where it exceeds a per-feature threshold, else 0 (Gemma Scope)
Weights follow SAELens' shapes: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxscanError

ARCHITECTURES = ("topk", "relu", "jumprelu")
ENCODE_BATCH = 2048  # tokens per MLX call when encoding NumPy arrays: bounds memory at large d_sae


@dataclass(frozen=True)
class SaeConfig:
    """What an SAE is and where it reads: enough to rebuild it and to splice it back into a model."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None  # topk only
    apply_b_dec_to_input: bool = True  # SAELens subtracts b_dec before encoding; Gemma Scope does not
    site: str | None = None
    layer: int | None = None
    model: dict | None = None  # the model record it was trained on (ref, path, sha256, dtype, quantized)
    layout: str = "mlxscan"  # where it was read from: mlxscan, saelens, gemma-scope
    # Leading positions of each text the SAE neither reads nor replaces: the first token is an attention sink
    # whose residual norm is ~100x the others' (SmolLM2, layer 15: 22664 against 175), as BOS is elsewhere.
    skip_first: int = 1
    extra: dict = field(default_factory=dict)  # training settings and history summary, kept as found

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise MlxscanError(f"SAE architecture must be one of {', '.join(ARCHITECTURES)}; got {self.architecture!r}")
        if self.d_in < 1 or self.d_sae < 1:
            raise MlxscanError(f"SAE sizes must be positive; got d_in {self.d_in}, d_sae {self.d_sae}")
        if self.skip_first < 0:
            raise MlxscanError(f"skip_first counts leading positions; it cannot be negative ({self.skip_first})")
        if self.architecture == "topk" and not (self.k and 1 <= self.k <= self.d_sae):
            raise MlxscanError(f"a topk SAE needs 1 <= k <= d_sae ({self.d_sae}); got k={self.k}")

    def to_dict(self) -> dict:
        return asdict(self)


def topk_mask(pre: mx.array, k: int) -> mx.array:
    """[..., d_sae] 1 where a pre-activation is among its row's k largest (a constant: no gradient)."""
    kth = mx.min(mx.topk(pre, k, axis=-1), axis=-1, keepdims=True)
    return mx.stop_gradient((pre >= kth).astype(pre.dtype))


class SparseAutoencoder(nn.Module):
    """The SAE's parameters and its encode / decode; trainable with mlx.optimizers (threshold is frozen)."""

    def __init__(self, config: SaeConfig, weights: dict[str, np.ndarray] | None = None, *, seed: int = 0):
        super().__init__()
        self.config = config
        weights = weights if weights is not None else initial_weights(config.d_in, config.d_sae, seed)
        check_weights(weights, config)
        self.W_enc = mx.array(np.asarray(weights["W_enc"], np.float32))  # [d_in, d_sae]
        self.b_enc = mx.array(np.asarray(weights["b_enc"], np.float32))  # [d_sae]
        self.W_dec = mx.array(np.asarray(weights["W_dec"], np.float32))  # [d_sae, d_in]
        self.b_dec = mx.array(np.asarray(weights["b_dec"], np.float32))  # [d_in]
        if config.architecture == "jumprelu":
            self.threshold = mx.array(np.asarray(weights["threshold"], np.float32))  # [d_sae]
            self.freeze(keys=["threshold"])

    def pre_activation(self, x: mx.array) -> mx.array:  # [..., d_in] -> [..., d_sae]
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: mx.array) -> mx.array:
        if self.config.architecture == "topk":
            return nn.relu(pre) * topk_mask(pre, self.config.k)
        if self.config.architecture == "jumprelu":
            return nn.relu(pre) * mx.stop_gradient((pre > self.threshold).astype(pre.dtype))
        return nn.relu(pre)

    def encode(self, x: mx.array) -> mx.array:  # [..., d_in] -> [..., d_sae]
        return self.activate(self.pre_activation(x))

    def decode(self, features: mx.array) -> mx.array:  # [..., d_sae] -> [..., d_in]
        return features @ self.W_dec + self.b_dec

    def __call__(self, x: mx.array) -> mx.array:
        """The reconstruction x_hat, in x's dtype: what `Map(site, layer, fn=sae)` splices into a forward pass."""
        return self.decode(self.encode(x.astype(mx.float32))).astype(x.dtype)

    def weights(self) -> dict[str, np.ndarray]:
        names = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if self.config.architecture == "jumprelu" else ())
        return {name: np.array(getattr(self, name)) for name in names}

    def encode_numpy(self, x: np.ndarray, batch: int = ENCODE_BATCH):
        """Yield (x [b, d_in], features [b, d_sae], x_hat [b, d_in]) as float32 NumPy, batch by batch."""
        for start in range(0, len(x), batch):
            chunk = np.asarray(x[start:start + batch], np.float32)
            features = self.encode(mx.array(chunk))
            reconstruction = self.decode(features)
            yield chunk, np.array(features), np.array(reconstruction)


def initial_weights(d_in: int, d_sae: int, seed: int) -> dict[str, np.ndarray]:
    """Unit-norm random decoder rows, the encoder its transpose (as SAELens and Gao et al. start)."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {"W_enc": W_dec.T.copy(), "b_enc": np.zeros(d_sae, np.float32), "W_dec": W_dec,
            "b_dec": np.zeros(d_in, np.float32)}


def check_weights(weights: dict[str, np.ndarray], config: SaeConfig) -> None:
    """Every tensor present with the shape the config implies, finite; one message listing what is wrong."""
    d_in, d_sae = config.d_in, config.d_sae
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if config.architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    problems = []
    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"{name} missing")
        elif tuple(np.shape(weights[name])) != shape:
            problems.append(f"{name} has shape {tuple(np.shape(weights[name]))}, expected {shape}")
        elif not np.all(np.isfinite(weights[name])):
            problems.append(f"{name} holds NaN or inf")
    if problems:
        raise MlxscanError(f"SAE weights do not fit d_in={d_in}, d_sae={d_sae}: " + "; ".join(problems))
