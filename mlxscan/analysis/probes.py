"""Linear probes: at which layers is the category linearly decodable, and how?

Everything here takes plain NumPy arrays (a scan's memory maps work as they are):
  X       [n_stimuli, n_layers, width] for `probe_layers`, [n_stimuli, width] for the one-layer questions
  y       [n_stimuli] class labels (the category of each stimulus)
  groups  [n_stimuli] the word of each stimulus. Every split keeps a word's stimuli on one side, so a
          probe cannot score by recognising words it has seen instead of the category.

Layer indices are positions along X's axis 1; a scan's `layers` maps them to model layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from joblib import Parallel, delayed
from scipy.stats import norm
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..errors import MlxscanError
from .logistic import out_of_fold_probabilities
from ._json import jsonable as _jsonable

__all__ = [
    "LayerProbe", "ProbeReport", "RankResult", "RetentionResult", "GapResult",
    "probe_layers", "decodable_span", "holm_reject", "concept_rank", "retention", "mlp_gap",
    "linear_probe", "make_folds", "permute_labels_by_group",
]

BOOTSTRAP_RESAMPLES = 1000
P_FLOOR = 1e-16  # p_gaussian's floor: below it the normal tail says nothing the data could support
PROBE_MAX_ITER = 1000  # a safety net: the batched solver stops after ~30-80 steps on scans
# Largest gradient entry at which a probe counts as fitted. On the category scan, real-label accuracy
# at 1e-5 was within 1 stimulus of scikit-learn's at tol=1e-7 (the optimum) at 27 of 30 layers (4 at
# most) and 29 of 30 on the twin (2); scikit-learn at tol=1e-3 was up to 7 and 16 stimuli away.
PROBE_TOL = 1e-5
MLP_MAX_ITER = 500


# ---------------------------------------------------------------------------------------------
# Results




def _summary(result) -> dict:
    return {key: _jsonable(value) for key, value in asdict(result).items()}


@dataclass(frozen=True)
class LayerProbe:
    """One layer's probe. CIs are 95% cluster-bootstrap intervals over words; p-values test accuracy."""

    layer: int  # position along X's axis 1
    accuracy: float
    accuracy_ci: tuple[float, float]
    auc: float  # macro one-vs-rest ROC AUC of the out-of-fold probabilities
    auc_ci: tuple[float, float]
    p_empirical: float  # (1 + #null >= observed) / (1 + permutations): never below 1 / (permutations + 1)
    p_gaussian: float  # upper tail of a normal fitted to the null accuracies, floored at P_FLOOR
    null_mean: float
    null_sd: float

    def to_dict(self) -> dict:
        return _summary(self)


@dataclass(frozen=True, eq=False)  # eq=False: the arrays have no single truth value
class ProbeReport:
    """`probe_layers`' answer: one LayerProbe per probed layer, and the arrays the numbers came from."""

    layers: tuple[LayerProbe, ...]
    classes: tuple  # the label of each probability column
    chance: float  # 1 / n_classes
    majority_rate: float  # accuracy of always guessing the commonest class
    n_classes: int
    folds: int
    permutations: int
    seed: int
    C: float
    oof_probabilities: np.ndarray  # [n_layers_probed, n, n_classes] out-of-fold probabilities
    null_accuracies: np.ndarray  # [n_layers_probed, permutations] accuracies under group-permuted labels
    fold_of: np.ndarray  # [n] the test fold of each stimulus (real labels; shuffles get their own, see probe_layers)

    def decodable_span(self, alpha: float = 0.05) -> float:
        """Fraction of probed layers significant after Holm correction, using p_gaussian.

        p_gaussian, not p_empirical: with P permutations p_empirical cannot go below 1/(P+1), so with
        few permutations no layer could survive a correction for 30 layers however strong its signal.
        """
        return decodable_span([layer.p_gaussian for layer in self.layers], alpha=alpha)

    def to_dict(self) -> dict:
        """JSON-able summary, without the big arrays (see `arrays`)."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "classes": _jsonable(self.classes),
            "chance": self.chance, "majority_rate": self.majority_rate, "n_classes": self.n_classes,
            "folds": self.folds, "permutations": self.permutations, "seed": self.seed, "C": self.C,
            "decodable_span": {"fraction": self.decodable_span(0.05) if self.permutations >= 2 else None,
                               "alpha": 0.05, "correction": "holm", "p_value": "p_gaussian"},
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays behind the numbers, named for np.savez."""
        return {
            "layer_positions": np.array([layer.layer for layer in self.layers]),  # along the scan's layer axis
            "classes": np.asarray(self.classes),
            "oof_probabilities": self.oof_probabilities,
            "null_accuracies": self.null_accuracies,
            "fold_of": self.fold_of,
        }


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


# ---------------------------------------------------------------------------------------------
# Validation, folds, permutations


