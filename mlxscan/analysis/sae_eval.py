"""How good is an SAE, and are its features more concept-like than the neurons they replace? NumPy only.

Reconstruction (token level, accumulated batch by batch, so an SAE of any width fits in memory):
  FVU     fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
  L0      mean number of active features per token
  dead    features that never fire on the evaluation tokens; dense: those firing on more than a fraction

Concepts (one vector per stimulus, y its category, groups its word):
  localization   per category, the fewest units (SAE features, or the site's neurons) whose one-vs-rest
                 probe reaches a target balanced accuracy, word-grouped out of fold; units are ranked by
                 |d'| on the training folds only. The seed study's "2.4x" is neurons needed / features needed.
  separability   per unit, the Jensen-Shannon distance (base 2, in [0, 1]) between its activation histogram
                 on one category and on the rest, for its best category; against the same score with
                 categories shuffled across words (finite samples alone give a positive distance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from ..errors import MlxscanError
from .probes import make_folds, permute_labels_by_group

__all__ = ["ReconstructionStats", "ReconstructionReport", "LocalizationResult", "SeparabilityResult",
           "fvu", "localization", "units_needed", "js_separability", "DEFAULT_GRID"]

DEFAULT_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
PROBE_C = 1.0


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Fraction of variance unexplained of x [n, d] by x_hat [n, d] (0 perfect, 1 as good as the mean)."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    if x.shape != x_hat.shape or x.ndim != 2:
        raise MlxscanError(f"x and x_hat must both be [n, d]; got {x.shape} and {x_hat.shape}")
    total = np.sum((x - x.mean(0)) ** 2)
    return float(np.sum((x - x_hat) ** 2) / total) if total > 0 else math.nan


@dataclass
class ReconstructionReport:
    n_tokens: int
    fvu: float
    mse: float  # mean over tokens of ||x - x_hat||^2
    l0: float
    frequencies: np.ndarray  # [d_sae] fraction of tokens on which each feature fires
    dense_threshold: float

    @property
    def dead(self) -> int:
        return int(np.sum(self.frequencies == 0))

    @property
    def dense(self) -> int:
        return int(np.sum(self.frequencies > self.dense_threshold))

    def to_dict(self) -> dict:
        live = self.frequencies[self.frequencies > 0]
        return {"n_tokens": self.n_tokens, "fvu": self.fvu, "mse": self.mse, "l0": self.l0,
                "d_sae": int(self.frequencies.size), "dead": self.dead, "dead_fraction": self.dead / self.frequencies.size,
                "dense": self.dense, "dense_threshold": self.dense_threshold,
                "median_live_frequency": float(np.median(live)) if live.size else None}


class ReconstructionStats:
    """Accumulates FVU, L0 and feature frequencies over batches: update(x, x_hat, features), then report()."""

    def __init__(self, d_in: int, d_sae: int, *, dense_threshold: float = 0.1):
        if not 0 < dense_threshold < 1:
            raise MlxscanError(f"the dense threshold is a fraction of tokens in (0, 1); got {dense_threshold}")
        self.dense_threshold = dense_threshold
        self.n = 0
        self.sum_x, self.sum_x2 = np.zeros(d_in), 0.0
        self.error2, self.active = 0.0, 0.0
        self.fired = np.zeros(d_sae, np.int64)

    def update(self, x: np.ndarray, x_hat: np.ndarray, features: np.ndarray) -> None:
        x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
        if x.shape != x_hat.shape or features.shape != (len(x), self.fired.size):
            raise MlxscanError(f"batch shapes do not fit: x {x.shape}, x_hat {x_hat.shape}, features {features.shape}")
        active = features > 0
        self.n += len(x)
        self.sum_x += x.sum(0)
        self.sum_x2 += float(np.sum(x * x))
        self.error2 += float(np.sum((x - x_hat) ** 2))
        self.active += float(active.sum())
        self.fired += active.sum(0)

    def report(self) -> ReconstructionReport:
        if self.n == 0:
            raise MlxscanError("no tokens were evaluated")
        total = self.sum_x2 - float(np.sum(self.sum_x ** 2)) / self.n  # sum ||x - mean||^2
        return ReconstructionReport(n_tokens=self.n, fvu=self.error2 / total if total > 0 else math.nan,
                                    mse=self.error2 / self.n, l0=self.active / self.n,
                                    frequencies=self.fired / self.n, dense_threshold=self.dense_threshold)


# ---------------------------------------------------------------------------------------------
# Localization


def _check_concepts(X, y, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(X, np.float64)
    y, groups = np.asarray(y), np.asarray(groups)
    if X.ndim != 2 or len(y) != len(X) or len(groups) != len(X):
        raise MlxscanError(f"need X [n_stimuli, n_units] with one label and one group each; got {X.shape}, "
                           f"{len(y)} labels, {len(groups)} groups")
    if not np.all(np.isfinite(X)):
        raise MlxscanError("the activations hold NaN or inf")
    return X, y, groups


def _dprime(X: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """[n_units] d' of inside against the rest (0 for a unit constant on both sides)."""
    a, b = X[inside], X[~inside]
    pooled = np.sqrt((a.var(0) + b.var(0)) / 2)
    difference = a.mean(0) - b.mean(0)
    return np.divide(difference, pooled, out=np.zeros_like(difference), where=pooled > 0)


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = train.mean(0), train.std(0)
    sd[sd == 0] = 1.0
    return (train - mean) / sd, (test - mean) / sd


