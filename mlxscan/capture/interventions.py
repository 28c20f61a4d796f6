"""Interventions: small records of what to change at a site, applied by the one engine in forward.py.

Each names a site and one or more layers; `positions` limits it to some token positions (negative
ones count back from each sequence's own end, so -1 is every sequence's last real token). A site or
layer that matches nothing is an error before anything runs, and every run reports how much each
intervention changed what it touched (the silent no-op is the field's most reported bug).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..errors import MlxscanError
from .sites import is_layer_site, site_width


def _as_layers(layer) -> tuple[int | None, ...]:
    if layer is None:
        return (None,)
    if isinstance(layer, (int, np.integer)):
        return (int(layer),)
    return tuple(int(item) for item in layer)


def _vector(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1:
        raise MlxscanError(f"{name} must be one vector [width], got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise MlxscanError(f"{name} contains NaN or inf")
    return array


@dataclass(frozen=True, eq=False)
class Intervention:
    site: str
    layer: int | Sequence[int] | None
    positions: Sequence[int] | None = field(default=None, kw_only=True)

    @property
    def layers(self) -> tuple[int | None, ...]:
        return _as_layers(self.layer)

    def check(self, model) -> None:
        """Raise MlxscanError unless this matches a real site, real layers and the site's width."""
        per_layer = is_layer_site(self.site)
        for layer in self.layers:
            if per_layer and layer is None:
                raise MlxscanError(f"{self.describe()}: site {self.site!r} needs a layer (0..{model.n_layers - 1})")
            if not per_layer and layer is not None:
                raise MlxscanError(f"{self.describe()}: site {self.site!r} has no layers; pass layer=None")
            if layer is not None and not 0 <= layer < model.n_layers:
                raise MlxscanError(f"{self.describe()}: layer {layer} does not exist (0..{model.n_layers - 1})")
        if self.site == "logits":
            raise MlxscanError("interventions on logits are not supported; intervene on final_norm instead")
        width = site_width(model, self.site)
        if width is None and not isinstance(self, Map):
            raise MlxscanError(f"{self.describe()}: site {self.site!r} has no fixed width; only Map can change it")
        self._check_width(width)

    def _check_width(self, width: int) -> None:
        pass

    def transform(self, x: mx.array) -> mx.array:  # x: [batch, seq, width]
        raise NotImplementedError

    def describe(self) -> str:
        return f"{type(self).__name__}({self.site!r}, layer={self.layer!r})"


def _check_vector_width(intervention: Intervention, vector: np.ndarray, width: int, name: str) -> None:
    if vector.shape[0] != width:
        raise MlxscanError(
            f"{intervention.describe()}: {name} has {vector.shape[0]} values but site {intervention.site!r} is {width} wide"
        )


def _unit(direction: np.ndarray, intervention: Intervention) -> mx.array:
    norm = float(np.linalg.norm(direction))
    if norm == 0:
        raise MlxscanError(f"{intervention.describe()}: the direction is all zeros")
    return mx.array(direction / norm)


@dataclass(frozen=True, eq=False)
class Add(Intervention):
    """x + scale * vector (steering)."""

    vector: Sequence[float] = ()
    scale: float = 1.0

    def _check_width(self, width):
        _check_vector_width(self, _vector(self.vector, "vector"), width, "vector")

    def transform(self, x):
        return x + (self.scale * mx.array(_vector(self.vector, "vector"))).astype(x.dtype)


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """Set some units to zero, or to their mean (mean: one value per unit of the site, or per listed unit)."""

    units: Sequence[int] = ()
    mode: str = "zero"
    mean: Sequence[float] | None = None

    def _index(self, width: int) -> np.ndarray:
        units = np.asarray(self.units, dtype=np.int64).reshape(-1)
        if units.size == 0:
            raise MlxscanError(f"{self.describe()}: no units given")
        if units.min() < -width or units.max() >= width:
            raise MlxscanError(f"{self.describe()}: unit indices must lie in 0..{width - 1}")
        return units % width

    def _replacement(self, units: np.ndarray, width: int) -> np.ndarray:
        if self.mode == "zero":
            if self.mean is not None:
                raise MlxscanError(f"{self.describe()}: mean is only used with mode='mean'")
            return np.zeros(units.size, np.float32)
        if self.mode != "mean":
            raise MlxscanError(f"{self.describe()}: mode must be 'zero' or 'mean', got {self.mode!r}")
        if self.mean is None:
            raise MlxscanError(f"{self.describe()}: mode='mean' needs mean= (the units' mean activation)")
        mean = _vector(self.mean, "mean")
        if mean.shape[0] == width:
            return mean[units]
        if mean.shape[0] == units.size:
            return mean
        raise MlxscanError(f"{self.describe()}: mean must have {width} values (one per unit) or {units.size} (one per ablated unit)")

    def _check_width(self, width):
        self._replacement(self._index(width), width)

    def transform(self, x):
        width = x.shape[-1]
        units = self._index(width)
        keep = np.ones(width, np.float32)
        keep[units] = 0
        fill = np.zeros(width, np.float32)
        fill[units] = self._replacement(units, width)
        return x * mx.array(keep).astype(x.dtype) + mx.array(fill).astype(x.dtype)