def _check_activations(X, ndim: int) -> np.ndarray:
    """X as an array without copying it (memory maps stay memory maps)."""
    X = X if isinstance(X, np.ndarray) else np.asarray(X)
    if X.ndim != ndim:
        shape = "[n_stimuli, n_layers, width]" if ndim == 3 else "[n_stimuli, width]"
        raise MlxscanError(f"X must be {shape}; got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise MlxscanError(f"X must be numeric; got dtype {X.dtype}")
    return X


def _check_labels(y, groups, n: int, folds: int):
    """(classes, y as indices into classes, groups as an array), or an MlxscanError saying what is wrong."""
    y, groups = np.asarray(y), np.asarray(groups)
    if y.ndim != 1 or groups.ndim != 1:
        raise MlxscanError(f"y and groups must be 1-d; got shapes {y.shape} and {groups.shape}")
    if len(y) != n or len(groups) != n:
        raise MlxscanError(f"X has {n} stimuli but y has {len(y)} and groups {len(groups)}; all three must match")
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise MlxscanError(f"folds must be an integer of at least 2; got {folds!r}")
    classes, y_index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise MlxscanError(f"y holds one class only ({classes[0]!r}); a probe needs at least two")
    n_groups = len(np.unique(groups))
    if n_groups < folds:
        raise MlxscanError(f"{n_groups} groups cannot fill {folds} folds (each fold needs words of its own); "
                           "use fewer folds or more words")
    for index, label in enumerate(classes):
        words = len(np.unique(groups[y_index == index]))
        if words < 2:
            raise MlxscanError(f"class {label!r} has {words} word; grouped cross-validation needs at least 2 "
                               "words per class (one to train on, one to test)")
    return classes, y_index, groups


def make_folds(y, groups, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """[n] the test fold of each stimulus: no word on both sides of a split, classes balanced across folds.

    The folds depend on y, so a permutation test must make them again for each shuffled y.

    StratifiedGroupKFold balances the classes; where it leaves a fold empty (very few words) this falls
    back to GroupKFold, which fills every fold.
    """
    _, y_index, groups = _check_labels(y, groups, len(np.asarray(y)), folds)
    fold_of = np.full(len(y_index), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(y_index)), y_index, groups)):
        fold_of[test] = fold
    if np.bincount(fold_of, minlength=folds).min() == 0:
        for fold, (_, test) in enumerate(GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                                         .split(np.zeros(len(y_index)), y_index, groups)):
            fold_of[test] = fold
    return fold_of


def permute_labels_by_group(y, groups, rng: np.random.Generator) -> np.ndarray:
    """y with the groups' labels shuffled among the groups: all stimuli of a word move together.

    Shuffling stimuli one by one would break the word structure the real labels have and make the
    null too easy to beat; shuffling whole words keeps it.
    """
    y, groups = np.asarray(y), np.asarray(groups)
    unique, group_index = np.unique(groups, return_inverse=True)
    group_label = np.empty(len(unique), dtype=y.dtype)
    group_label[group_index] = y
    if not np.array_equal(group_label[group_index], y):
        raise MlxscanError("a permutation test needs one label per group, but some word has stimuli of two "
                           "classes; pass permutations=0 or fix the groups")
    return rng.permutation(group_label)[group_index]


# ---------------------------------------------------------------------------------------------
# Fitting


def linear_probe(C: float = 1.0, class_weight=None, tol: float = 1e-3):
    """Multinomial logistic regression on standardized features, as a scikit-learn pipeline.

    The multinomial probes here are fitted by logistic.fit_many, which minimizes this pipeline's
    objective for many label sets and folds at once (to PROBE_TOL); the pipeline remains for the
    class-weighted binary probes and as the reference the batched solver is tested against.
    """
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight=class_weight,
                                                              max_iter=PROBE_MAX_ITER, tol=tol))


def _features(layer_view: np.ndarray, name: str) -> np.ndarray:
    """One layer [n, width] copied to float64 (of a memory-mapped scan, only this layer is read)."""
    features = np.array(layer_view, dtype=np.float64)
    if not np.isfinite(features).all():
        raise MlxscanError(f"{name} holds NaN or infinite activations; a probe cannot use it")
    return features


def _single_threaded_blas():
    """One BLAS thread for fits in this process, as in each joblib worker.

    A scikit-learn fit's matrices ([~1000, width]) are too small to share: measured on 2 cores, a fit
    on shuffled labels took 0.42 s with two BLAS threads and 0.10 s with one. For the batched solver it
    keeps the arithmetic, and so the results, the same whatever n_jobs is.
    """
    return threadpool_limits(limits=1)