def _balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float((np.mean(predicted[truth]) + np.mean(~predicted[~truth])) / 2)


def units_needed(X, y, groups, fold_of: np.ndarray, grid=DEFAULT_GRID) -> tuple[np.ndarray, np.ndarray]:
    """([n_classes, len(grid)] out-of-fold balanced accuracy of one-vs-rest probes on the top-k units, grid used).

    In each fold the units are ranked by |d'| on the training stimuli only, so no test stimulus picks them.
    """
    X, y, groups = _check_concepts(X, y, groups)
    grid = np.array(sorted({int(k) for k in grid if 1 <= k <= X.shape[1]}))
    classes = np.unique(y)
    accuracy = np.zeros((len(classes), len(grid)))
    with threadpool_limits(limits=1):  # tiny fits: threads cost more than they give
        for row, label in enumerate(classes):
            truth = y == label
            predicted = np.zeros((len(grid), len(y)), bool)
            for fold in np.unique(fold_of):
                train, test = fold_of != fold, fold_of == fold
                order = np.argsort(-np.abs(_dprime(X[train], truth[train])), kind="stable")
                ranked_train, ranked_test = X[train][:, order[:grid[-1]]], X[test][:, order[:grid[-1]]]
                for column, k in enumerate(grid):
                    a, b = _standardize(ranked_train[:, :k], ranked_test[:, :k])
                    probe = LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=1000, tol=1e-4)
                    predicted[column, test] = probe.fit(a, truth[train]).predict(b)
            accuracy[row] = [_balanced_accuracy(truth, predicted[column]) for column in range(len(grid))]
    return accuracy, grid


def _first_reaching(curve: np.ndarray, grid: np.ndarray, target: float) -> int | None:
    reached = np.flatnonzero(curve >= target)
    return int(grid[reached[0]]) if reached.size else None


@dataclass
class LocalizationResult:
    classes: list
    target: float
    grid_neurons: np.ndarray
    grid_features: np.ndarray
    accuracy_neurons: np.ndarray  # [n_classes, len(grid_neurons)]
    accuracy_features: np.ndarray  # [n_classes, len(grid_features)]
    needed_neurons: list  # per class: fewest units reaching the target, None if none in the grid did
    needed_features: list

    @property
    def ratios(self) -> list:
        """Per class: neurons needed / features needed (> 1: the concept is more localized in SAE features)."""
        return [None if a is None or b is None else a / b for a, b in zip(self.needed_neurons, self.needed_features)]

    @property
    def geometric_mean_ratio(self) -> float | None:
        known = [r for r in self.ratios if r is not None]
        return float(np.exp(np.mean(np.log(known)))) if known else None

    def to_dict(self) -> dict:
        return {"target_balanced_accuracy": self.target, "classes": [str(c) for c in self.classes],
                "needed_neurons": self.needed_neurons, "needed_features": self.needed_features,
                "ratios": self.ratios, "geometric_mean_ratio": self.geometric_mean_ratio,
                "grid_neurons": self.grid_neurons.tolist(), "grid_features": self.grid_features.tolist(),
                "best_accuracy_neurons": self.accuracy_neurons.max(1).tolist(),
                "best_accuracy_features": self.accuracy_features.max(1).tolist(),
                "n_both_reached": sum(r is not None for r in self.ratios)}


