"""Index topography: do units with neighbouring indices prefer the same categories?

Input: selectivity [n_classes, n_units], the d' of every unit for every class, units in index order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MlxscanError

__all__ = ["Topography", "topography"]


@dataclass(frozen=True, eq=False)
class Topography:
    """Do units with neighbouring indices prefer the same categories more than units in random order?"""

    observed: float  # mean signal correlation of the d' profiles of units i and i + 1
    null: np.ndarray  # [permutations] the same after shuffling the units' order
    n_units: int  # units with a non-constant profile (the others have no correlation)
    seed: int

    @property
    def z(self) -> float:
        spread = float(self.null.std(ddof=1)) if len(self.null) > 1 else 0.0
        return (self.observed - float(self.null.mean())) / spread if spread > 0 else float("nan")

    @property
    def p_value(self) -> float:
        """One-sided: (1 + #{null ≥ observed}) / (1 + permutations), never 0."""
        return float((1 + np.sum(self.null >= self.observed - 1e-12)) / (1 + len(self.null)))

    def to_dict(self) -> dict:
        z = self.z
        return {"observed": self.observed, "null_mean": float(self.null.mean()),
                "null_sd": float(self.null.std(ddof=1)) if len(self.null) > 1 else None,
                "z": z if math.isfinite(z) else None,  # NaN is not JSON
                "p": self.p_value, "n_units": self.n_units, "permutations": len(self.null), "seed": self.seed}


def _neighbour_agreement(profiles: np.ndarray) -> np.ndarray:
    """[..., n, k] unit-normalized, centered profiles → [...] mean dot product of consecutive units."""
    return np.einsum("...ik,...ik->...i", profiles[..., :-1, :], profiles[..., 1:, :]).mean(axis=-1)


def topography(selectivity, *, permutations: int = 1000, seed: int = 0) -> Topography:
    """Index topography: agreement of neighbouring units' selectivity, against shuffled unit orders.

    Agreement is the Pearson correlation across classes of two units' d' profiles (their "signal
    correlation"). Units with a constant profile are left out, and their neighbours close ranks.
    """
    d = np.asarray(selectivity, np.float64)
    if d.ndim != 2 or d.shape[0] < 2 or not np.isfinite(d).all():
        raise MlxscanError(f"selectivity must be finite [n_classes >= 2, n_units]; got shape {d.shape}")
    if permutations < 1:
        raise MlxscanError(f"permutations must be at least 1; got {permutations}")
    profiles = d.T - d.T.mean(axis=1, keepdims=True)  # [n_units, k]
    norms = np.linalg.norm(profiles, axis=1)
    keep = norms > 1e-12 * (1 + np.abs(d).max())
    profiles = profiles[keep] / norms[keep, None]
    if len(profiles) < 3:
        raise MlxscanError(f"{len(profiles)} units prefer any category; topography needs at least 3")
    rng = np.random.default_rng([seed, 3])
    null = np.concatenate([
        _neighbour_agreement(profiles[np.argsort(rng.random((size, len(profiles))), axis=1)])
        for size in np.diff(np.r_[0:permutations:64, permutations])])  # 64 orders at a time
    return Topography(float(_neighbour_agreement(profiles)), null, len(profiles), seed)
