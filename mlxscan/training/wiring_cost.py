"""Units with positions, and the wiring cost λ·Σ|w_ij|·distance(i, j) over the MLP weight matrices.

Every MLP neuron of every layer gets a fixed position, and so does every residual-stream dimension
(one set shared by all layers: the residual stream is one space that every MLP reads and writes). A
weight of gate_proj or up_proj joins residual dimension j to neuron i; one of down_proj joins neuron
i back to dimension j. Its cost is |w| times the distance between the two units, as a wire would cost
in a brain with a physical layout.

Layouts ("line": the unit interval, "sheet": the unit square) put each group's units on evenly spaced
slots in a seeded random order, so within a group every unit has the same spacing and index order
says nothing about place.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..errors import MlxscanError

LAYOUTS = ("line", "sheet")


def _slots(n: int, layout: str) -> np.ndarray:
    """[n, dim] evenly spaced places in [0, 1]^dim: centres of n cells on a line, or of a near-square grid."""
    if layout == "line":
        return ((np.arange(n) + 0.5) / n)[:, None]
    columns = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.stack(np.meshgrid((np.arange(columns) + 0.5) / columns, (np.arange(rows) + 0.5) / rows), -1)
    return grid.reshape(-1, 2)[:n]


@dataclass(frozen=True, eq=False)
class UnitLayout:
    """Positions of the residual dimensions and of each layer's MLP neurons."""

    layout: str
    residual: np.ndarray  # [d_model, dim]
    neurons: np.ndarray  # [n_layers, d_mlp, dim]
    seed: int

    def distances(self) -> np.ndarray:
        """[n_layers, d_mlp, d_model] Euclidean distance between neuron i of a layer and residual dimension j."""
        difference = self.neurons[:, :, None, :] - self.residual[None, None, :, :]
        return np.sqrt(np.sum(difference ** 2, axis=-1)).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"residual_positions": self.residual, "neuron_positions": self.neurons}


def unit_layout(n_layers: int, d_model: int, d_mlp: int, *, layout: str = "line", seed: int = 0) -> UnitLayout:
    """Seeded positions: each group (the residual dimensions, each layer's neurons) on its own shuffled slots."""
    if layout not in LAYOUTS:
        raise MlxscanError(f"layout must be {' or '.join(LAYOUTS)}, got {layout!r}")
    rng = np.random.default_rng([seed, 23])  # stream 23: apart from the init's and the data order's
    residual = _slots(d_model, layout)[rng.permutation(d_model)]
    neurons = np.stack([_slots(d_mlp, layout)[rng.permutation(d_mlp)] for _ in range(n_layers)])
    return UnitLayout(layout, residual, neurons, seed)


def wiring_cost(model, distances: mx.array) -> mx.array:
    """Σ over layers of Σ|w|·d over gate_proj, up_proj and down_proj (a scalar; multiply by λ).

    distances: [n_layers, d_mlp, d_model]. |w| has gradient sign(w)·d (0 at w = 0, as mx.abs gives it).
    """
    total = mx.array(0.0, dtype=mx.float32)
    for layer, block in enumerate(model.model.layers):
        d = distances[layer]  # [d_mlp, d_model]
        mlp = block.mlp
        total = total + mx.sum((mx.abs(mlp.gate_proj.weight) + mx.abs(mlp.up_proj.weight)) * d)
        total = total + mx.sum(mx.abs(mlp.down_proj.weight) * d.T)  # down_proj is [d_model, d_mlp]
    return total