@dataclass(frozen=True, eq=False)
class Project(Intervention):
    """Remove the component of x along a direction: x - (x . u) u, u the unit direction."""

    direction: Sequence[float] = ()

    def _check_width(self, width):
        _check_vector_width(self, _vector(self.direction, "direction"), width, "direction")
        _unit(_vector(self.direction, "direction"), self)

    def transform(self, x):
        u = _unit(_vector(self.direction, "direction"), self).astype(x.dtype)
        return x - (x @ u)[..., None] * u


@dataclass(frozen=True, eq=False)
class Scale(Intervention):
    """Multiply x by factor; with a direction only its component along it, with units only those units."""

    factor: float = 1.0
    direction: Sequence[float] | None = None
    units: Sequence[int] | None = None

    def _factors(self, width: int) -> np.ndarray:
        """[width] factor on the chosen units, 1 elsewhere (the units checked as Ablate checks them)."""
        units = np.asarray(self.units, dtype=np.int64).reshape(-1)
        if units.size == 0:
            raise MlxscanError(f"{self.describe()}: units is empty; give at least one unit, or units=None for all")
        if units.min() < -width or units.max() >= width:
            raise MlxscanError(f"{self.describe()}: unit indices must lie in 0..{width - 1}")
        factors = np.ones(width, np.float32)
        factors[units % width] = self.factor
        return factors

    def _check_width(self, width):
        if self.direction is not None and self.units is not None:
            raise MlxscanError(f"{self.describe()}: give a direction or units, not both")
        if self.units is not None:
            self._factors(width)
        if self.direction is not None:
            _check_vector_width(self, _vector(self.direction, "direction"), width, "direction")
            _unit(_vector(self.direction, "direction"), self)

    def transform(self, x):
        if self.units is not None:
            return x * mx.array(self._factors(x.shape[-1])).astype(x.dtype)
        if self.direction is None:
            return x * self.factor
        u = _unit(_vector(self.direction, "direction"), self).astype(x.dtype)
        return x + (self.factor - 1.0) * (x @ u)[..., None] * u


@dataclass(frozen=True, eq=False)
class Map(Intervention):
    """x -> fn(x), any function of the site's value [batch, seq, width] as an MLX array of the same shape.

    For what the fixed records cannot say: an SAE's reconstruction spliced in, another run's values patched.
    """

    fn: Callable[[mx.array], mx.array] | None = None

    def _check_width(self, width):
        if not callable(self.fn):
            raise MlxscanError(f"{self.describe()}: fn must be a function of the site's value")

    def transform(self, x):
        out = self.fn(x)
        if not isinstance(out, mx.array) or tuple(out.shape) != tuple(x.shape):
            shape = getattr(out, "shape", type(out).__name__)
            raise MlxscanError(f"{self.describe()}: fn returned {shape}; it must return an MLX array of shape {tuple(x.shape)}")
        return out.astype(x.dtype)


@dataclass(frozen=True, eq=False)
class AblateHeads(Intervention):
    """Silence attention heads: their outputs (site attn_head) set to zero, or to a mean [heads, head_dim].

    mean is one row per head of the model, or one per listed head, e.g. the heads' outputs averaged
    over a reference set of tokens (mean ablation).
    """

    heads: Sequence[int] = ()
    mode: str = "zero"
    mean: np.ndarray | Sequence[Sequence[float]] | None = None

    def check(self, model) -> None:
        if self.site != "attn_head":
            raise MlxscanError(f"{self.describe()}: AblateHeads acts on site 'attn_head', not {self.site!r}")
        super().check(model)
        self._fill(model.n_heads, site_width(model, "attn_head"))

    def _fill(self, n_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(keep [heads, 1], fill [heads, head_dim]): x * keep + fill ablates the listed heads."""
        heads = np.asarray(self.heads, dtype=np.int64).reshape(-1)
        if heads.size == 0 or heads.min() < 0 or heads.max() >= n_heads:
            raise MlxscanError(f"{self.describe()}: heads must be a non-empty list in 0..{n_heads - 1}")
        keep = np.ones((n_heads, 1), np.float32)
        keep[heads] = 0
        fill = np.zeros((n_heads, head_dim), np.float32)
        if self.mode == "mean":
            fill[heads] = self._mean_rows(heads, n_heads, head_dim)
        elif self.mode != "zero" or self.mean is not None:
            raise MlxscanError(f"{self.describe()}: mode must be 'zero' (without mean) or 'mean' (with mean=)")
        return keep, fill

    def _mean_rows(self, heads: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
        if self.mean is None:
            raise MlxscanError(f"{self.describe()}: mode='mean' needs mean= [heads, head_dim]")
        mean = np.asarray(self.mean, np.float32)
        if mean.shape == (n_heads, head_dim):
            return mean[heads]
        if mean.shape == (heads.size, head_dim):
            return mean
        raise MlxscanError(f"{self.describe()}: mean must be [{n_heads}, {head_dim}] or [{heads.size}, {head_dim}], "
                           f"got {mean.shape}")

    def transform(self, x):  # x: [batch, seq, heads, head_dim]
        keep, fill = self._fill(x.shape[2], x.shape[3])
        return x * mx.array(keep).astype(x.dtype) + mx.array(fill).astype(x.dtype)