def localization(neurons, features, y, groups, *, target: float = 0.9, folds: int = 5, seed: int = 0,
                 grid=DEFAULT_GRID) -> LocalizationResult:
    """How many neurons against how many SAE features a one-vs-rest probe needs per category (same folds)."""
    if not 0.5 < target < 1:
        raise MlxscanError(f"the target balanced accuracy must lie in (0.5, 1); got {target}")
    fold_of = make_folds(y, groups, folds=folds, seed=seed)
    acc_n, grid_n = units_needed(neurons, y, groups, fold_of, grid)
    acc_f, grid_f = units_needed(features, y, groups, fold_of, grid)
    return LocalizationResult(
        classes=list(np.unique(y)), target=target, grid_neurons=grid_n, grid_features=grid_f,
        accuracy_neurons=acc_n, accuracy_features=acc_f,
        needed_neurons=[_first_reaching(row, grid_n, target) for row in acc_n],
        needed_features=[_first_reaching(row, grid_f, target) for row in acc_f])


# ---------------------------------------------------------------------------------------------
# Jensen-Shannon separability


def _bin_indices(X: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """([n, n_units] equal-width bin of each value over its unit's own range, [n_units] live: not constant)."""
    low, high = X.min(0), X.max(0)
    live = high > low
    width = np.where(live, high - low, 1.0)
    index = np.floor((X - low) / width * bins).astype(np.int64)
    return np.clip(index, 0, bins - 1), live


def _histograms(index: np.ndarray, mask: np.ndarray, bins: int) -> np.ndarray:
    """[n_units, bins] probability histogram of the rows in mask, for every unit at once."""
    rows = index[mask]
    flat = rows + bins * np.arange(index.shape[1])[None, :]
    counts = np.bincount(flat.ravel(), minlength=bins * index.shape[1]).reshape(index.shape[1], bins)
    return counts / max(len(rows), 1)


def _js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon distance, base 2 (0 identical, 1 disjoint)."""
    m = (p + q) / 2

    def kl(a):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sum(np.where(a > 0, a * np.log2(a / m), 0.0), axis=1)
    return np.sqrt(np.clip((kl(p) + kl(q)) / 2, 0.0, 1.0))


def _best_js(index: np.ndarray, y: np.ndarray, classes: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.stack([_js_distance(_histograms(index, y == c, bins), _histograms(index, y != c, bins))
                       for c in classes])  # [n_classes, n_units]
    return scores.max(0), scores.argmax(0)


@dataclass
class SeparabilityResult:
    scores: np.ndarray  # [n_units] best one-vs-rest JS distance (0 for dead units)
    best_class: np.ndarray  # [n_units] index into classes
    live: np.ndarray  # [n_units] not constant over the stimuli
    null_scores: np.ndarray  # [permutations, n_units] the same with categories shuffled across words
    classes: list
    bins: int
    top_fraction: float = 0.1
    extra: dict = field(default_factory=dict)

    @property
    def null_threshold(self) -> float:
        """95th percentile of live units' scores under the shuffle."""
        return float(np.percentile(self.null_scores[:, self.live], 95)) if self.live.any() else math.nan

    def to_dict(self) -> dict:
        live = self.scores[self.live]
        top = np.sort(live)[::-1][:max(1, int(round(self.top_fraction * live.size)))] if live.size else live
        return {"n_units": int(self.scores.size), "n_live": int(self.live.sum()), "bins": self.bins,
                "mean": float(live.mean()) if live.size else None,
                f"mean_top_{int(100 * self.top_fraction)}pct": float(top.mean()) if top.size else None,
                "null_mean": float(self.null_scores[:, self.live].mean()) if live.size else None,
                "null_threshold_95": self.null_threshold,
                "fraction_above_null": float(np.mean(live > self.null_threshold)) if live.size else None,
                "best_class_counts": {str(c): int(np.sum(self.best_class[self.live] == i))
                                      for i, c in enumerate(self.classes)}}


def js_separability(X, y, groups, *, bins: int = 20, permutations: int = 3, seed: int = 0) -> SeparabilityResult:
    """Each unit's best one-vs-rest Jensen-Shannon distance, and the same with categories shuffled across words."""
    X, y, groups = _check_concepts(X, y, groups)
    if bins < 2 or permutations < 1:
        raise MlxscanError(f"need at least 2 bins and 1 permutation; got {bins} and {permutations}")
    classes = np.unique(y)
    index, live = _bin_indices(X, bins)
    scores, best = _best_js(index, y, classes, bins)
    rng = np.random.default_rng(seed)
    null = np.stack([_best_js(index, permute_labels_by_group(y, groups, rng), classes, bins)[0]
                     for _ in range(permutations)])
    scores[~live], null[:, ~live] = 0.0, 0.0
    return SeparabilityResult(scores=scores, best_class=best, live=live, null_scores=null, classes=list(classes),
                              bins=bins)
