"""What the causal experiments (ablation, steering, invariance) share: the clean baseline they perturb.

Every experiment runs the same recipe:
  1. subsample the stimuli by whole words (seeded), so an experiment that reruns the model dozens of
     times stays within minutes (`subsample_words`);
  2. take the clean activations from the cached scan of that subsample (`resid_post`, word-pooled, every
     layer), and estimate the objects the experiment acts on from them: one class-mean direction per
     category at the intervention layer L, the same at the readout layer R, unit selectivity at L;
  3. rerun the subsample clean, in memory, for the next-token reference (the last token's final-norm
     vector); this rerun must reproduce the scan, which is reported as a check of the machinery;
  4. fit the readout probe on the clean activations at R (word-grouped folds) and score every arm out
     of fold with the same fitted probes, so a change in a score is a change in the activations.

Cross-fitting: everything an arm is built from (directions at L and R, separations, top units) is
estimated again per fold from the fold's training words only, and each stimulus is intervened on and
measured with its own fold's estimates, as the readout probe scores it. Nothing fitted on a word is
ever tested on it; estimates on every word are kept for description (`directions`), never for an arm.
A category whose held-out clean readout does not beat chance (its AUC's word-bootstrap 95% interval
does not lie above 0.5) has nothing to remove or steer toward: its arms are untestable (`testable`).

Uncertainty is a bootstrap over words (a word's stimuli move together), paired between the clean run
and the arm: the same resample scores both. The pure statistics here take NumPy arrays only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..analysis._json import jsonable
from ..errors import MlxscanError
from ..stimuli import StimulusSet

SITE = "resid_post"  # the residual stream: what every experiment perturbs and reads
DEFAULT_WORDS_PER_CATEGORY = 3
FOLDS = 5
BOOTSTRAP_RESAMPLES = 1000

Say = Callable[[str], None]


def quiet(message: str) -> None:
    """The default `say`: experiments called from Python print nothing."""


# ---------------------------------------------------------------------------------------------
# Pure statistics (NumPy only)



def participation_ratio(X) -> float:
    """(sum of eigenvalues)^2 / sum of squared eigenvalues of the covariance of X [n, width].

    The effective number of dimensions the rows spread over: 1 for points on a line, d for isotropic
    noise in d dimensions. Continuous and free of a variance threshold (unlike "PCs for 90%"), it is
    used for a category's encoding dimensionality. It is bounded by n - 1, so compare only sets of
    equal size.
    """
    X = np.asarray(X, np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise MlxscanError(f"participation_ratio needs [n >= 2, width] activations, got shape {X.shape}")
    centred = X - X.mean(axis=0)
    # The eigenvalues of the covariance are the squared singular values of the centred data (up to n - 1).
    eigenvalues = np.linalg.svd(centred, compute_uv=False) ** 2
    total = eigenvalues.sum()
    return float(total**2 / np.sum(eigenvalues**2)) if total > 0 else 0.0


def word_resample_weights(groups, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """[resamples, n] how often each stimulus is drawn when words (groups) are resampled with replacement."""
    unique, index = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng([seed, 7])
    draws = rng.multinomial(len(unique), np.full(len(unique), 1 / len(unique)), size=resamples)  # [B, words]
    return draws[:, index].astype(np.float64)


def interval(samples) -> tuple[float, float]:
    """The central 95% of bootstrap samples (NaN samples, e.g. a resample without a class, ignored)."""
    samples = np.asarray(samples, np.float64)
    if not np.isfinite(samples).any():
        return math.nan, math.nan
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return float(low), float(high)


def weighted_means(values, weights) -> np.ndarray:
    """[B] mean of values [n] under each row of weights [B, n]."""
    return weights @ np.asarray(values, np.float64) / weights.sum(axis=1)


def mean_with_ci(values, weights) -> tuple[float, tuple[float, float]]:
    """The mean of per-stimulus values [n] and its word-bootstrap 95% interval."""
    return float(np.mean(values)), interval(weighted_means(values, weights))


def ovr_auc(y_index, scores, weights=None) -> np.ndarray:
    """[B, n_classes] one-vs-rest ROC AUC of scores [n, n_classes] under each row of weights [B, n]
    (one row of ones when weights is None). Ties count one half."""
    from ..analysis.probes import _weighted_ovr_auc  # the project's one weighted-AUC implementation

    y_index = np.asarray(y_index)
    weights = np.ones((1, len(y_index))) if weights is None else weights
    return _weighted_ovr_auc(y_index, np.asarray(scores, np.float64), weights)


def correlation_with_ci(x, y, seed: int, resamples: int = 2000) -> dict:
    """Pearson r and Spearman rho of paired values, with 95% bootstrap intervals over the pairs.

    With few pairs (ten categories) the interval is wide and the bootstrap itself is rough; it is
    reported so that nobody reads r from ten points as a precise number.
    """
    from scipy.stats import pearsonr, spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "pearson_ci": [None, None], "spearman": None, "spearman_ci": [None, None],
                "n": int(len(x))}
    rng = np.random.default_rng([seed, 11])
    pearsons, spearmans = [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(x), len(x))
        if np.ptp(x[pick]) > 0 and np.ptp(y[pick]) > 0:
            pearsons.append(pearsonr(x[pick], y[pick])[0])
            spearmans.append(spearmanr(x[pick], y[pick])[0])
    return {"pearson": float(pearsonr(x, y)[0]), "pearson_ci": list(interval(pearsons)),
            "spearman": float(spearmanr(x, y)[0]), "spearman_ci": list(interval(spearmans)), "n": int(len(x))}


def subsample_words(stimuli: StimulusSet, per_category: int | None, seed: int,
                    frames: int | None = None) -> StimulusSet:
    """The stimuli of `per_category` words (groups) drawn per category, and of `frames` frames drawn once
    for every word (seeded); None keeps all.

    Whole words, so word-grouped folds still work; the same frames for every word, so categories do not
    differ by the sentences they were read in. Without a frame field, `frames` stimuli per word are drawn.
    """
    rng = np.random.default_rng([seed, 3])
    chosen = _chosen_words(stimuli, per_category, rng)
    kept = [s for s in stimuli if chosen is None or s.group in chosen]
    if frames is not None:
        kept = _chosen_frames(kept, frames, rng)
    if len(kept) == len(stimuli):
        return stimuli
    records = [{"text": s.text, "word": s.word, "category": s.category, "group": s.group,
                **({"frame": s.frame} if s.frame is not None else {})} for s in kept]
    return StimulusSet.from_records(records)


def _chosen_words(stimuli: StimulusSet, per_category: int | None, rng) -> set[str] | None:
    if per_category is None:
        return None
    groups_of: dict[str, list[str]] = {}
    for stimulus in stimuli:
        words = groups_of.setdefault(stimulus.category, [])
        if stimulus.group not in words:
            words.append(stimulus.group)
    fewest = min(len(words) for words in groups_of.values())
    if not 2 <= per_category <= fewest:
        raise MlxscanError(f"--per-category {per_category}: choose 2..{fewest} words per category (grouped folds "
                           f"need two words a category; the smallest category has {fewest})")
    return {str(group) for category in sorted(groups_of)
            for group in rng.choice(sorted(groups_of[category]), per_category, replace=False)}


def _chosen_frames(kept: list, frames: int, rng) -> list:
    if frames < 1:
        raise MlxscanError(f"--frames {frames}: keep at least one frame per word")
    if all(s.frame is not None for s in kept):
        names = sorted({s.frame for s in kept})
        if frames >= len(names):
            return kept
        picked = set(rng.choice(names, frames, replace=False).tolist())
        return [s for s in kept if s.frame in picked]
    by_word: dict[str, list[int]] = {}
    for index, stimulus in enumerate(kept):
        by_word.setdefault(stimulus.group, []).append(index)
    keep = {int(i) for rows in by_word.values() for i in rng.permutation(rows)[:frames]}
    return [s for index, s in enumerate(kept) if index in keep]


# ---------------------------------------------------------------------------------------------
# Checks at the boundary


def check_layers(model, layer: int | None, readout_layer: int | None) -> tuple[int, int]:
    """(L, R) with their defaults: L = n_layers // 2, R = the last layer; R must not come before L."""
    last = model.n_layers - 1
    layer = model.n_layers // 2 if layer is None else int(layer)
    readout_layer = last if readout_layer is None else int(readout_layer)
    for name, value in (("--layer", layer), ("--readout-layer", readout_layer)):
        if not 0 <= value <= last:
            raise MlxscanError(f"{name} {value} does not exist; this model has layers 0..{last}")
    if readout_layer < layer:
        raise MlxscanError(f"--readout-layer {readout_layer} comes before --layer {layer}: an intervention "
                           "cannot change a layer before it; choose a readout layer at or after it")
    return layer, readout_layer


