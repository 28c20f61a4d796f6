"""Stimuli grouped by word, and d' computed from per-word sums: the machinery under selectivity.

Every shuffle and split in `selectivity` moves whole words, so one layer is summarised once per word
(sums and sums of squares, [G, U]) and any labelling or split of words costs one [rows, G] @ [G, U]
product instead of a pass over the stimuli. Private to mlxscan.analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import MlxscanError

CHUNK_ROWS = 500  # rows of (labelling x class) d' computed at once: ~3 MB a float32 temporary at width 1536


@dataclass(frozen=True)
class Words:
    """Stimuli grouped by word: each word's class, and each stimulus' word."""

    classes: np.ndarray  # [K] the distinct labels
    label: np.ndarray  # [G] class index of each word
    of_stimulus: np.ndarray  # [n] word index of each stimulus

    def class_masks(self) -> np.ndarray:
        return self.label[None, :] == np.arange(len(self.classes))[:, None]  # [K, G]


def words_of(y, groups, n: int) -> Words:
    y, groups = np.asarray(y), np.asarray(groups)
    if len(y) != n or len(groups) != n:
        raise MlxscanError(f"need one label and one word per stimulus: {n} stimuli, {len(y)} labels, "
                           f"{len(groups)} words")
    classes, y_index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise MlxscanError("selectivity needs at least two categories")
    names, of_stimulus = np.unique(groups, return_inverse=True)
    label = np.full(len(names), -1)
    label[of_stimulus] = y_index
    mixed = np.flatnonzero(label[of_stimulus] != y_index)
    if len(mixed):
        raise MlxscanError(f"word {groups[mixed[0]]!r} has stimuli of two categories; selectivity shuffles and "
                           "splits whole words, so give each word (group) one category")
    counts = np.bincount(label, minlength=len(classes))
    if counts.min() < 2:
        raise MlxscanError(f"category {classes[counts.argmin()]!r} has {counts.min()} word; splitting by word "
                           "needs at least 2 words per category")
    return Words(classes, label, of_stimulus)


def split_words(labels: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """[H, G] True where a word falls in half A: row r splits each class of labels[r] [G] in two, at random."""
    in_a = np.zeros(labels.shape, dtype=bool)
    for row, row_labels in enumerate(labels):
        for c in range(n_classes):
            members = rng.permutation(np.flatnonzero(row_labels == c))
            # With an odd count, which half gets the extra word is itself random.
            size = len(members) // 2 + (int(rng.integers(2)) if len(members) % 2 else 0)
            in_a[row, members[:size]] = True
    return in_a


@dataclass(frozen=True)
class Splits:
    """The halvings, and their control: the same number of halvings of word-shuffled categories."""

    labels: np.ndarray  # [H, G] each halving's word labels (the real ones in every row)
    in_a: np.ndarray  # [H, G]
    shuffled_labels: np.ndarray  # [H, G] labels shuffled across words, a new shuffle per halving
    shuffled_in_a: np.ndarray  # [H, G]


def make_splits(words: Words, halvings: int, seed: int) -> Splits:
    n_classes = len(words.classes)
    labels = np.broadcast_to(words.label, (halvings, len(words.label)))
    shuffle_rng = np.random.default_rng([seed, 5])
    shuffled = np.stack([shuffle_rng.permutation(words.label) for _ in range(halvings)])
    return Splits(labels, split_words(labels, n_classes, np.random.default_rng([seed, 3])),
                   shuffled, split_words(shuffled, n_classes, np.random.default_rng([seed, 6])))


@dataclass(frozen=True)
class WordSums:
    sums: np.ndarray  # [G, U] per-word sums of the (centered) activations
    squares: np.ndarray  # [G, U] per-word sums of their squares
    counts: np.ndarray  # [G] stimuli per word
    varying: np.ndarray  # [U] bool: units whose activation is not the same for every stimulus

    def astype(self, dtype) -> WordSums:
        return WordSums(self.sums.astype(dtype), self.squares.astype(dtype), self.counts.astype(dtype), self.varying)

    def total(self) -> tuple:
        """The universe of every word, for `dprime_rows`."""
        return self.sums.sum(0, keepdims=True), self.squares.sum(0, keepdims=True), self.counts.sum(keepdims=True)


def word_sums(X: np.ndarray, words: Words) -> WordSums:
    """Per-word sufficient statistics of one layer X [n, U] (float64, finite)."""
    varying = X.max(axis=0) > X.min(axis=0)
    X = X - X.mean(axis=0)  # centered, so sums of squares lose no precision to large offsets
    order = np.argsort(words.of_stimulus, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(words.of_stimulus[order]) != 0])
    ordered = X[order]
    return WordSums(np.add.reduceat(ordered, starts, axis=0), np.add.reduceat(ordered * ordered, starts, axis=0),
                     np.bincount(words.of_stimulus).astype(np.float64), varying)


def dprime_rows(inside: np.ndarray, universe: tuple, stats: WordSums) -> np.ndarray:
    """[R, U] d' of the words `inside` [R, G] (0/1) against the rest of their universe.

    universe = (sums [R or 1, U], squares [R or 1, U], counts [R or 1]) of all the words the row
    compares among (every word, or one half's). Computed in the dtype of stats, in place where it can
    be: the null and the halvings run this on thousands of rows per layer, and memory traffic is its cost.
    """
    sums_in, squares_in, n_in = inside @ stats.sums, inside @ stats.squares, inside @ stats.counts
    n_out = universe[2] - n_in
    if n_in.min() < 2 or n_out.min() < 2:
        raise MlxscanError("a category (or a half of one) has fewer than two stimuli inside or outside it; "
                           "selectivity needs more stimuli per category")
    n_in, n_out = n_in[:, None], n_out[:, None]
    sums_out, squares_out = universe[0] - sums_in, universe[1] - squares_in
    squares_in -= sums_in * sums_in / n_in  # (n - 1) * variance, inside
    squares_out -= sums_out * sums_out / n_out
    squares_in *= 0.5 / (n_in - 1)
    squares_out *= 0.5 / (n_out - 1)
    pooled = np.maximum(squares_in + squares_out, 0, out=squares_in)  # (var_in + var_out) / 2; rounding can dip below 0
    np.sqrt(pooled, out=pooled)
    pooled[pooled == 0] = np.inf  # a unit constant on both sides prefers nothing: d' 0, not NaN
    sums_in /= n_in
    sums_out /= n_out
    sums_in -= sums_out  # mean inside - mean outside
    d = np.divide(sums_in, pooled, out=sums_in)
    d[:, ~stats.varying] = 0.0  # a constant unit's rounding residue is not a preference
    return d


def top_set_mask(d: np.ndarray, k: int) -> np.ndarray:
    """[R, U] bool: each row's k largest entries (a set: order and tie-breaking among equals do not matter)."""
    mask = np.zeros(d.shape, dtype=bool)
    np.put_along_axis(mask, np.argpartition(-d, k - 1, axis=1)[:, :k], True, axis=1)
    return mask


def mean_of_top(d: np.ndarray, k: int) -> np.ndarray:
    return np.partition(d, d.shape[1] - k, axis=1)[:, d.shape[1] - k:].mean(axis=1)


def one_blas_thread():
    """One BLAS thread for the many small products here ([500, G] @ [G, U]).

    Measured on 2 busy cores: 0.3 s per 1000 rows of d' with the default threads, 0.02 s with one.
    """
    return threadpool_limits(limits=1)


def layer_positions(X: np.ndarray, layers) -> tuple[int, ...]:
    """Positions along axis 1 of X [n_stimuli, n_layers, width] to analyse (all when layers is None)."""
    if X.ndim != 3:
        raise MlxscanError(f"X must be [n_stimuli, n_layers, width], got shape {X.shape}")
    layers = tuple(range(X.shape[1])) if layers is None else tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < X.shape[1] for layer in layers):
        raise MlxscanError(f"layers must be positions in 0..{X.shape[1] - 1} of X's axis 1; got {list(layers)}")
    return layers


def check_layer(X, name: str = "X") -> np.ndarray:
    X = np.array(X, dtype=np.float64)  # a copy: memory-mapped scans stay read-only and only this layer is read
    if X.ndim != 2:
        raise MlxscanError(f"{name} must be [n_stimuli, width], got shape {X.shape}")
    if not np.isfinite(X).all():
        raise MlxscanError(f"{name} holds NaN or infinite activations; selectivity cannot use it")
    return X
