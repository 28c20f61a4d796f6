"""The seed study's depth questions about one layer: is the concept one direction (rank), does a shared
probe keep what dedicated ones get (retention), and does a nonlinear probe add anything (MLP gap)?

Each takes X [n_stimuli, width] (one layer), y and groups as `probes.probe_layers` does, and answers on
the same word-grouped folds (`probes.make_folds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from joblib import Parallel
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .probes import (_check_activations, _check_labels, _features, _interval, _multinomial_out_of_fold,
                     _out_of_fold, _resample_weights, _single_threaded_blas, _summary, _weighted_accuracy,
                     _weighted_ovr_auc, linear_probe, make_folds)

__all__ = ["RankResult", "RetentionResult", "GapResult", "concept_rank", "retention", "mlp_gap"]

MLP_MAX_ITER = 500


@dataclass(frozen=True)
class RankResult:
    """Is the concept rank-1? Per class: one direction's AUC against the full probe's (both out-of-fold)."""

    classes: tuple
    single_direction_auc: tuple[float, ...]  # class-mean-difference direction, one-vs-rest
    probe_auc: tuple[float, ...]  # the multinomial probe's one-vs-rest AUC for that class
    ratio: tuple[float, ...]  # single / probe: about 1 when one direction carries the class
    mean_ratio: float
    folds: int
    seed: int

    def to_dict(self) -> dict:
        return _summary(self)


@dataclass(frozen=True)
class RetentionResult:
    """How much of a dedicated binary probe's performance the shared multinomial probe keeps, per class."""

    classes: tuple
    shared_balanced_accuracy: tuple[float, ...]  # multinomial probe, "is it c" = argmax is c
    dedicated_balanced_accuracy: tuple[float, ...]  # one balanced binary probe per class
    retention: tuple[float, ...]  # shared / dedicated
    mean_retention: float
    folds: int
    seed: int

    def to_dict(self) -> dict:
        return _summary(self)


@dataclass(frozen=True)
class GapResult:
    """Accuracy a one-hidden-layer MLP adds over the linear probe on the same folds."""

    mlp_accuracy: float
    linear_accuracy: float
    gap: float  # mlp - linear
    gap_ci: tuple[float, float]  # 95% paired cluster bootstrap over words
    hidden: int
    folds: int
    seed: int

    def to_dict(self) -> dict:
        return _summary(self)



def _one_layer(X, y, groups, folds, seed):
    X = _check_activations(X, ndim=2)
    classes, y_index, groups = _check_labels(y, groups, len(X), folds)
    features = _features(X, "X")
    return features, classes, y_index, groups, make_folds(y_index, groups, folds=folds, seed=seed)


def _mean_difference_scores(X, y_index, fold_of, n_classes) -> np.ndarray:
    """[n, n_classes] out-of-fold projections on each class's mean-difference direction (standardized features).

    Each score is measured from the midpoint of the two training means along the unit direction, so
    scores from different folds share a scale and a threshold and can be pooled for one AUC.
    """
    scores = np.empty((len(y_index), n_classes))
    for fold in range(int(fold_of.max()) + 1):
        train, test = fold_of != fold, fold_of == fold
        scaler = StandardScaler().fit(X[train])
        train_z, test_z, train_y = scaler.transform(X[train]), scaler.transform(X[test]), y_index[train]
        sums = np.stack([train_z[train_y == c].sum(axis=0) for c in range(n_classes)])  # [K, width]
        counts = np.bincount(train_y, minlength=n_classes)[:, None]
        inside = sums / np.maximum(counts, 1)
        outside = (sums.sum(axis=0) - sums) / np.maximum(len(train_y) - counts, 1)
        directions = inside - outside
        directions /= np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
        midpoints = (inside + outside) / 2
        scores[test] = test_z @ directions.T - np.sum(midpoints * directions, axis=1)  # [n_test, K]
    return scores


