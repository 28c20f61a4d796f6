"""Linear probes: at which layers is the category linearly decodable? (How: probe_depth.py.)

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
from scipy.stats import nct, norm
from scipy.stats import t as student_t
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..errors import MlxscanError
from .logistic import out_of_fold_probabilities
from ._json import jsonable as _jsonable

__all__ = [
    "LayerProbe", "ProbeReport", "probe_layers", "decodable_span", "holm_reject",
    "linear_probe", "make_folds", "permute_labels_by_group", "early_verdicts", "futility_cutoff",
]

BOOTSTRAP_RESAMPLES = 1000
P_FLOOR = 1e-16  # p_gaussian's floor: below it the normal tail says nothing the data could support
PROBE_MAX_ITER = 1000  # a safety net: the batched solver stops after ~30-80 steps on scans
# Largest gradient entry at which a probe counts as fitted. On the category scan, real-label accuracy
# at 1e-5 was within 1 stimulus of scikit-learn's at tol=1e-7 (the optimum) at 27 of 30 layers (4 at
# most) and 29 of 30 on the twin (2); scikit-learn at tol=1e-3 was up to 7 and 16 stimuli away.
PROBE_TOL = 1e-5
# Shuffles every layer gets; a layer runs the rest of its permutations only if these leave its verdict
# open (see early_verdicts).
FIRST_LOOK = 5
# An early "significant" needs p <= alpha / (EARLY_SHARE * layers): a share of alpha spent on the first
# look, so that stopping early raises the family-wise error rate at most from alpha to 1.1 alpha.
EARLY_SHARE = 10
# An early "not significant" needs a first-look p that a layer which could still pass Holm would show
# at most this often (see futility_cutoff): the power the early stop may cost such a layer.
FUTILITY_LOSS = 0.01


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
    p_empirical: float  # (1 + #null >= observed) / (1 + permutations run): never below 1 / (permutations run + 1)
    p_gaussian: float  # the observed accuracy's Student-t prediction p under a normal null (see _p_values)
    null_mean: float
    null_sd: float
    permutations_run: int  # shuffles this layer's null holds: all of them, or the first look's if they settled it
    settled_early: str | None  # "significant" or "not significant" when the first look settled the verdict

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
    permutations: int  # at most, per layer
    first_look: int  # shuffles every layer runs; the rest come in a second batch
    early_stop: bool  # whether a layer the first look settled skips the second batch
    alpha: float  # family-wise level of the early verdicts and of the decodable span
    seed: int
    C: float
    oof_probabilities: np.ndarray  # [n_layers_probed, n, n_classes] out-of-fold probabilities
    null_accuracies: np.ndarray  # [n_layers_probed, permutations] accuracies under group-permuted labels; NaN: not run
    fold_of: np.ndarray  # [n] the test fold of each stimulus (real labels; shuffles get their own, see probe_layers)

    def decodable_span(self, alpha: float | None = None) -> float:
        """Fraction of probed layers significant after Holm correction, using p_gaussian.

        p_gaussian, not p_empirical: with P permutations p_empirical cannot go below 1/(P+1), so with
        few permutations no layer could survive a correction for 30 layers however strong its signal.
        """
        return decodable_span([layer.p_gaussian for layer in self.layers], alpha=self.alpha if alpha is None else alpha)

    def to_dict(self) -> dict:
        """JSON-able summary, without the big arrays (see `arrays`)."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "classes": _jsonable(self.classes),
            "chance": self.chance, "majority_rate": self.majority_rate, "n_classes": self.n_classes,
            "folds": self.folds, "permutations": self.permutations, "first_look": self.first_look,
            "early_stop": self.early_stop,
            "seed": self.seed, "C": self.C,
            "decodable_span": {"fraction": self.decodable_span() if self.permutations >= 2 else None,
                               "alpha": self.alpha, "correction": "holm", "p_value": "p_gaussian"},
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

    A word bootstrap weights all stimuli of a word alike, so the weights have few distinct columns G:
    then each class's positive-negative pairs are counted once per pair of columns ([G, G]) and every
    resample's AUC is a quadratic form in its G weights: 28 ms on the category scan, where sorting per
    resample (kept for weights without that structure) takes 226 (scripts/bench_probe_solver.py).
    """
    weights = np.asarray(weights, dtype=np.float64)
    # Equal columns found by one random projection (np.unique over columns sorts them: 50 ms), then checked.
    keys = np.random.default_rng(0).standard_normal(len(weights)) @ weights  # [n]
    _, first, column_of = np.unique(keys, return_index=True, return_inverse=True)
    columns = weights[:, first]  # [B, G]
    if columns.shape[1] > weights.shape[1] // 2 or not np.array_equal(columns[:, column_of], weights):
        return _weighted_ovr_auc_sorted(y_index, scores, weights)
    one_hot = np.eye(columns.shape[1])[column_of]  # [n, G]
    aucs = np.empty((weights.shape[0], scores.shape[1]))
    for c in range(scores.shape[1]):
        is_c = y_index == c
        positive_scores, negative_scores = scores[is_c, c][:, None], scores[~is_c, c][None, :]
        beats = (negative_scores < positive_scores) + 0.5 * (negative_scores == positive_scores)  # [P, N]
        pairs_by_column = one_hot[is_c].T @ beats @ one_hot[~is_c]  # [G, G]
        won = np.einsum("bg,bg->b", columns @ pairs_by_column, columns)
        pairs = (columns @ one_hot[is_c].sum(axis=0)) * (columns @ one_hot[~is_c].sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs[:, c] = np.where(pairs > 0, won / pairs, np.nan)
    return aucs


def _weighted_ovr_auc_sorted(y_index, scores, weights) -> np.ndarray:
    """_weighted_ovr_auc for any weights: per class, one sort and a pass over tied-score blocks per resample."""
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
    """(p_empirical, p_gaussian, null mean, null sd) of an observed accuracy against its null draws.

    p_gaussian treats the k null accuracies and the observed one as draws of one normal of unknown mean
    and sd: (observed - mean) / (sd sqrt(1 + 1/k)) is then Student-t with k - 1 degrees of freedom, so
    the p-value is exact for any k (a normal tail with the estimated sd would be too small for few draws).
    """
    null = null[np.isfinite(null)]
    if len(null) == 0:
        return math.nan, math.nan, math.nan, math.nan
    p_empirical = (1 + int(np.sum(null >= observed))) / (1 + len(null))
    if len(null) < 2:
        return p_empirical, math.nan, float(null[0]), math.nan
    mean, sd = float(null.mean()), float(null.std(ddof=1))
    if sd == 0:  # every permutation scored the same: the observed value is either above it or not
        p_gaussian = 1.0 if observed <= mean else P_FLOOR
    else:
        score = (observed - mean) / (sd * math.sqrt(1 + 1 / len(null)))
        p_gaussian = max(float(student_t.sf(score, len(null) - 1)), P_FLOOR)
    return p_empirical, p_gaussian, mean, sd


def futility_cutoff(bar: float, draws: int, loss: float = FUTILITY_LOSS) -> float:
    """The first-look p above which a layer is given up: one whose accuracy sits exactly at p = bar of its
    null (as infinitely many shuffles would show) gets a larger first-look p from `draws` shuffles only
    `loss` of the time.

    With null accuracies normal, sqrt(draws) (observed - mean) / sd is noncentral t (draws - 1 degrees
    of freedom, noncentrality sqrt(draws) z_bar), and the first-look p falls as it grows.
    """
    score = nct.ppf(loss, draws - 1, math.sqrt(draws) * norm.isf(bar))
    return float(student_t.sf(score / math.sqrt(draws + 1), draws - 1))


def early_verdicts(p_first_look, draws: int, alpha: float = 0.05) -> list[str | None]:
    """Per layer, after a first look of `draws` shuffles: "significant", "not significant", or None (run the rest).

    Significant: p <= alpha / (EARLY_SHARE n_layers), below every threshold Holm could give the layer.
    Not significant: p above `futility_cutoff` of the most lenient threshold Holm could still give it,
    alpha / (F + 1) with F the layers already given up (Holm tests a layer after at most the n_layers - F - 1
    others). Given up, a layer that could pass is lost at most FUTILITY_LOSS of the time; stopping never
    adds a false positive. Between the two, only more permutations can tell (NaN p: open).
    """
    p = np.asarray(p_first_look, dtype=np.float64)
    if len(p) == 0:
        return []
    significant = p <= alpha / (EARLY_SHARE * len(p))
    futile = np.zeros(len(p), dtype=bool)
    while True:  # each layer given up lowers the bar for the others; F only grows, so this ends
        bar = alpha / (futile.sum() + 1)
        given_up = ~significant & (p > futility_cutoff(bar, draws))
        if (given_up == futile).all():
            break
        futile = given_up
    return ["significant" if yes else "not significant" if no else None for yes, no in zip(significant, futile)]


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
                 first_look: int = FIRST_LOOK, early_stop: bool = True, alpha: float = 0.05, seed: int = 0,
                 n_jobs: int = 2, C: float = 1.0, progress: Callable[[int, int], None] | None = None) -> ProbeReport:
    """Cross-validated linear decodability of y at each layer of X [n, n_layers, width], with a permutation null.

    Per layer: `linear_probe(C)`'s objective minimized on word-grouped, class-balanced folds
    (`make_folds`, the same for every layer), all labellings and folds of a layer in one batched solve
    (logistic.py), n_jobs layers at a time; accuracy and macro one-vs-rest AUC of the out-of-fold
    probabilities with 95% cluster-bootstrap CIs over words; up to `permutations` refits on labels
    shuffled across words. The shuffles are the same for every layer, and each one gets the folds
    `make_folds` makes for it, so the null repeats the whole procedure.

    Permutations are spent where the verdict is open: every layer first gets `first_look` of them, and
    runs the rest only if `early_verdicts` (Holm at `alpha` over the probed layers) cannot yet call it;
    `early_stop=False` runs all of them everywhere. Either way the shuffles come in the same two batches,
    so the numbers they give do not depend on which layers stopped. X may be a read-only memory map:
    one layer at a time is copied. `progress(done, total)` is called after each layer's batch.
    """
    X = _check_activations(X, ndim=3)
    classes, y_index, groups = _check_labels(y, groups, len(X), folds)
    layers = tuple(range(X.shape[1])) if layers is None else tuple(int(layer) for layer in layers)
    if not layers or any(not 0 <= layer < X.shape[1] for layer in layers):
        raise MlxscanError(f"layers must be positions in 0..{X.shape[1] - 1} of X's axis 1; got {list(layers)}")
    if permutations < 0:
        raise MlxscanError(f"permutations must be 0 or more; got {permutations}")
    if first_look < 2:
        raise MlxscanError(f"first_look must be at least 2 (a null's spread needs two draws); got {first_look}")
    if not 0 < alpha < 1:
        raise MlxscanError(f"alpha must lie in (0, 1); got {alpha}")
    n_classes = len(classes)
    permutation_rng = np.random.default_rng([seed, 1])
    label_sets = np.stack([y_index] + [permute_labels_by_group(y_index, groups, permutation_rng)
                                       for _ in range(permutations)])  # [1 + permutations, n]
    # Each labelling gets the folds the same recipe makes for it: stratified folds built from the real
    # labels alone are balanced for them and not for shuffled ones, and CV's bias differs between the two
    # (measured on pure noise: 10-15% of layers had p_empirical < 0.05 with shared folds).
    first = 1 + min(first_look, permutations)  # labellings of the first batch: the real one and first_look shuffles
    fold_sets = np.stack([make_folds(labels, groups, folds=folds, seed=seed) for labels in label_sets[:first]])
    weights = _resample_weights(groups, seed)

    def fitted(some_layers, sets):
        # One job per layer, each fitting all (labelling, fold) pairs of its layer together, in layer order.
        jobs = (delayed(_probe_layer)(X[:, layer], f"layer {layer}", label_sets[sets], fold_sets[sets], n_classes, C)
                for layer in some_layers)
        return Parallel(n_jobs=n_jobs, return_as="generator")(jobs)

    # Results by position along `layers` (a layer may be listed twice).
    oof, correct, positions = {}, {}, list(range(len(layers)))
    first_batch = fitted(layers, slice(0, first))
    for done, (position, probabilities) in enumerate(zip(positions, first_batch), start=1):
        oof[position] = probabilities[0]
        correct[position] = probabilities.argmax(axis=2) == label_sets[:first]  # [first, n]
        if progress is not None:
            progress(done, len(layers))
    verdicts = dict.fromkeys(positions)
    if early_stop and first < len(label_sets):
        first_p = []
        for position in positions:
            accuracies = correct[position].mean(axis=1)  # the real labels first, then the shuffles
            _, p, _, sd = _p_values(accuracies[0], accuracies[1:])
            first_p.append(p if sd > 0 else math.nan)  # shuffles that all scored alike say nothing yet
        verdicts = dict(zip(positions, early_verdicts(first_p, first - 1, alpha)))
    remaining = [position for position in positions if first < len(label_sets) and verdicts[position] is None]
    # The second batch's total is known only now: progress counts on from len(layers) to this.
    total = len(layers) + len(remaining)
    if remaining:  # the second batch's folds (StratifiedGroupKFold takes ~30 ms a labelling)
        fold_sets = np.concatenate([fold_sets] + [make_folds(labels, groups, folds=folds, seed=seed)[None]
                                                  for labels in label_sets[first:]])
    second_batch = fitted([layers[position] for position in remaining], slice(first, None)) if remaining else ()
    for done, (position, probabilities) in enumerate(zip(remaining, second_batch), start=len(layers) + 1):
        correct[position] = np.concatenate([correct[position], probabilities.argmax(axis=2) == label_sets[first:]])
        if progress is not None:
            progress(done, total)

    results, null_accuracies = [], np.full((len(layers), permutations), np.nan)
    for position, layer in enumerate(layers):
        accuracies = correct[position].mean(axis=1)
        null_accuracies[position, :len(accuracies) - 1] = accuracies[1:]
        auc = roc_auc_score(y_index, oof[position], multi_class="ovr", average="macro", labels=np.arange(n_classes))
        p_empirical, p_gaussian, null_mean, null_sd = _p_values(accuracies[0], accuracies[1:])
        results.append(LayerProbe(
            layer=layer, accuracy=float(accuracies[0]),
            accuracy_ci=_interval(_weighted_accuracy(correct[position][0], weights)),
            auc=float(auc), auc_ci=_interval(np.nanmean(_weighted_ovr_auc(y_index, oof[position], weights), axis=1)),
            p_empirical=p_empirical, p_gaussian=p_gaussian, null_mean=null_mean, null_sd=null_sd,
            permutations_run=len(accuracies) - 1, settled_early=verdicts[position]))

    return ProbeReport(
        layers=tuple(results), classes=tuple(classes.tolist()), chance=1 / n_classes,
        majority_rate=float(np.bincount(y_index).max() / len(y_index)), n_classes=n_classes, folds=folds,
        permutations=permutations, first_look=first_look, early_stop=early_stop, alpha=alpha, seed=seed, C=C,
        oof_probabilities=np.stack([oof[position] for position in positions]), null_accuracies=null_accuracies,
        fold_of=fold_sets[0])