def check_finite(values: Sequence[float], name: str, *, positive: bool = False) -> tuple[float, ...]:
    values = tuple(float(value) for value in values)
    if not values:
        raise MlxscanError(f"{name} is empty; give at least one number")
    bad = [value for value in values if not math.isfinite(value) or (positive and value <= 0)]
    if bad:
        kind = "finite positive numbers" if positive else "finite numbers"
        raise MlxscanError(f"{name} must be {kind}; got {bad[0]}")
    return values


def category_index(classes: Sequence[str], category: str | None) -> int:
    """Index of `category` among the classes (the first class when None)."""
    if category is None:
        return 0
    if category not in classes:
        raise MlxscanError(f"category {category!r} is not in the stimuli; categories: {', '.join(classes)}")
    return list(classes).index(category)


# ---------------------------------------------------------------------------------------------
# The readout probe and the clean baseline


@dataclass(eq=False)
class ReadoutProbe:
    """The category readout: per category, a one-vs-rest logistic probe ("is it c?") fitted on clean
    activations at R, one per word-grouped fold.

    `probabilities(X)` scores each stimulus with the probes that never saw its word, so clean and
    perturbed activations of the same stimulus are judged by the same fitted probes. Binary probes,
    not one multinomial probe: a multinomial P(c) ranks a stimulus that looks like no category above
    one that clearly looks like another, so removing a category's direction (which leaves its
    stimuli looking like nothing) would keep its one-vs-rest AUC high (seen on a planted model).
    """

    fold_of: np.ndarray  # [n] the test fold of each stimulus
    fitted: list  # per fold, one fitted binary pipeline per class
    n_classes: int

    @classmethod
    def fit(cls, X, y_index, groups, seed: int, folds: int = FOLDS) -> ReadoutProbe:
        from threadpoolctl import threadpool_limits

        from ..analysis.probes import linear_probe, make_folds

        # Stratified folds need as many stimuli per class as folds; tiny subsamples get fewer folds.
        folds = max(2, min(folds, len(np.unique(groups)), int(np.bincount(y_index).min())))
        fold_of = make_folds(y_index, groups, folds=folds, seed=seed)
        X, n_classes = np.asarray(X, np.float64), int(np.max(y_index)) + 1
        fitted = []
        with threadpool_limits(limits=1):  # small fits: a second BLAS thread only adds overhead
            for fold in range(folds):
                train = fold_of != fold
                missing = sorted(set(range(n_classes)) - set(y_index[train].tolist()))
                if missing:
                    raise MlxscanError(f"class {missing[0]} has all its words in one fold; draw more words "
                                       "per category (--per-category)")
                fitted.append([linear_probe(class_weight="balanced").fit(X[train], y_index[train] == c)
                               for c in range(n_classes)])
        return cls(fold_of=fold_of, fitted=fitted, n_classes=n_classes)

    def probabilities(self, X) -> np.ndarray:
        """[n, n_classes] out-of-fold P(is class c) of activations X [n, width] (rows in stimulus order)."""
        X = np.asarray(X, np.float64)
        out = np.zeros((len(X), self.n_classes))
        for fold, probes in enumerate(self.fitted):
            rows = self.fold_of == fold
            if rows.any():
                out[rows] = np.stack([probe.predict_proba(X[rows])[:, 1] for probe in probes], axis=1)
        return out