def concept_rank(X, y, groups, *, folds: int = 5, seed: int = 0, C: float = 1.0) -> RankResult:
    """Is each class carried by one direction? One-vs-rest AUC of its class-mean-difference direction
    against the multinomial probe's, both out-of-fold on the same word-grouped folds; X is [n, width].

    The direction ignores the noise covariance, so a ratio below 1 can also mean the class is one
    direction that anisotropic noise hides from a mean difference, not only a multi-direction code.
    """
    features, classes, y_index, groups, fold_of = _one_layer(X, y, groups, folds, seed)
    probabilities = _multinomial_out_of_fold(features, y_index[None], fold_of[None], len(classes), C)[0]
    ones = np.ones((1, len(y_index)))
    single = _weighted_ovr_auc(y_index, _mean_difference_scores(features, y_index, fold_of, len(classes)), ones)[0]
    full = _weighted_ovr_auc(y_index, probabilities, ones)[0]
    ratio = single / full
    return RankResult(classes=tuple(classes.tolist()), single_direction_auc=tuple(single.tolist()),
                      probe_auc=tuple(full.tolist()), ratio=tuple(ratio.tolist()), mean_ratio=float(ratio.mean()),
                      folds=folds, seed=seed)


def _balanced_accuracy(is_class, predicted_class) -> float:
    return float((predicted_class[is_class].mean() + (~predicted_class[~is_class]).mean()) / 2)


def retention(X, y, groups, *, folds: int = 5, seed: int = 0, n_jobs: int = 2, C: float = 1.0) -> RetentionResult:
    """Per class: balanced accuracy of the shared multinomial probe ("c" iff argmax is c) against a
    dedicated class-balanced binary probe for c, on the same word-grouped folds; X is [n, width]."""
    features, classes, y_index, groups, fold_of = _one_layer(X, y, groups, folds, seed)
    n_classes = len(classes)
    binary_labels = (y_index[None, :] == np.arange(n_classes)[:, None]).astype(np.int64)  # [K, n]
    shared = _multinomial_out_of_fold(features, y_index[None], fold_of[None], n_classes, C)[0]
    with _single_threaded_blas(), Parallel(n_jobs=n_jobs) as parallel:
        dedicated = _out_of_fold(linear_probe(C, class_weight="balanced"), features, binary_labels,
                                 np.broadcast_to(fold_of, binary_labels.shape), 2,
                                 parallel)  # [K, n, 2]
    predicted = shared.argmax(axis=1)
    shared_score = np.array([_balanced_accuracy(y_index == c, predicted == c) for c in range(n_classes)])
    dedicated_score = np.array([_balanced_accuracy(y_index == c, dedicated[c].argmax(axis=1) == 1)
                                for c in range(n_classes)])
    kept = shared_score / dedicated_score
    return RetentionResult(classes=tuple(classes.tolist()), shared_balanced_accuracy=tuple(shared_score.tolist()),
                           dedicated_balanced_accuracy=tuple(dedicated_score.tolist()), retention=tuple(kept.tolist()),
                           mean_retention=float(kept.mean()), folds=folds, seed=seed)


def mlp_gap(X, y, groups, *, folds: int = 5, seed: int = 0, hidden: int = 256, n_jobs: int = 2,
            C: float = 1.0) -> GapResult:
    """Accuracy of a one-hidden-layer MLP probe minus the linear probe's, same folds; X is [n, width].

    The CI resamples words and recomputes both accuracies on the same resample, so it reflects the
    difference, not two separate uncertainties.
    """
    features, classes, y_index, groups, fold_of = _one_layer(X, y, groups, folds, seed)
    mlp = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(hidden,), early_stopping=False,
                                                        max_iter=MLP_MAX_ITER, random_state=seed))
    with _single_threaded_blas(), Parallel(n_jobs=n_jobs) as parallel:
        nonlinear = _out_of_fold(mlp, features, y_index[None], fold_of[None], len(classes), parallel)[0]
    linear = _multinomial_out_of_fold(features, y_index[None], fold_of[None], len(classes), C)[0]
    mlp_correct = (nonlinear.argmax(axis=1) == y_index).astype(np.float64)
    linear_correct = (linear.argmax(axis=1) == y_index).astype(np.float64)
    weights = _resample_weights(groups, seed)
    differences = _weighted_accuracy(mlp_correct, weights) - _weighted_accuracy(linear_correct, weights)
    return GapResult(mlp_accuracy=float(mlp_correct.mean()), linear_accuracy=float(linear_correct.mean()),
                     gap=float(mlp_correct.mean() - linear_correct.mean()), gap_ci=_interval(differences),
                     hidden=hidden, folds=folds, seed=seed)