def _fold_probabilities(estimator, X, labels, fold_of, fold, n_classes) -> np.ndarray:
    """[n_test, n_classes] probabilities for one fold; a class absent from training gets 0."""
    train, test = fold_of != fold, fold_of == fold
    model = clone(estimator).fit(X[train], labels[train])
    probabilities = np.zeros((int(test.sum()), n_classes))
    probabilities[:, model.classes_] = model.predict_proba(X[test])
    return probabilities


def _multinomial_out_of_fold(X, label_sets, fold_sets, n_classes: int, C: float) -> np.ndarray:
    """[n_label_sets, n, n_classes] out-of-fold probabilities of the linear probe, all folds fitted at once."""
    with _single_threaded_blas():  # the same arithmetic in a worker and in this process
        return out_of_fold_probabilities(X, label_sets, fold_sets, n_classes, C=C, tol=PROBE_TOL,
                                         max_iter=PROBE_MAX_ITER)


def _probe_layer(layer_view, name: str, label_sets, fold_sets, n_classes: int, C: float) -> np.ndarray:
    """One layer's out-of-fold probabilities for every labelling (a joblib job of probe_layers)."""
    return _multinomial_out_of_fold(_features(layer_view, name), label_sets, fold_sets, n_classes, C)


def _out_of_fold(estimator, X, label_sets, fold_sets, n_classes, parallel) -> np.ndarray:
    """[n_label_sets, n, n_classes] out-of-fold probabilities of each labelling [n] under its folds [n].

    Every (labelling, fold) fit is one joblib job.
    """
    jobs = [(i, fold) for i in range(len(label_sets)) for fold in range(int(fold_sets[i].max()) + 1)]
    fitted = parallel(delayed(_fold_probabilities)(estimator, X, label_sets[i], fold_sets[i], fold, n_classes)
                      for i, fold in jobs)
    out = np.empty((len(label_sets), label_sets.shape[1], n_classes))
    for (i, fold), probabilities in zip(jobs, fitted):
        out[i, fold_sets[i] == fold] = probabilities
    return out


# ---------------------------------------------------------------------------------------------
# Statistics


def _resample_weights(groups, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """[resamples, n] how often each stimulus is drawn when words are resampled with replacement."""
    unique, group_index = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng([seed, 2])
    draws = rng.multinomial(len(unique), np.full(len(unique), 1 / len(unique)), size=resamples)  # [B, G]
    return draws[:, group_index].astype(np.float64)


def _weighted_accuracy(correct, weights) -> np.ndarray:
    """[B] accuracy under each row of weights [B, n]."""
    return weights @ correct / weights.sum(axis=1)


def _weighted_ovr_auc(y_index, scores, weights) -> np.ndarray:
    """[B, n_classes] one-vs-rest ROC AUC of scores[:, c] under each row of weights [B, n].

    Ties count one half, as in roc_auc_score; with weights of ones the two agree. A class absent from
    a resample (or one present everywhere) gets NaN.
    """
    aucs = np.empty((weights.shape[0], scores.shape[1]))
    for c in range(scores.shape[1]):
        order = np.argsort(scores[:, c], kind="stable")
        sorted_scores = scores[order, c]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])  # blocks of tied scores
        is_c = y_index[order] == c
        w = weights[:, order]
        positive = np.add.reduceat(w * is_c, starts, axis=1)  # [B, blocks]
        negative = np.add.reduceat(w * ~is_c, starts, axis=1)
        below = np.cumsum(negative, axis=1) - negative
        pairs = positive.sum(axis=1) * negative.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[:, c] = np.where(pairs > 0, (positive * (below + 0.5 * negative)).sum(axis=1) / pairs, np.nan)
    return aucs


def _interval(samples) -> tuple[float, float]:
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(low), float(high)


def _p_values(observed: float, null: np.ndarray) -> tuple[float, float, float, float]:
    """(p_empirical, p_gaussian, null mean, null sd) of an observed accuracy against its null."""
    if len(null) == 0:
        return math.nan, math.nan, math.nan, math.nan
    p_empirical = (1 + int(np.sum(null >= observed))) / (1 + len(null))
    if len(null) < 2:
        return p_empirical, math.nan, float(null[0]), math.nan
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    if sd == 0:  # every permutation scored the same: the observed value is either above it or not
        p_gaussian = 1.0 if observed <= mean else P_FLOOR
    else:
        p_gaussian = max(float(norm.sf(observed, loc=mean, scale=sd)), P_FLOOR)
    return p_empirical, p_gaussian, mean, sd


