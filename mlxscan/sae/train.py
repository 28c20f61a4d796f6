"""Training an SAE in MLX on activations [n_tokens, d_in] (a token-level scan of one site and layer).

Recipe (the choices SAELens and the papers behind it converged on):
- Inputs are scaled so the mean squared norm is d_in (Anthropic's April 2024 update); the scale is folded
  into the weights at the end, so the saved SAE reads raw activations.
- Decoder rows are kept at unit norm after every step, so a feature cannot shrink its activation (and its
  L1 cost) by growing its decoder row.
- topk: loss = ||x - x_hat||^2 + aux_coefficient * AuxK, where AuxK asks the aux_k most active *dead*
  features to reconstruct the residual (Gao et al. 2024): dead features get a gradient and come back.
- relu: loss = ||x - x_hat||^2 + l1_coefficient * sum(f); dead features are resampled towards inputs the
  SAE reconstructs worst (Bricken et al. 2023), with their Adam moments reset.
A feature is dead when it fired in none of the last `dead_steps` batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..errors import MlxscanError
from .model import SaeConfig, SparseAutoencoder, topk_mask

TRAINABLE = ("topk", "relu")
RESAMPLE_POOL = 4096  # inputs scored when choosing where to re-seed dead features
RESAMPLE_ENCODER_SCALE = 0.2  # re-seeded encoder columns: 0.2 x the mean live encoder norm (Bricken et al.)

Progress = Callable[[int, int, dict], None]  # (step, steps, latest metrics)


@dataclass(frozen=True)
class TrainSettings:
    architecture: str = "topk"
    d_sae: int = 2304
    k: int = 32  # topk: active features per token
    l1_coefficient: float = 1.0  # relu: weight of sum(f) against the squared error (inputs at mean ||x||^2 = d_in)
    steps: int = 3000
    batch_size: int = 256
    learning_rate: float = 1e-3
    aux_k: int | None = None  # topk: dead features recruited by AuxK (default min(d_in // 2, d_sae))
    aux_coefficient: float = 1 / 32
    dead_steps: int = 200
    resample_every: int = 250  # relu: resampling period, during the first half of training
    log_every: int = 25
    seed: int = 0

    def check(self, n_tokens: int, d_in: int) -> None:
        if self.architecture not in TRAINABLE:
            raise MlxscanError(f"--architecture must be one of {', '.join(TRAINABLE)}; got {self.architecture!r}")
        if self.d_sae < 1 or self.steps < 1 or self.batch_size < 1 or self.log_every < 1 or self.dead_steps < 1:
            raise MlxscanError("features, steps, batch size, log interval and dead window must be at least 1")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise MlxscanError(f"--k {self.k} must lie in 1..{self.d_sae} (the number of features)")
        if not (self.learning_rate > 0 and self.l1_coefficient >= 0 and self.aux_coefficient >= 0):
            raise MlxscanError("--lr must be positive, --l1 and the aux coefficient non-negative")
        if n_tokens < 2:
            raise MlxscanError(f"{n_tokens} tokens cannot train an SAE; give a scan of more text")


@dataclass(eq=False)
class TrainResult:
    sae: SparseAutoencoder
    settings: TrainSettings
    input_scale: float  # the factor the inputs were multiplied by in training (folded into the weights)
    history: dict[str, np.ndarray]  # step, loss, fvu, l0, dead: one value per logged step
    seconds: float
    tokens_seen: int
    resampled: int = 0
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        last = {name: float(values[-1]) for name, values in self.history.items() if name != "step"}
        return {"settings": asdict(self.settings), "input_scale": self.input_scale, "seconds": self.seconds,
                "tokens_seen": self.tokens_seen, "epochs": self.notes.get("epochs"), "resampled": self.resampled,
                "last_logged": last}


def _loss(sae: SparseAutoencoder, x: mx.array, dead: mx.array, settings: TrainSettings, aux_k: int):
    """(total loss, squared error per token summed, features): x [batch, d_in] already scaled."""
    pre = sae.pre_activation(x)  # [batch, d_sae]
    features = sae.activate(pre)
    error = x - sae.decode(features)  # [batch, d_in]
    squared = mx.sum(error * error, axis=-1)
    loss = mx.mean(squared)
    if settings.architecture == "relu":
        loss = loss + settings.l1_coefficient * mx.mean(mx.sum(features, axis=-1))
    elif settings.aux_coefficient > 0:
        # AuxK: the most active dead features try to explain what the live ones missed.
        chosen = topk_mask(mx.where(dead, pre, -mx.inf), aux_k) * dead
        residual = mx.stop_gradient(error) - (nn.relu(pre) * chosen) @ sae.W_dec
        loss = loss + settings.aux_coefficient * mx.mean(mx.sum(residual * residual, axis=-1))
    return loss, squared, features


def _normalize_decoder(sae: SparseAutoencoder) -> None:
    sae.W_dec = sae.W_dec / mx.maximum(mx.linalg.norm(sae.W_dec, axis=1, keepdims=True), 1e-8)


def _resample(sae, optimizer, data: mx.array, dead_units: np.ndarray, rng: np.random.Generator) -> None:
    """Re-seed dead features on inputs drawn in proportion to their squared reconstruction error."""
    pool = data[mx.array(rng.choice(data.shape[0], min(RESAMPLE_POOL, data.shape[0]), replace=False))]
    error = np.array(mx.sum((pool - sae.decode(sae.encode(pool))) ** 2, axis=-1), np.float64)
    if not error.sum() > 0:
        return
    picks = rng.choice(len(error), len(dead_units), p=error / error.sum())
    directions = np.array(pool)[picks] - np.array(sae.b_dec)
    directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-8)  # [n_dead, d_in]
    W_enc, W_dec, b_enc = np.array(sae.W_enc), np.array(sae.W_dec), np.array(sae.b_enc)
    live = np.setdiff1d(np.arange(W_enc.shape[1]), dead_units)
    scale = RESAMPLE_ENCODER_SCALE * (np.linalg.norm(W_enc[:, live], axis=0).mean() if live.size else 1.0)
    W_dec[dead_units], W_enc[:, dead_units], b_enc[dead_units] = directions, scale * directions.T, 0.0
    sae.W_enc, sae.W_dec, sae.b_enc = mx.array(W_enc), mx.array(W_dec), mx.array(b_enc)
    _reset_moments(optimizer, dead_units, W_enc.shape[1])


def _reset_moments(optimizer, units: np.ndarray, d_sae: int) -> None:
    """Zero Adam's moments of the re-seeded features, so old gradients do not pull them back."""
    keep = np.ones(d_sae, np.float32)
    keep[units] = 0
    shapes = {"W_enc": keep[None, :], "W_dec": keep[:, None], "b_enc": keep}
    for name, mask in shapes.items():
        state = optimizer.state.get(name)
        for moment in ("m", "v"):
            if isinstance(state, dict) and moment in state:
                state[moment] = state[moment] * mx.array(mask)


