"""Selectivity layer by layer: the most selective units, their null, and whether they replicate.

`layer_selectivity` runs `selectivity`'s three questions on every layer of X [n_stimuli, n_layers,
width] with the same word shuffles and the same halvings for every layer, so layers differ only by
their activations. Layer indices are positions along X's axis 1; a scan's `layers` maps them to
model layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import MlxscanError
from .probes import holm_reject
from ._by_word import check_layer, layer_positions, make_splits, one_blas_thread, word_sums, words_of
from .selectivity import (Replicability, SelectivityNull, _check_counts, _null, _observed, _replicability,
                          _shuffled_labels)

__all__ = ["LayerSelectivity", "SelectivityReport", "layer_selectivity"]


@dataclass(frozen=True, eq=False)  # eq=False: the arrays have no single truth value
class LayerSelectivity:
    """One layer: every unit's d', each class's top-k units with their corrected p, and replicability."""

    layer: int  # position along X's axis 1
    selectivity: np.ndarray  # [K, U] d' of every unit for every class
    top_units: np.ndarray  # [K, k] unit indices, most selective first
    top_dprime: np.ndarray  # [K, k]
    top_p: np.ndarray  # [K, k] maxT-adjusted p of each top unit against the word-shuffled null
    null: SelectivityNull
    replicability: Replicability

    def to_dict(self) -> dict:
        best_class = int(np.argmax(self.top_dprime[:, 0]))
        overlap = self.replicability.to_dict()
        null = self.null.to_dict()
        per_class = [{
            "class": _plain(label), "top_units": self.top_units[c].tolist(), "top_dprime": self.top_dprime[c].tolist(),
            "top_p": self.top_p[c].tolist(), "top_mean": null["top_mean"][c], "p_top_mean": null["p_top_mean"][c],
            "null_best_95": null["null_best_95"][c], "overlap": overlap["class_mean"][c],
            "overlap_ci": overlap["class_ci"][c], "fraction_above_chance": overlap["class_fraction_above_chance"][c],
        } for c, label in enumerate(self.null.classes)]
        return {
            "layer": self.layer,
            "best": {"class": _plain(self.null.classes[best_class]), "unit": int(self.top_units[best_class, 0]),
                     "dprime": float(self.top_dprime[best_class, 0]), "p": self.null.p_layer},
            "overlap": {key: overlap[key] for key in ("mean", "ci", "chance", "chance_q95", "shuffled_mean",
                                                      "shuffled_ci", "fraction_above_chance", "n_units")},
            "classes": per_class,
        }


@dataclass(frozen=True, eq=False)
class SelectivityReport:
    """`layer_selectivity`'s answer, and the arrays the numbers came from."""

    layers: tuple[LayerSelectivity, ...]
    classes: tuple
    k: int
    permutations: int
    halvings: int
    seed: int
    in_half_a: np.ndarray  # [halvings, n] True where a stimulus fell in half A (the same for every layer)

    def selective_layers(self, alpha: float = 0.05) -> np.ndarray:
        """[n_layers] bool: layers whose best unit beats the null after Holm correction over layers."""
        return holm_reject([layer.null.p_layer for layer in self.layers], alpha)

    def to_dict(self) -> dict:
        selective = self.selective_layers()
        return {
            "classes": [_plain(label) for label in self.classes], "k": self.k, "permutations": self.permutations,
            "halvings": self.halvings, "seed": self.seed,
            "layers": [{**layer.to_dict(), "selective_holm": bool(flag)}
                       for layer, flag in zip(self.layers, selective)],
            "selective_span": float(selective.mean()),
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays behind the numbers, named for np.savez (leading axis: the layers, in order)."""
        def stack(name):
            return np.stack([getattr(layer, name) for layer in self.layers])

        return {
            "layer_positions": np.array([layer.layer for layer in self.layers]),
            "classes": np.asarray(self.classes),
            "selectivity": stack("selectivity").astype(np.float32),  # [L, K, U] d'
            "top_units": stack("top_units"), "top_dprime": stack("top_dprime"), "top_p": stack("top_p"),
            "null_best": np.stack([layer.null.null_best for layer in self.layers]),  # [L, P, K]
            "null_top_mean": np.stack([layer.null.null_top_mean for layer in self.layers]),
            "overlaps": np.stack([layer.replicability.overlaps for layer in self.layers]),  # [L, H, K]
            "shuffled_overlaps": np.stack([layer.replicability.shuffled_overlaps for layer in self.layers]),
            "chance": np.array([layer.replicability.chance for layer in self.layers]),
            "chance_q95": np.array([layer.replicability.chance_q95 for layer in self.layers]),
            "in_half_a": self.in_half_a,
        }


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _one_layer(X: np.ndarray, layer: int, words, shuffled: np.ndarray, splits, k: int, seed: int) -> LayerSelectivity:
    stats = word_sums(X, words)
    selectivity = _observed(stats, words)  # [K, U]
    top = np.argsort(-selectivity, axis=1, kind="stable")[:, :k]
    top_dprime = np.take_along_axis(selectivity, top, axis=1)
    null = _null(stats, words, selectivity, shuffled, k, seed)
    return LayerSelectivity(layer=layer, selectivity=selectivity, top_units=top, top_dprime=top_dprime,
                            top_p=null.unit_p(top_dprime), null=null,
                            replicability=_replicability(stats, words, splits, k, seed))


def layer_selectivity(X, y, groups, *, layers: Sequence[int] | None = None, k: int = 20, halvings: int = 100,
                      permutations: int = 1000, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> SelectivityReport:
    """Selectivity, its word-shuffled null and split-half replicability at each layer of X [n, n_layers, width].

    X may be a read-only memory map: one layer at a time is copied. `progress(done, total)` is called
    after each layer.
    """
    X = np.asarray(X)
    layers = layer_positions(X, layers)
    _check_counts(k, X.shape[2], permutations, halvings)
    words = words_of(y, groups, len(X))
    shuffled = _shuffled_labels(words, permutations, seed)
    splits = make_splits(words, halvings, seed)
    results = []
    for done, layer in enumerate(layers, start=1):
        with one_blas_thread():
            results.append(_one_layer(check_layer(X[:, layer], f"layer {layer}"), layer, words, shuffled, splits, k,
                                      seed))
        if progress is not None:
            progress(done, len(layers))
    return SelectivityReport(layers=tuple(results), classes=tuple(words.classes.tolist()), k=k,
                             permutations=permutations, halvings=halvings, seed=seed,
                             in_half_a=splits.in_a[:, words.of_stimulus])
