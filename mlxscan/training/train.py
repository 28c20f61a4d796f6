"""The training loop: next-token cross-entropy plus λ × wiring cost, AdamW, one compiled step.

What makes a run bit-reproducible on CPU: the init, the unit layout and the data order come from
NumPy generators seeded by (seed, stream), not from MLX's global random state; nothing random happens
inside the step (no dropout); the step is one compiled MLX graph, evaluated in the same order every
time; and MKL runs on one thread during training, so no sum is split differently between runs. The
tests train twice from one seed and compare every weight bit for bit. (Another BLAS, thread count or
MLX version may round differently: reproducible on one machine and set-up, not across them.)
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..errors import MlxscanError
from .corpus import TokenData, batch_starts, validation_windows, windows
from .tiny_model import TinyConfig, build_model, use_cpu_activation
from .wiring_cost import UnitLayout, unit_layout, wiring_cost

LOG_EVERY = 10  # steps between the loss values kept in the curve (and progress updates)


@dataclass(frozen=True)
class TrainSettings:
    """One training run; `seed` fixes the init, the unit layout and the data order, `wiring_lambda` the penalty."""

    steps: int = 500
    batch_size: int = 16
    seq_len: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.0  # AdamW's decoupled decay off: the wiring cost is the only pull on the weights
    warmup_steps: int = 30
    wiring_lambda: float = 0.0
    layout: str = "line"
    seed: int = 0

    def __post_init__(self):
        if min(self.steps, self.batch_size, self.seq_len) < 1:
            raise MlxscanError("steps, batch size and sequence length must be at least 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise MlxscanError(f"learning rate must be a positive number, got {self.learning_rate}")
        if not (self.wiring_lambda >= 0 and math.isfinite(self.wiring_lambda)):
            raise MlxscanError(f"the wiring-cost λ must be a finite number >= 0, got {self.wiring_lambda}")


@dataclass(eq=False)
class TrainedRun:
    """A finished run: the model (mlx-lm's Llama), its layout, its loss curve and its timings."""

    model: object
    config: TinyConfig
    settings: TrainSettings
    layout: UnitLayout
    curve_steps: np.ndarray  # [k] steps at which the curve was sampled
    train_loss: np.ndarray  # [k] language-model loss (penalty excluded) of the batch at those steps
    total_loss: np.ndarray  # [k] the loss optimised: LM loss + λ × wiring cost
    validation_loss: float  # mean next-token NLL (nats) over the validation windows
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return {"settings": asdict(self.settings), "config": asdict(self.config),
                "final_train_loss": float(self.train_loss[-1]), "validation_loss": self.validation_loss,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second}


@contextlib.contextmanager
def single_threaded_blas():
    """MKL on one thread while training, then as it was.

    The step's matrices are small (64 x 256): with two threads on a shared 2-core machine MKL ran a step
    3x slower than with one (0.53 s against 0.17 s, measured here under load), and one thread keeps the
    order of every sum fixed.
    """
    from .. import _blas

    library = ctypes.CDLL(_blas._loaded) if _blas._loaded else None
    before = library.MKL_Get_Max_Threads() if library else None
    if library:
        library.MKL_Set_Num_Threads(ctypes.c_int(1))
    try:
        yield
    finally:
        if library:
            library.MKL_Set_Num_Threads(ctypes.c_int(before))


def learning_rate_schedule(settings: TrainSettings):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = min(settings.warmup_steps, max(settings.steps - 1, 0))
    decay = optim.cosine_decay(settings.learning_rate, max(settings.steps - warmup, 1), settings.learning_rate / 10)
    if warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(settings.learning_rate / warmup, settings.learning_rate,
                                                       warmup), decay], [warmup])


def language_model_loss(model, inputs: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy in nats; inputs and targets [batch, seq]."""
    return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")


def validation_loss(model, data: TokenData, seq_len: int, batch_size: int = 64) -> float:
    """Mean next-token NLL over all non-overlapping validation windows (every target token weighs the same)."""
    inputs, targets = validation_windows(data.validation, seq_len)
    total = 0.0
    for start in range(0, len(inputs), batch_size):
        loss = language_model_loss(model, mx.array(inputs[start:start + batch_size]),
                                   mx.array(targets[start:start + batch_size]))
        total += float(loss) * len(inputs[start:start + batch_size])
    return total / len(inputs)


def train(data: TokenData, config: TinyConfig, settings: TrainSettings,
          progress: Callable[[int, int, float], None] | None = None) -> TrainedRun:
    """Train a fresh model; `progress(step, steps, loss)` is called every LOG_EVERY steps and at the end."""
    if config.vocab_size != data.vocab_size:
        raise MlxscanError(f"the config's vocabulary ({config.vocab_size}) is not the tokenizer's ({data.vocab_size})")
    if settings.seq_len > config.max_context:
        raise MlxscanError(f"sequence length {settings.seq_len} exceeds the model's context of {config.max_context}")
    with single_threaded_blas():
        return _train(data, config, settings, progress)


def _train(data: TokenData, config: TinyConfig, settings: TrainSettings, progress) -> TrainedRun:
    model = build_model(config, settings.seed)
    use_cpu_activation(model)
    layout = unit_layout(config.n_layers, config.d_model, config.d_mlp, layout=settings.layout, seed=settings.seed)
    distances, lam = mx.array(layout.distances()), settings.wiring_lambda
    optimizer = optim.AdamW(learning_rate=learning_rate_schedule(settings), weight_decay=settings.weight_decay)

    def loss_fn(inputs, targets):
        lm = language_model_loss(model, inputs, targets)
        return (lm + lam * wiring_cost(model, distances) if lam > 0 else lm), lm

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets):
        (total, lm), grads = nn.value_and_grad(model, loss_fn)(inputs, targets)
        optimizer.update(model, grads)
        return total, lm

    starts = batch_starts(len(data.train), settings.seq_len, settings.batch_size, settings.steps, settings.seed)
    curve_steps, lm_curve, total_curve = [], [], []
    began = time.perf_counter()
    for number in range(settings.steps):
        inputs, targets = windows(data.train, starts[number], settings.seq_len)
        total, lm = step(mx.array(inputs), mx.array(targets))
        mx.eval(state)
        if (number + 1) % LOG_EVERY == 0 or number + 1 == settings.steps:
            curve_steps.append(number + 1), lm_curve.append(float(lm)), total_curve.append(float(total))
            if not math.isfinite(total_curve[-1]):
                raise MlxscanError(f"the loss diverged at step {number + 1}; lower the learning rate or λ")
            if progress:
                progress(number + 1, settings.steps, lm_curve[-1])
    seconds = time.perf_counter() - began
    tokens = settings.steps * settings.batch_size * settings.seq_len
    return TrainedRun(model, config, settings, layout, np.array(curve_steps), np.array(lm_curve),
                      np.array(total_curve), validation_loss(model, data, settings.seq_len), seconds,
                      tokens / seconds if seconds > 0 else float("nan"))