def _metrics(batch: mx.array, loss: mx.array, squared: mx.array, features: mx.array, dead: int) -> dict:
    """The logged numbers of one batch: loss, FVU (against the batch's own mean), L0, dead features."""
    centred = batch - mx.mean(batch, axis=0)
    fvu = float(mx.sum(squared) / mx.maximum(mx.sum(centred * centred), 1e-30))
    return {"loss": float(loss), "fvu": fvu, "l0": float(mx.mean(mx.sum(features > 0, axis=-1))), "dead": dead}


def _fold_scale(sae: SparseAutoencoder, scale: float) -> None:
    """Make the SAE read raw activations: with x' = s x, (x' - b) W = (x - b/s)(s W) and x_hat = x_hat'/s."""
    sae.W_enc, sae.W_dec, sae.b_dec = sae.W_enc * scale, sae.W_dec / scale, sae.b_dec / scale


def train_sae(activations: np.ndarray, settings: TrainSettings = TrainSettings(), *, site: str | None = None,
              layer: int | None = None, model: dict | None = None, progress: Progress | None = None) -> TrainResult:
    """Train an SAE on activations [n_tokens, d_in]; the result reads raw (unscaled) activations."""
    X = np.asarray(activations)
    if X.ndim != 2 or not np.issubdtype(X.dtype, np.number):
        raise MlxscanError(f"activations must be a numeric [n_tokens, d_in] array; got shape {X.shape}")
    settings.check(len(X), X.shape[1])
    X = np.asarray(X, np.float32)
    if not np.all(np.isfinite(X)):
        raise MlxscanError("the activations hold NaN or inf; an SAE cannot train on them")
    d_in = X.shape[1]
    scale = float(math.sqrt(d_in / max(float(np.mean(np.sum(X.astype(np.float64) ** 2, axis=1))), 1e-30)))
    data = mx.array(X * scale)  # [n_tokens, d_in]
    config = SaeConfig(d_in=d_in, d_sae=settings.d_sae, architecture=settings.architecture,
                       k=settings.k if settings.architecture == "topk" else None, site=site, layer=layer, model=model)
    sae = SparseAutoencoder(config, seed=settings.seed)
    sae.b_dec = mx.mean(data, axis=0)  # start at the data's centre, as SAELens' "mean" init
    optimizer = optim.Adam(learning_rate=settings.learning_rate)
    aux_k = settings.aux_k or min(max(d_in // 2, 1), settings.d_sae)
    step_fn = nn.value_and_grad(sae, lambda model, x, dead: _loss(model, x, dead, settings, aux_k))
    rng = np.random.default_rng(settings.seed)
    last_fired = np.zeros(settings.d_sae, np.int64)  # step at which each feature last fired (0: never yet)
    history = {name: [] for name in ("step", "loss", "fvu", "l0", "dead")}
    order, cursor, resampled, started = rng.permutation(len(X)), 0, 0, time.perf_counter()
    for step in range(1, settings.steps + 1):
        if cursor + settings.batch_size > len(order):  # a new epoch: reshuffle
            order, cursor = rng.permutation(len(X)), 0
        batch = data[mx.array(order[cursor:cursor + settings.batch_size])]
        cursor += settings.batch_size
        dead_now = step - last_fired > settings.dead_steps
        (loss, squared, features), grads = step_fn(sae, batch, mx.array(dead_now))
        optimizer.update(sae, grads)
        _normalize_decoder(sae)
        last_fired[np.array(mx.any(features > 0, axis=0))] = step
        dead = step - last_fired > settings.dead_steps
        if (settings.architecture == "relu" and step % settings.resample_every == 0 and step <= settings.steps // 2
                and step > settings.dead_steps and dead.any()):
            _resample(sae, optimizer, data, np.flatnonzero(dead), rng)
            resampled += int(dead.sum())
            last_fired[dead] = step
        if step % settings.log_every == 0 or step == settings.steps:
            metrics = _metrics(batch, loss, squared, features, int(dead.sum()))
            for name, value in (("step", step), *metrics.items()):
                history[name].append(value)
            if progress:
                progress(step, settings.steps, metrics)
    _fold_scale(sae, scale)
    mx.eval(sae.parameters())
    tokens = settings.steps * settings.batch_size
    return TrainResult(sae=sae, settings=settings, input_scale=scale,
                       history={name: np.asarray(values) for name, values in history.items()},
                       seconds=time.perf_counter() - started, tokens_seen=tokens, resampled=resampled,
                       notes={"epochs": tokens / len(X), "aux_k": aux_k if settings.architecture == "topk" else None})
