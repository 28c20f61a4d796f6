"""Unit selectivity: how strongly each unit (a neuron, or a residual dimension) prefers one category.

The statistic is d' (Cohen's d): the difference of the category's mean and the rest's, over the
pooled standard deviation. A unit's d' for its category is the neuroscientist's "selectivity index";
a unit's preference is d' > 0 (a unit suppressed by a category prefers the rest).

Two questions about the most selective units, both asked with words, not stimuli, as the unit of
chance (every frame of a word shares the word's idiosyncrasies, so stimuli are not independent):
  * Null: is the best unit more selective than the best unit would be if the categories were random
    sets of words? Labels are shuffled across words (as in the probe's null) and the largest d' over
    units is recorded per class; a unit's p-value against that maximum is corrected for the number of
    units (single-step maxT, Westfall & Young 1993).
  * Replicability: split every category's words in two, find each class's top-k units in each half,
    and count how many are shared, against the overlap two random k-sets of units would have.

Inputs are plain NumPy arrays: X [n_stimuli, width], y [n_stimuli] labels, groups [n_stimuli] the
word of each stimulus. `selectivity_report.layer_selectivity` runs all of it layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import hypergeom

from ..errors import MlxscanError
from ._by_word import (CHUNK_ROWS, Splits, Words, WordSums, check_layer, dprime_rows, make_splits, mean_of_top,
                       one_blas_thread, top_set_mask, word_sums, words_of)

__all__ = [
    "unit_selectivity", "top_units", "word_halves", "selectivity_null", "split_half_replicability",
    "SelectivityNull", "Replicability",
]

def unit_selectivity(X, y) -> tuple[np.ndarray, np.ndarray]:
    """[n_classes, n_units] d' of every unit for every class (one vs rest), and the classes.

    A constant unit has d' 0, not NaN: it prefers nothing.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or len(y) != len(X):
        raise MlxscanError(f"need activations [n_stimuli, n_units] and one label each; got {X.shape} and {len(y)}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise MlxscanError("selectivity needs at least two categories")
    d = np.zeros((len(classes), X.shape[1]))
    for row, c in enumerate(classes):
        inside, outside = X[y == c], X[y != c]
        if len(inside) < 2 or len(outside) < 2:
            raise MlxscanError(f"category {c!r} needs at least two stimuli inside and outside it")
        pooled = np.sqrt((inside.var(0, ddof=1) + outside.var(0, ddof=1)) / 2)
        difference = inside.mean(0) - outside.mean(0)
        d[row] = np.divide(difference, pooled, out=np.zeros_like(difference), where=pooled > 0)
    return d, classes


def top_units(selectivity: np.ndarray, k: int) -> np.ndarray:
    """[n_classes, k] indices of each class's k most selective units (largest d', most selective first)."""
    selectivity = np.asarray(selectivity)
    if not 1 <= k <= selectivity.shape[-1]:
        raise MlxscanError(f"k must lie in 1..{selectivity.shape[-1]}, got {k}")
    return np.argsort(-selectivity, axis=-1, kind="stable")[..., :k]


def word_halves(y, groups, halvings: int = 100, seed: int = 0) -> np.ndarray:
    """[halvings, n] True where a stimulus falls in half A of that halving.

    Each category's words are split in two (sizes differ by at most one), so both halves hold every
    category and all the frames of a word land on the same side.
    """
    words = words_of(y, groups, len(np.asarray(y)))
    return make_splits(words, halvings, seed).in_a[:, words.of_stimulus]


def _upper_p(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """(1 + #null >= observed) / (1 + permutations) along null's first axis; never below 1 / (P + 1)."""
    return (1 + (null >= observed).sum(axis=0)) / (1 + len(null))


# ---------------------------------------------------------------------------------------------
# The null: the best unit under word-shuffled labels


@dataclass(frozen=True, eq=False)  # eq=False: the arrays have no single truth value
class SelectivityNull:
    """Per class: the observed best and top-k mean d' against their values under word-shuffled labels."""

    classes: tuple
    k: int
    permutations: int
    seed: int
    best: np.ndarray  # [K] largest d' over units
    top_mean: np.ndarray  # [K] mean of the k largest d'
    null_best: np.ndarray  # [P, K] largest d' under each shuffle
    null_top_mean: np.ndarray  # [P, K]

    @property
    def p_best(self) -> np.ndarray:
        """[K] is the best unit more selective than the best unit of random word sets? (corrected for units)"""
        return _upper_p(self.best, self.null_best)

    @property
    def p_top_mean(self) -> np.ndarray:
        """[K] are the k best units, on average, more selective than those of random word sets?"""
        return _upper_p(self.top_mean, self.null_top_mean)

    @property
    def p_layer(self) -> float:
        """Is the most selective unit of any class beyond the null's best over classes and units?"""
        return float(_upper_p(self.best.max(), self.null_best.max(axis=1)))

    def unit_p(self, dprime: np.ndarray) -> np.ndarray:
        """[K, m] maxT-adjusted p of d' values [K, m] of class k's units: valid for each unit, whichever it is."""
        reached = self.null_best.T[:, :, None] >= np.asarray(dprime)[:, None, :]  # [K, P, m]
        return (1 + reached.sum(axis=1)) / (1 + self.permutations)

    def to_dict(self) -> dict:
        return {"k": self.k, "permutations": self.permutations, "seed": self.seed,
                "best": self.best.tolist(), "p_best": self.p_best.tolist(),
                "top_mean": self.top_mean.tolist(), "p_top_mean": self.p_top_mean.tolist(),
                "null_best_mean": self.null_best.mean(axis=0).tolist(),
                "null_best_95": np.percentile(self.null_best, 95, axis=0).tolist(), "p_layer": self.p_layer}


def _shuffled_labels(words: Words, permutations: int, seed: int) -> np.ndarray:
    """[P, G] word labels shuffled across words (the probe's null uses the same stream, seed [seed, 1])."""
    rng = np.random.default_rng([seed, 1])
    return np.stack([rng.permutation(words.label) for _ in range(permutations)]).reshape(permutations, -1)


def _null(stats: WordSums, words: Words, selectivity: np.ndarray, shuffled: np.ndarray, k: int,
          seed: int) -> SelectivityNull:
    n_classes = len(words.classes)
    stats = stats.astype(np.float32)  # ranks and maxima need no more, and float32 halves the memory traffic
    everything = stats.total()
    best, top_mean = np.empty((len(shuffled), n_classes)), np.empty((len(shuffled), n_classes))
    step = max(1, CHUNK_ROWS // n_classes)
    for start in range(0, len(shuffled), step):
        labels = shuffled[start:start + step]
        inside = (labels[:, None, :] == np.arange(n_classes)[None, :, None]).reshape(-1, labels.shape[1])
        d = dprime_rows(inside.astype(np.float32), everything, stats)  # [chunk * K, U]
        best[start:start + step] = d.max(axis=1).reshape(-1, n_classes)
        top_mean[start:start + step] = mean_of_top(d, k).reshape(-1, n_classes)
    return SelectivityNull(classes=tuple(words.classes.tolist()), k=k, permutations=len(shuffled), seed=seed,
                           best=selectivity.max(axis=1), top_mean=mean_of_top(selectivity, k),
                           null_best=best, null_top_mean=top_mean)


def _observed(stats: WordSums, words: Words) -> np.ndarray:
    """[K, U] d' of every class, from the word sums (equal to unit_selectivity up to rounding)."""
    return dprime_rows(words.class_masks().astype(np.float64), stats.total(), stats)


def _check_counts(k: int, width: int, permutations: int, halvings: int) -> None:
    if not 1 <= k <= width:
        raise MlxscanError(f"k must lie in 1..{width} (the width), got {k}")
    if permutations < 1 or halvings < 1:
        raise MlxscanError(f"permutations and halvings must be at least 1, got {permutations} and {halvings}")


def selectivity_null(X, y, groups, *, k: int = 20, permutations: int = 1000, seed: int = 0) -> SelectivityNull:
    """The best (and top-k mean) d' of each class in X [n, width] against labels shuffled across words."""
    X = check_layer(X)
    _check_counts(k, X.shape[1], permutations, 1)
    words = words_of(y, groups, len(X))
    with one_blas_thread():
        stats = word_sums(X, words)
        return _null(stats, words, _observed(stats, words), _shuffled_labels(words, permutations, seed), k, seed)


# ---------------------------------------------------------------------------------------------
# Split-half replicability


@dataclass(frozen=True, eq=False)
class Replicability:
    """Overlap of each class's top-k units found on two word-disjoint halves, over random halvings.

    Chance is the overlap of two random k-sets of the units that vary: |A∩B| is hypergeometric
    (n_units, k, k), so the expected overlap fraction is exactly k / n_units. The word-shuffled
    control repeats the halvings with categories that are random sets of words: what word structure
    and unequal units alone give, without any category (close to chance when they give nothing).
    """

    classes: tuple
    k: int
    n_units: int  # units that vary: the pool random k-sets are drawn from
    halvings: int
    seed: int
    overlaps: np.ndarray  # [halvings, K] |A∩B| / k
    shuffled_overlaps: np.ndarray  # [halvings, K] the same, categories shuffled across words

    @property
    def chance(self) -> float:
        return self.k / self.n_units

    @property
    def chance_q95(self) -> float:
        """95th percentile of the overlap fraction of two random k-sets."""
        return float(hypergeom.ppf(0.95, self.n_units, self.k, self.k)) / self.k

    @property
    def mean(self) -> float:
        return float(self.overlaps.mean())

    @property
    def mean_ci(self) -> tuple[float, float]:
        """95% interval over halvings of the class-averaged overlap (how much the split itself moves it)."""
        low, high = np.percentile(self.overlaps.mean(axis=1), [2.5, 97.5])
        return float(low), float(high)

    @property
    def fraction_above_chance(self) -> float:
        """Fraction of (halving, class) overlaps above chance's 95th percentile (about 0.05 or less by chance)."""
        return float((self.overlaps > self.chance_q95).mean())

    def to_dict(self) -> dict:
        class_ci = np.percentile(self.overlaps, [2.5, 97.5], axis=0).T  # [K, 2]
        shuffled_ci = np.percentile(self.shuffled_overlaps.mean(axis=1), [2.5, 97.5])
        return {"k": self.k, "n_units": self.n_units, "halvings": self.halvings, "seed": self.seed,
                "mean": self.mean, "ci": list(self.mean_ci), "chance": self.chance, "chance_q95": self.chance_q95,
                "shuffled_mean": float(self.shuffled_overlaps.mean()), "shuffled_ci": shuffled_ci.tolist(),
                "fraction_above_chance": self.fraction_above_chance,
                "class_mean": self.overlaps.mean(axis=0).tolist(), "class_ci": class_ci.tolist(),
                "class_fraction_above_chance": (self.overlaps > self.chance_q95).mean(axis=0).tolist()}


def _overlaps(stats: WordSums, labels: np.ndarray, n_classes: int, in_a: np.ndarray, k: int) -> np.ndarray:
    """[H, K] top-k overlap between the halves in_a [H, G] and ~in_a, row r's classes given by labels[r]."""
    stats = stats.astype(np.float32)  # a top-k set needs ranks only
    out = np.empty((len(in_a), n_classes))
    step = max(1, CHUNK_ROWS // n_classes)
    for start in range(0, len(in_a), step):
        masks = labels[start:start + step, None, :] == np.arange(n_classes)[None, :, None]  # [h, K, G]
        tops = []
        for side in (in_a[start:start + step], ~in_a[start:start + step]):  # [h, G]
            inside = (side[:, None, :] & masks).reshape(-1, side.shape[1]).astype(np.float32)
            weights = side.astype(np.float32)
            universe = tuple(np.repeat(part, n_classes, axis=0) for part in
                             (weights @ stats.sums, weights @ stats.squares, weights @ stats.counts))
            tops.append(top_set_mask(dprime_rows(inside, universe, stats), k))
        out[start:start + step] = ((tops[0] & tops[1]).sum(axis=1) / k).reshape(-1, n_classes)
    return out


def _replicability(stats: WordSums, words: Words, splits: Splits, k: int, seed: int) -> Replicability:
    n_units = int(stats.varying.sum())
    if n_units < k:
        raise MlxscanError(f"only {n_units} units vary here, fewer than k = {k}; use a smaller k")
    n_classes = len(words.classes)
    return Replicability(
        classes=tuple(words.classes.tolist()), k=k, n_units=n_units, halvings=len(splits.in_a), seed=seed,
        overlaps=_overlaps(stats, splits.labels, n_classes, splits.in_a, k),
        shuffled_overlaps=_overlaps(stats, splits.shuffled_labels, n_classes, splits.shuffled_in_a, k))


def split_half_replicability(X, y, groups, k: int = 20, halvings: int = 100, seed: int = 0) -> Replicability:
    """Do each class's top-k units in X [n, width] replicate across two halves of its words?

    Each halving splits every category's words in two (`word_halves`), ranks units by d' within each
    half (one vs the rest of that half) and records |A∩B| / k per class; the control does the same
    with categories shuffled across words.
    """
    X = check_layer(X)
    _check_counts(k, X.shape[1], 1, halvings)
    words = words_of(y, groups, len(X))
    with one_blas_thread():
        return _replicability(word_sums(X, words), words, make_splits(words, halvings, seed), k, seed)