@dataclass(eq=False)
class Baseline:
    """The clean run an experiment perturbs, and everything estimated from it (all at `resid_post`)."""

    model: str
    stimuli: StimulusSet  # the subsample
    layer: int  # L: where interventions act
    readout_layer: int  # R: where the category is read out
    classes: list[str]
    y: np.ndarray  # [n] class index of each stimulus
    groups: np.ndarray  # [n] word of each stimulus
    at_layer: np.ndarray  # [n, d_model] clean, word-pooled, at L
    at_readout: np.ndarray  # [n, d_model] clean, word-pooled, at R
    directions: np.ndarray  # [n_classes, d_model] unit class-mean differences at L, on every word (description only)
    readout_directions: np.ndarray  # [n_classes, d_model] the same at R
    separation: np.ndarray  # [n_classes] (mean of the class - mean of the rest) . readout direction, at R
    fold_directions: np.ndarray  # [folds, n_classes, d_model] the same at L from each fold's training words
    fold_readout_directions: np.ndarray  # [folds, n_classes, d_model] at R, from each fold's training words
    fold_separation: np.ndarray  # [folds, n_classes] separation at R on each fold's training words
    clean_auc: np.ndarray  # [n_classes] held-out clean one-vs-rest AUC of the readout
    clean_auc_ci: np.ndarray  # [n_classes, 2] its word-bootstrap 95% interval
    testable: np.ndarray  # bool [n_classes]: the held-out clean readout beats chance (interval above 0.5)
    typical_norm: float  # median ||x|| at L: the unit of steering strengths
    final_norm: np.ndarray  # [n, d_model] clean last-token final-norm vectors: the next-token reference
    probe: ReadoutProbe
    clean_probabilities: np.ndarray  # [n, n_classes] out of fold
    weights: np.ndarray  # [B, n] word-bootstrap weights shared by every interval
    scan_folder: str
    rerun_error: float  # max |rerun - scan| / max |scan| at L and R: the in-memory run must equal the scan
    seed: int
    batch_size: int = 32
    passes: int = field(default=0)  # runs over the stimuli so far (the clean rerun included, the scan not)

    def describe(self) -> dict:
        return {"model": self.model, "site": SITE, "layer": self.layer, "readout_layer": self.readout_layer,
                "n_stimuli": len(self.stimuli), "n_words": int(len(np.unique(self.groups))),
                "classes": self.classes, "typical_norm": self.typical_norm, "scan": self.scan_folder,
                "rerun_matches_scan": self.rerun_error, "seed": self.seed, "model_runs": self.passes,
                "directions": "class-mean difference (mean of the category - mean of the rest) of the clean "
                              f"word-pooled {SITE}, unit length, cross-fitted: each stimulus's from its fold's "
                              "training words",
                "clean_auc": dict(zip(self.classes, self.clean_auc.tolist())),
                "clean_auc_ci": dict(zip(self.classes, self.clean_auc_ci.tolist())),
                "testable": [c for c, ok in zip(self.classes, self.testable) if ok],
                "untestable": [c for c, ok in zip(self.classes, self.testable) if not ok],
                "readout": f"logistic probe on clean {SITE} at layer {self.readout_layer}, {len(self.probe.fitted)} "
                           "word-grouped folds, scored out of fold",
                "intervals": f"95% bootstrap over words ({self.weights.shape[0]} resamples), paired with the clean run"}

    @property
    def fold_of(self) -> np.ndarray:
        """[n] the fold that holds each stimulus's word out."""
        return self.probe.fold_of

    def by_fold(self, rows, interventions_of) -> list[tuple[np.ndarray, list]]:
        """run_groups' groups: `rows` split by fold, each under interventions_of(fold) (cross-fitting)."""
        rows = np.asarray(rows, np.int64)
        return [(rows[self.fold_of[rows] == fold], interventions_of(fold))
                for fold in range(len(self.fold_directions)) if np.any(self.fold_of[rows] == fold)]

    def concept_shift(self, readout: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """[n] how far each stimulus moved toward its target category at R, in units of that category's
        clean separation (1 = as far as the category's mean lies from the rest's); direction and
        separation come from the stimulus's own fold's training words."""
        folds = self.fold_of
        moved = np.einsum("nd,nd->n", np.asarray(readout, np.float64) - self.at_readout,
                          self.fold_readout_directions[folds, targets])
        return moved / self.fold_separation[folds, targets]

    def probability_change(self, readout: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """[n] change of the readout probe's P(target category) of each stimulus."""
        rows = np.arange(len(targets))
        return self.probe.probabilities(readout)[rows, targets] - self.clean_probabilities[rows, targets]


def prepare_baseline(model, stimuli: StimulusSet, *, layer: int | None = None, readout_layer: int | None = None,
                     per_category: int | None = DEFAULT_WORDS_PER_CATEGORY, frames: int | None = None,
                     seed: int = 0, say: Say = quiet, scan_progress=None) -> Baseline:
    """Subsample, scan (cached), rerun clean in memory, and estimate directions and the readout probe."""
    from ..analysis.directions import class_mean_directions
    from ..capture.scan import ScanSettings, cached_scan
    from .runs import run_stimuli

    layer, readout_layer = check_layers(model, layer, readout_layer)
    subset = subsample_words(stimuli, per_category, seed, frames)
    classes, y, groups = subset.categories, subset.labels, subset.groups
    if len(classes) < 2:
        raise MlxscanError(f"the stimuli hold one category ({classes[0]!r}); the experiments need at least two")
    say(f"scanning {len(subset)} stimuli ({len(np.unique(groups))} words) with {model.ref} ({SITE}, pool word; cached)")
    scan = cached_scan(model, subset, ScanSettings(sites=(SITE,), pool="word"), progress=scan_progress)
    at_layer = np.asarray(scan.layer(SITE, layer), np.float64)
    at_readout = np.asarray(scan.layer(SITE, readout_layer), np.float64)
    say("clean rerun in memory (the next-token reference)")
    clean = run_stimuli(model, subset, layers=(layer, readout_layer), next_token=True)
    rerun_error = max(_relative_difference(clean.layer(SITE, layer), at_layer),
                      _relative_difference(clean.layer(SITE, readout_layer), at_readout))
    directions, _ = class_mean_directions(at_layer, y)
    readout_directions, _ = class_mean_directions(at_readout, y)
    readout_directions = readout_directions.astype(np.float64)
    separation = np.array([(at_readout[y == c].mean(0) - at_readout[y != c].mean(0)) @ readout_directions[c]
                           for c in range(len(classes))])
    probe = ReadoutProbe.fit(at_readout, y, groups, seed)
    fold_directions, fold_readout, fold_separation = cross_fitted_directions(at_layer, at_readout, y, probe.fold_of)
    clean_probabilities = probe.probabilities(at_readout)
    weights = word_resample_weights(groups, seed)
    clean_auc, clean_auc_ci, testable = beats_chance(y, clean_probabilities, weights)
    return Baseline(
        model=model.ref, stimuli=subset, layer=layer, readout_layer=readout_layer, classes=list(classes), y=y,
        groups=groups, at_layer=at_layer, at_readout=at_readout, directions=directions.astype(np.float64),
        readout_directions=readout_directions, separation=separation, fold_directions=fold_directions,
        fold_readout_directions=fold_readout, fold_separation=fold_separation, clean_auc=clean_auc,
        clean_auc_ci=clean_auc_ci, testable=testable,
        typical_norm=float(np.median(np.linalg.norm(at_layer, axis=1))), final_norm=clean.last_final_norm,
        probe=probe, clean_probabilities=clean_probabilities,
        weights=weights, scan_folder=str(scan.folder), rerun_error=rerun_error,
        seed=seed, passes=1)


def cross_fitted_directions(at_layer, at_readout, y, fold_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per fold, from its training stimuli only: ([F, K, d] unit directions at L, [F, K, d] at R, [F, K]
    separation at R), so an arm applied to a held-out word never used that word."""
    from ..analysis.directions import class_mean_directions

    at_layer, at_readout = np.asarray(at_layer, np.float64), np.asarray(at_readout, np.float64)
    at_l, at_r, separations = [], [], []
    for fold in range(int(fold_of.max()) + 1):
        train = fold_of != fold
        directions, _ = class_mean_directions(at_layer[train], y[train])
        readout, _ = class_mean_directions(at_readout[train], y[train])
        readout = readout.astype(np.float64)
        X, labels = at_readout[train], y[train]
        separations.append([(X[labels == c].mean(0) - X[labels != c].mean(0)) @ readout[c]
                            for c in range(len(readout))])
        at_l.append(directions.astype(np.float64)), at_r.append(readout)
    return np.stack(at_l), np.stack(at_r), np.asarray(separations, np.float64)


def beats_chance(y, probabilities, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([K] held-out one-vs-rest AUC, [K, 2] word-bootstrap 95% interval, bool [K] interval above 0.5).

    A readout that does not beat chance has no category to remove: measuring a loss from it would count
    noise (or the below-chance AUC of a balanced design's held-out words) as a destroyed concept."""
    point = ovr_auc(y, probabilities)[0]
    boot = ovr_auc(y, probabilities, weights)
    ci = np.array([interval(boot[:, c]) for c in range(boot.shape[1])])
    return point, ci, ci[:, 0] > 0.5


def _relative_difference(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(float(np.max(np.abs(b))), 1e-30))


@dataclass(frozen=True, eq=False)
class ArmRun:
    """One perturbed run of the baseline's stimuli (rows in stimulus order)."""

    readout: np.ndarray  # [n, d_model] word-pooled at R
    final_norm: np.ndarray | None  # [n, d_model] last token after the final norm, when asked for
    relative_change: dict[str, float]  # intervention -> mean ||change|| / ||activation|| it made at its site


def run_groups(model, baseline: Baseline, groups: Sequence[tuple[np.ndarray, Sequence]], *,
               next_token: bool = False) -> ArmRun:
    """Run each group of rows (indices into the baseline's stimuli) under its own interventions, and
    stitch the results back into stimulus order. Rows in no group keep their clean values."""
    from dataclasses import replace

    from .runs import run_stimuli

    readout = baseline.at_readout.copy()
    final = baseline.final_norm.copy() if next_token else None
    changes: dict[str, float] = {}
    for rows, interventions in groups:
        rows = np.asarray(rows, np.int64)
        if rows.size == 0:
            continue
        subset = replace(baseline.stimuli, path=None, stimuli=tuple(baseline.stimuli[int(i)] for i in rows))
        run = run_stimuli(model, subset, layers=(baseline.readout_layer,), interventions=interventions,
                          next_token=next_token, batch_size=baseline.batch_size)
        readout[rows] = run.layer(SITE, baseline.readout_layer)
        if next_token:
            final[rows] = run.last_final_norm
        for kind, value in run.effects.items():  # named by kind: each group's vector differs
            kind = kind.split("(")[0]
            changes[kind] = changes.get(kind, 0.0) + value * rows.size
    baseline.passes += 1
    total = sum(len(rows) for rows, _ in groups) or 1
    return ArmRun(readout=readout, final_norm=final,
                  relative_change={kind: value / total for kind, value in changes.items()})


def run_all(model, baseline: Baseline, interventions: Sequence, *, next_token: bool = False) -> ArmRun:
    """Every stimulus under the same interventions."""
    return run_groups(model, baseline, [(np.arange(len(baseline.stimuli)), interventions)], next_token=next_token)
