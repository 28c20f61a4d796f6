"""Concept directions: one vector per category and layer, the objects the causal experiments act on.

Two estimates, both in the site's raw coordinates (so they can be added to or projected out of the
residual directly): the class-mean difference (mean of the category minus mean of the rest) and the
one-vs-rest logistic-probe weight (fitted on standardized features, mapped back to raw units).

They answer different questions (Haufe et al. 2014): the mean difference is a pattern, where the
category moves the activations, and what steering adds; the probe weight is a filter, what to read
to tell the category apart, which also turns away from directions where the noise is large.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import MlxscanError
from ._by_word import layer_positions, make_splits, one_blas_thread, word_sums, words_of

__all__ = ["class_mean_directions", "probe_directions", "concept_directions", "ConceptDirections"]

PROBE_MAX_ITER = 1000
RELIABILITY_HALVINGS = 20


def _check(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if X.ndim != 2:
        raise MlxscanError(f"activations must be [n_stimuli, width], got shape {X.shape}")
    if len(y) != len(X):
        raise MlxscanError(f"{len(y)} labels for {len(X)} stimuli")
    classes = np.unique(y)
    if len(classes) < 2:
        raise MlxscanError("directions need at least two categories")
    return X, y, classes


def class_mean_directions(X, y, *, normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """[n_classes, width] mean(class) - mean(rest) per class (unit length unless normalize=False), and the classes."""
    X, y, classes = _check(X, y)
    directions = np.stack([X[y == c].mean(0) - X[y != c].mean(0) for c in classes])
    if normalize:
        norms = np.linalg.norm(directions, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise MlxscanError("a category's mean equals the rest's mean: its direction is undefined")
        directions = directions / norms
    return directions.astype(np.float32), classes


def probe_directions(X, y, *, C: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """[n_classes, width] unit-length one-vs-rest logistic-probe weights in raw coordinates, and the classes.

    Each class gets a class-balanced binary probe on standardized features; its weights w act on
    (x - mean) / std, so w / std is the same decision function in raw coordinates. Constant units
    get weight 0.
    """
    from sklearn.linear_model import LogisticRegression  # scikit-learn only where a probe is fitted

    X, y, classes = _check(X, y)
    if not C > 0:
        raise MlxscanError(f"C must be positive, got {C}")
    std = X.std(axis=0)
    varying = std > 0
    if not varying.any():
        raise MlxscanError("every unit is constant: no probe direction exists")
    Z = (X[:, varying] - X[:, varying].mean(axis=0)) / std[varying]
    directions = np.zeros((len(classes), X.shape[1]))
    # One BLAS thread: on 2 busy cores a fit on [1200, 576] took 1.9 s with the default threads, 0.12 s with one.
    with one_blas_thread():
        for row, c in enumerate(classes):
            fit = LogisticRegression(C=C, class_weight="balanced", max_iter=PROBE_MAX_ITER).fit(Z, y == c)
            directions[row, varying] = fit.coef_[0] / std[varying]
    norms = np.linalg.norm(directions, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise MlxscanError("a probe found no weight for some category: its direction is undefined")
    return (directions / norms).astype(np.float32), classes


@dataclass(frozen=True, eq=False)  # eq=False: the arrays have no single truth value
class ConceptDirections:
    """Both kinds of direction at every layer, with how far each can be trusted."""

    classes: tuple
    layers: tuple[int, ...]  # positions along X's axis 1
    mean: np.ndarray  # [L, K, width] float32 unit class-mean differences
    probe: np.ndarray  # [L, K, width] float32 unit probe weights (raw coordinates)
    C: float
    reliability: np.ndarray  # [L, H, K] cosine of the mean direction found on two word-disjoint halves
    reliability_shuffled: np.ndarray  # [L, H, K] the same with labels shuffled across words: the control

    def agreement(self) -> np.ndarray:
        """[L, K] cosine between the mean-difference and the probe direction."""
        return np.einsum("lkw,lkw->lk", self.mean.astype(np.float64), self.probe.astype(np.float64))

    def to_dict(self) -> dict:
        return {
            "classes": [c.item() if isinstance(c, np.generic) else c for c in self.classes], "C": self.C,
            "halvings": int(self.reliability.shape[1]),
            "layers": [{"layer": layer, "mean_probe_cosine": agreement.tolist(),
                        "split_half_cosine": reliable.mean(axis=0).tolist(),
                        "split_half_cosine_shuffled": shuffled.mean(axis=0).tolist()}
                       for layer, agreement, reliable, shuffled in
                       zip(self.layers, self.agreement(), self.reliability, self.reliability_shuffled)],
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {"layer_positions": np.asarray(self.layers), "classes": np.asarray(self.classes),
                "agreement": self.agreement(), "reliability": self.reliability,
                "reliability_shuffled": self.reliability_shuffled}


def _half_cosines(stats, labels: np.ndarray, n_classes: int, in_a: np.ndarray) -> np.ndarray:
    """[H, K] cosine between each class's mean-difference direction in half A and in half B.

    Row r's classes are labels[r] [G] and its halves in_a[r] [G] (words); stats hold per-word sums.
    """
    masks = (labels[:, None, :] == np.arange(n_classes)[None, :, None]).astype(np.float64)  # [H, K, G]
    halves = []
    for side in (in_a, ~in_a):  # [H, G]
        weights = side.astype(np.float64)
        inside = weights[:, None, :] * masks  # [H, K, G]
        sums_in, n_in = inside @ stats.sums, inside @ stats.counts  # [H, K, W], [H, K]
        sums_all, n_all = weights @ stats.sums, weights @ stats.counts  # [H, W], [H]
        difference = sums_in / n_in[..., None] - (sums_all[:, None] - sums_in) / (n_all[:, None] - n_in)[..., None]
        halves.append(difference / np.maximum(np.linalg.norm(difference, axis=2, keepdims=True), 1e-300))
    return np.einsum("hkw,hkw->hk", *halves)


def concept_directions(X, y, groups=None, *, layers: Sequence[int] | None = None, C: float = 1.0,
                       halvings: int = RELIABILITY_HALVINGS, seed: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> ConceptDirections:
    """Mean-difference and probe directions of every class at each layer of X [n, n_layers, width].

    With groups (the word of each stimulus), each layer also gets its control: the cosine between
    mean directions found on two word-disjoint halves of every category, against the same with
    labels shuffled across words (about 0 when there is no category direction). Without groups the
    reliability arrays are empty.
    """

    X = np.asarray(X)
    layers = layer_positions(X, layers)
    words = words_of(y, groups, len(X)) if groups is not None else None
    splits = make_splits(words, halvings, seed) if words is not None else None
    means, probes, reliable, shuffled = [], [], [], []
    for done, layer in enumerate(layers, start=1):
        features = np.array(X[:, layer], dtype=np.float64)
        if not np.isfinite(features).all():
            raise MlxscanError(f"layer {layer} holds NaN or infinite activations; no direction can be fitted")
        mean, classes = class_mean_directions(features, y)
        means.append(mean)
        probes.append(probe_directions(features, y, C=C)[0])
        if words is not None:
            stats = word_sums(features, words)
            n_classes = len(words.classes)
            reliable.append(_half_cosines(stats, splits.labels, n_classes, splits.in_a))
            shuffled.append(_half_cosines(stats, splits.shuffled_labels, n_classes, splits.shuffled_in_a))
        if progress is not None:
            progress(done, len(layers))
    empty = np.zeros((len(layers), 0, len(classes)))
    return ConceptDirections(classes=tuple(classes.tolist()), layers=layers, mean=np.stack(means),
                             probe=np.stack(probes), C=C,
                             reliability=np.stack(reliable) if reliable else empty,
                             reliability_shuffled=np.stack(shuffled) if shuffled else empty)