def holm_reject(p_values, alpha: float = 0.05) -> np.ndarray:
    """[m] bool: which hypotheses Holm–Bonferroni rejects at family-wise level alpha.

    Step down through the sorted p-values: the k-th smallest (k from 0) must be <= alpha / (m - k);
    the first that fails stops the procedure, and it and every larger p-value stand.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0:
        raise MlxscanError(f"p_values must be a non-empty 1-d sequence; got shape {p.shape}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise MlxscanError("p_values must lie in [0, 1] (NaN means a layer was probed without permutations)")
    if not 0 < alpha < 1:
        raise MlxscanError(f"alpha must lie in (0, 1); got {alpha}")
    order = np.argsort(p, kind="stable")
    passes = p[order] <= alpha / (len(p) - np.arange(len(p)))
    n_rejected = len(p) if passes.all() else int(np.argmin(passes))
    rejected = np.zeros(len(p), dtype=bool)
    rejected[order[:n_rejected]] = True
    return rejected


def decodable_span(p_values: Sequence[float], alpha: float = 0.05) -> float:
    """Fraction of layers whose p-value survives Holm–Bonferroni correction for the number of layers."""
    return float(holm_reject(p_values, alpha).mean())


# ---------------------------------------------------------------------------------------------
# Layer by layer


def probe_layers(X, y, groups, *, layers: Sequence[int] | None = None, folds: int = 5, permutations: int = 20,
                 seed: int = 0, n_jobs: int = 2, C: float = 1.0,
                 progress: Callable[[int, int], None] | None = None) -> ProbeReport:
    """Cross-validated linear decodability of y at each layer of X [n, n_layers, width], with a permutation null.

    Per layer: `linear_probe(C)`'s objective minimized on word-grouped, class-balanced folds
    (`make_folds`, the same for every layer), all labellings and folds of a layer in one batched solve
    (logistic.py), n_jobs layers at a time; accuracy and macro one-vs-rest AUC of the out-of-fold probabilities with 95%
    cluster-bootstrap CIs over words; `permutations` refits on labels shuffled across words. The
    shuffles are the same for every layer, and each one gets the folds `make_folds` makes for it, so the
    null repeats the whole procedure. X may be a read-only memory map: one layer at a time is copied.
    `progress(done_layers, total_layers)` is called after each layer.
    """
    X = _check_activations(X, ndim=3)
    classes, y_index, groups = _check_labels(y, groups, len(X), folds)
    layers = tuple(range(X.shape[1])) if layers is None else tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < X.shape[1] for layer in layers):
        raise MlxscanError(f"layers must be positions in 0..{X.shape[1] - 1} of X's axis 1; got {list(layers)}")
    if permutations < 0:
        raise MlxscanError(f"permutations must be 0 or more; got {permutations}")
    n_classes = len(classes)
    permutation_rng = np.random.default_rng([seed, 1])
    label_sets = np.stack([y_index] + [permute_labels_by_group(y_index, groups, permutation_rng)
                                       for _ in range(permutations)])  # [1 + permutations, n]
    # Each labelling gets the folds the same recipe makes for it: stratified folds built from the real
    # labels alone are balanced for them and not for shuffled ones, and CV's bias differs between the two
    # (measured on pure noise: 10-15% of layers had p_empirical < 0.05 with shared folds).
    fold_sets = np.stack([make_folds(labels, groups, folds=folds, seed=seed) for labels in label_sets])
    weights = _resample_weights(groups, seed)

    results, probabilities, null_accuracies = [], [], []
    # One job per layer, each fitting all (labelling, fold) pairs of its layer together; results come
    # back in layer order as they finish.
    jobs = (delayed(_probe_layer)(X[:, layer], f"layer {layer}", label_sets, fold_sets, n_classes, C)
            for layer in layers)
    fitted = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    for done, (layer, oof) in enumerate(zip(layers, fitted), start=1):
        correct = oof.argmax(axis=2) == label_sets  # [1 + permutations, n]
        accuracies = correct.mean(axis=1)
        auc = roc_auc_score(y_index, oof[0], multi_class="ovr", average="macro", labels=np.arange(n_classes))
        p_empirical, p_gaussian, null_mean, null_sd = _p_values(accuracies[0], accuracies[1:])
        results.append(LayerProbe(
            layer=layer, accuracy=float(accuracies[0]),
            accuracy_ci=_interval(_weighted_accuracy(correct[0], weights)),
            auc=float(auc), auc_ci=_interval(np.nanmean(_weighted_ovr_auc(y_index, oof[0], weights), axis=1)),
            p_empirical=p_empirical, p_gaussian=p_gaussian, null_mean=null_mean, null_sd=null_sd))
        probabilities.append(oof[0])
        null_accuracies.append(accuracies[1:])
        if progress is not None:
            progress(done, len(layers))

    return ProbeReport(
        layers=tuple(results), classes=tuple(classes.tolist()), chance=1 / n_classes,
        majority_rate=float(np.bincount(y_index).max() / len(y_index)), n_classes=n_classes, folds=folds,
        permutations=permutations, seed=seed, C=C, oof_probabilities=np.stack(probabilities),
        null_accuracies=np.stack(null_accuracies), fold_of=fold_sets[0])


# ---------------------------------------------------------------------------------------------
# Depth questions, one layer at a time


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
