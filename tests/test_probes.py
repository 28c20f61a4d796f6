"""Probes on synthetic activations with planted answers (NumPy and scikit-learn only; no mlx)."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_val_predict, cross_val_score

from mlxscan.analysis import probes
from mlxscan.analysis.probe_depth import concept_rank, mlp_gap, retention
from mlxscan.analysis.probes import (decodable_span, holm_reject, linear_probe, make_folds, permute_labels_by_group,
                                     probe_layers)
from mlxscan.analysis.logistic import fit_many, out_of_fold_probabilities
from mlxscan.errors import MlxscanError


def words_and_labels(n_classes, words_per_class, frames):
    """y and groups for n_classes x words_per_class words, each seen in `frames` sentences."""
    word_class = np.repeat(np.arange(n_classes), words_per_class)  # [n_words]
    word = np.repeat(np.arange(len(word_class)), frames)  # [n]
    return word_class[word], np.array([f"w{w}" for w in word]), word


def planted_layers(seed, strengths, n_classes=4, words_per_class=6, frames=6, width=16, word_sd=0.5):
    """X [n, n_layers, width]: in layer l, class c sits strengths[l] along its own random unit direction,
    plus a per-word offset (so words differ within a class) and unit noise per stimulus."""
    rng = np.random.default_rng(seed)
    y, groups, word = words_and_labels(n_classes, words_per_class, frames)
    layers = []
    for strength in strengths:
        directions = rng.standard_normal((n_classes, width))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        word_offset = word_sd * rng.standard_normal((word.max() + 1, width))
        layers.append(strength * directions[y] + word_offset[word] + rng.standard_normal((len(y), width)))
    return np.stack(layers, axis=1), y, groups


def test_planted_signal_is_found_and_noise_is_not():
    X, y, groups = planted_layers(3, strengths=[4.0, 3.0, 0.0, 0.0])
    report = probe_layers(X, y, groups, permutations=20, early_stop=False, n_jobs=1)
    signal, noise = report.layers[:2], report.layers[2:]
    assert report.chance == 0.25 and report.majority_rate == 0.25 and report.n_classes == 4
    for layer in signal:
        assert layer.accuracy > 0.8 and layer.accuracy_ci[0] > 0.7 and layer.auc > 0.95
        assert layer.p_empirical == 1 / 21  # the floor 1 / (permutations + 1): no null run came close
        assert layer.p_gaussian < 1e-6
    for layer in noise:
        # Pooled out-of-fold scores run a little below chance on noise (each fold's model is pulled away
        # from its held-out words), so the check is "not above chance" rather than "centred on it".
        assert layer.accuracy_ci[0] <= report.chance <= layer.accuracy_ci[1]
        assert layer.auc_ci[0] <= 0.5
        assert layer.p_empirical > 0.1 and layer.p_gaussian > 0.05
        assert abs(layer.null_mean - report.chance) < 0.05
    assert decodable_span([layer.p_gaussian for layer in signal]) == 1.0
    assert report.decodable_span() == 0.5  # the two signal layers of four, the noise layers not counted


def test_p_gaussian_is_exact_for_few_normal_null_draws():
    # Observed and null accuracies drawn from one normal: a valid p-value is <= 0.05 in 5% of draws
    # whatever the number of null draws. A normal tail with the sd estimated from 5 draws is not.
    rng = np.random.default_rng(0)
    draws = 0.25 + 0.03 * rng.standard_normal((20000, 6))
    p_values = np.array([probes._p_values(row[0], row[1:])[1] for row in draws])
    assert 0.045 < np.mean(p_values <= 0.05) < 0.055
    assert 0.009 < np.mean(p_values <= 0.01) < 0.012
    from scipy.stats import norm
    naive = norm.sf(draws[:, 0], draws[:, 1:].mean(axis=1), draws[:, 1:].std(axis=1, ddof=1))
    assert np.mean(naive <= 0.05) > 0.07


def test_early_verdicts_keep_errors_and_power_where_they_matter():
    # 4 layers: significant below 0.05 / (10 * 4); 0.5 is given up against the bar 0.05 (cutoff ~0.32),
    # which then drops to 0.025 for the rest (cutoff ~0.26): 0.2 stays open, as does an unknown p.
    assert probes.early_verdicts([1e-5, 0.5, 0.2, float("nan")], draws=5) == ["significant", "not significant",
                                                                             None, None]
    # Each layer given up lowers the bar for the others: 0.25 (open against 0.05) goes once three go at 0.4.
    assert probes.early_verdicts([0.25, 0.4, 0.4, 0.4], draws=5) == ["not significant"] * 4
    assert probes.early_verdicts([3e-3, 3e-3], draws=5) == [None, None]  # 3e-3 > 0.05 / 20: not yet

    from scipy.stats import norm
    rng = np.random.default_rng(1)

    def first_look_p(true_p, draws=20000):
        # A layer whose accuracy sits at its null's (1 - true_p) quantile, seen through FIRST_LOOK null draws.
        null = rng.standard_normal((draws, probes.FIRST_LOOK))
        return np.array([probes._p_values(norm.isf(true_p), row)[1] for row in null])

    # A layer exactly at the bar is given up FUTILITY_LOSS (1%) of the time: ~200 of 20,000 draws.
    for bar in (0.05, 0.0025):
        lost = np.sum(first_look_p(bar) > probes.futility_cutoff(bar, probes.FIRST_LOOK))
        assert 150 < lost < 250, (bar, lost)
    # No signal at any of 30 layers: an early "significant" has probability 0.05 / 300 (~3 of 20,000 draws).
    null_layer = np.array([probes._p_values(row[0], row[1:])[1]
                           for row in rng.standard_normal((20000, 1 + probes.FIRST_LOOK))])
    assert np.sum(null_layer <= 0.05 / (probes.EARLY_SHARE * 30)) <= 12


def test_early_stop_spends_permutations_only_where_the_verdict_is_open():
    # Layer 0 is far above its null, layer 1 is noise, layer 2 is weak: only layer 2 needs all 12 shuffles.
    X, y, groups = planted_layers(5, strengths=[6.0, 0.0, 1.05])
    early = probe_layers(X, y, groups, permutations=12, n_jobs=1)
    full = probe_layers(X, y, groups, permutations=12, early_stop=False, n_jobs=1)
    assert [layer.settled_early for layer in early.layers] == ["significant", "not significant", None]
    assert [layer.permutations_run for layer in early.layers] == [5, 5, 12]
    assert [layer.permutations_run for layer in full.layers] == [12, 12, 12]
    assert np.isnan(early.null_accuracies[:2, 5:]).all() and not np.isnan(early.null_accuracies[2]).any()
    # The shuffles both ran are the same fits: the real labels' numbers and the null draws agree exactly.
    np.testing.assert_array_equal(early.oof_probabilities, full.oof_probabilities)
    np.testing.assert_array_equal(early.null_accuracies[:, :5], full.null_accuracies[:, :5])
    assert early.layers[2] == full.layers[2]
    # The weak layer is significant after Holm only with all its shuffles (p 0.07 after the first 5).
    assert 0.01 < probes._p_values(early.layers[2].accuracy, early.null_accuracies[2, :5])[1] <= 0.3
    assert early.layers[2].p_gaussian < 0.025
    assert early.decodable_span() == full.decodable_span() == 2 / 3
    summary = json.loads(json.dumps(early.to_dict(), allow_nan=False))
    assert summary["first_look"] == 5 and summary["early_stop"] is True
    assert summary["layers"][0]["permutations_run"] == 5


def test_early_stop_edge_cases_keep_layers_apart_and_open():
    X, y, groups = planted_layers(5, strengths=[6.0, 0.0, 1.05])
    # A layer listed twice is probed twice, each copy with its own second batch.
    twice = probe_layers(X, y, groups, layers=[2, 2, 0], permutations=7, n_jobs=1)
    assert [layer.permutations_run for layer in twice.layers] == [7, 7, 5]
    assert twice.layers[0] == twice.layers[1]
    # Shuffles that all score alike at the first look give no spread to judge by: the layer stays open.
    constant = np.zeros((len(y), 1, 16))
    flat = probe_layers(constant, y, groups, permutations=7, n_jobs=1)
    assert flat.layers[0].settled_early is None and flat.layers[0].permutations_run == 7
    assert probes.early_verdicts([], draws=5) == []
    # The report keeps the level its early verdicts used, and its span uses it too.
    lenient = probe_layers(X, y, groups, permutations=7, alpha=0.2, n_jobs=1)
    assert lenient.alpha == 0.2 and lenient.to_dict()["decodable_span"]["alpha"] == 0.2


def test_word_identity_leaks_through_ungrouped_folds_only():
    # Every word is its own random vector and category is only a lookup from the word: a probe can
    # learn word -> category from a word's other sentences, which grouped folds never show it.
    rng = np.random.default_rng(1)
    y, groups, word = words_and_labels(n_classes=4, words_per_class=8, frames=6)
    X = 4.0 * rng.standard_normal((word.max() + 1, 48))[word] + rng.standard_normal((len(y), 48))
    ungrouped = cross_val_score(linear_probe(), X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0)).mean()
    report = probe_layers(X[:, None, :], y, groups, permutations=20, n_jobs=1)
    grouped = report.layers[0]
    assert ungrouped > 0.9
    assert grouped.accuracy_ci[0] <= 0.25 <= grouped.accuracy_ci[1] and grouped.accuracy < 0.45
    assert grouped.p_gaussian > 0.05


def test_probes_equal_a_plain_scikit_learn_fit_to_its_optimum():
    # The batched solver and scikit-learn minimize one objective; fitted to a tight tolerance both sit
    # at its optimum, so out-of-fold probabilities agree to the solvers' tolerance.
    X, y, groups = planted_layers(2, strengths=[1.0, 1.5])
    report = probe_layers(X, y, groups, layers=[1], permutations=0, n_jobs=1)
    folds = PredefinedSplit(report.fold_of)
    features = X[:, 1].astype(np.float64)
    reference = linear_probe(tol=1e-10)
    predicted = cross_val_predict(reference, features, y, cv=folds)
    probabilities = cross_val_predict(reference, features, y, cv=folds, method="predict_proba")
    assert report.layers[0].accuracy == np.mean(predicted == y)
    # 3e-4: the float32 products stop both the old and the refreshed solver ~2e-4 from a float64 optimum.
    np.testing.assert_allclose(report.oof_probabilities[0], probabilities, atol=3e-4)
    assert report.layers[0].auc == pytest.approx(roc_auc_score(y, probabilities, multi_class="ovr", average="macro"),
                                                 abs=1e-3)


def test_parallel_fits_give_the_same_report_and_memory_maps_work(tmp_path):
    X, y, groups = planted_layers(3, strengths=[2.0, 0.0])
    path = tmp_path / "x.npy"
    np.save(path, X.astype(np.float32))
    mapped = np.load(path, mmap_mode="r")  # read-only, as a scan hands it over
    seen = []
    parallel = probe_layers(mapped, y, groups, permutations=4, n_jobs=2, progress=lambda *a: seen.append(a))
    sequential = probe_layers(mapped, y, groups, permutations=4, n_jobs=1)
    assert parallel.layers == sequential.layers
    np.testing.assert_array_equal(parallel.null_accuracies, sequential.null_accuracies)
    assert seen == [(1, 2), (2, 2)]


def test_report_serializes_and_exposes_its_arrays():
    X, y, groups = planted_layers(4, strengths=[2.0, 0.0, 1.0])
    report = probe_layers(X, y, groups, layers=[0, 2], permutations=3, n_jobs=1)
    summary = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [layer["layer"] for layer in summary["layers"]] == [0, 2]
    arrays = report.arrays()
    assert arrays["oof_probabilities"].shape == (2, len(y), 4)
    assert arrays["null_accuracies"].shape == (2, 3)
    assert arrays["fold_of"].shape == (len(y),)
    np.testing.assert_allclose(arrays["oof_probabilities"].sum(axis=2), 1.0)
    no_null = probe_layers(X, y, groups, layers=[0], permutations=0, n_jobs=1)
    assert np.isnan(no_null.layers[0].p_gaussian)
    json.dumps(no_null.to_dict(), allow_nan=False)  # NaN p-values become null


def test_folds_keep_each_word_on_one_side_and_balance_classes():
    y, groups, _ = words_and_labels(n_classes=10, words_per_class=12, frames=10)  # the category study's design
    fold_of = make_folds(y, groups, folds=5, seed=0)
    for word in np.unique(groups):
        assert len(np.unique(fold_of[groups == word])) == 1
    for fold in range(5):
        counts = np.bincount(y[fold_of == fold], minlength=10)
        assert counts.min() >= 20 and counts.max() <= 30  # 2 or 3 of each class's 12 words per fold


def test_permuted_labels_move_whole_words():
    y, groups, _ = words_and_labels(n_classes=3, words_per_class=5, frames=4)
    rng = np.random.default_rng(0)
    changed = False
    for _ in range(10):
        permuted = permute_labels_by_group(y, groups, rng)
        for word in np.unique(groups):
            assert len(np.unique(permuted[groups == word])) == 1
        assert np.array_equal(np.bincount(permuted), np.bincount(y))  # equal-sized words: class sizes kept
        changed |= not np.array_equal(permuted, y)
    assert changed
    mixed = y.copy()
    mixed[0] = 1 - mixed[0]
    with pytest.raises(MlxscanError, match="one label per group"):
        permute_labels_by_group(mixed, groups, rng)


def test_holm_by_hand():
    # m = 4, sorted 0.005 <= .05/4, 0.01 <= .05/3, then 0.03 > .05/2 stops: 0.04 stands though it is < .05.
    np.testing.assert_array_equal(holm_reject([0.01, 0.04, 0.03, 0.005]), [True, False, False, True])
    assert decodable_span([0.01, 0.04, 0.03, 0.005]) == 0.5
    # 0.001 <= .05/3, 0.02 <= .05/2, 0.024 <= .05: all three (Bonferroni, .05/3 each, would keep one).
    assert decodable_span([0.02, 0.001, 0.024]) == 1.0
    assert decodable_span([0.5, 0.001, 0.02]) == pytest.approx(2 / 3)
    assert decodable_span([0.2, 0.3]) == 0.0
    with pytest.raises(MlxscanError, match="in \\[0, 1\\]"):
        decodable_span([0.1, float("nan")])


def test_weighted_auc_matches_scikit_learn_with_ties_and_duplicates():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    scores = np.round(rng.random((60, 3)), 1)  # coarse scores: many ties
    ours = probes._weighted_ovr_auc(y, scores, np.ones((1, 60)))[0]
    theirs = [roc_auc_score(y == c, scores[:, c]) for c in range(3)]
    np.testing.assert_allclose(ours, theirs)
    # A weight of k counts a stimulus k times: what the cluster bootstrap relies on.
    weights = rng.integers(0, 3, 60)
    duplicated = np.repeat(np.arange(60), weights)
    ours = probes._weighted_ovr_auc(y, scores, weights[None].astype(float))[0]
    theirs = [roc_auc_score(y[duplicated] == c, scores[duplicated, c]) for c in range(3)]
    np.testing.assert_allclose(ours, theirs)


def test_weighted_auc_by_word_columns_equals_the_sorted_pass():
    # Word-bootstrap weights (few distinct columns) take the quadratic-form path; any weights the sorted one.
    rng = np.random.default_rng(6)
    y, groups, _ = words_and_labels(n_classes=4, words_per_class=5, frames=6)
    scores = np.round(rng.random((len(y), 4)), 2)  # ties within and across words
    weights = probes._resample_weights(groups, seed=0, resamples=200)
    np.testing.assert_allclose(probes._weighted_ovr_auc(y, scores, weights),
                               probes._weighted_ovr_auc_sorted(y, scores, weights), rtol=1e-12)
    arbitrary = rng.random((50, len(y)))
    np.testing.assert_array_equal(probes._weighted_ovr_auc(y, scores, arbitrary),
                                  probes._weighted_ovr_auc_sorted(y, scores, arbitrary))
    absent = weights.copy()
    absent[:, y == 2] = 0  # a class no resample drew: NaN on both paths
    assert np.isnan(probes._weighted_ovr_auc(y, scores, absent)[:, 2]).all()


def test_rank_one_classes_have_ratio_one():
    X, y, groups = planted_layers(6, strengths=[4.0])
    result = concept_rank(X[:, 0], y, groups)
    assert result.mean_ratio >= 0.95
    assert min(result.probe_auc) > 0.9


def test_a_class_between_two_others_is_not_one_direction():
    # Three classes at -2, 0, +2 along one axis: the middle class has no mean difference from the rest,
    # yet the multinomial probe isolates it with two half-spaces.
    rng = np.random.default_rng(7)
    y, groups, word = words_and_labels(n_classes=3, words_per_class=8, frames=6)
    X = 0.5 * rng.standard_normal((len(y), 8))
    X[:, 0] += 2.0 * (y - 1) + 0.2 * rng.standard_normal(word.max() + 1)[word]
    result = concept_rank(X, y, groups)
    assert result.probe_auc[1] > 0.95
    assert result.single_direction_auc[1] < 0.7 and result.ratio[1] < 0.75
    assert min(result.ratio[0], result.ratio[2]) > 0.95
    assert result.mean_ratio < 0.92


def test_retention_is_one_on_separable_additive_data():
    X, y, groups = planted_layers(8, strengths=[4.0])
    result = retention(X[:, 0], y, groups, n_jobs=1)
    assert result.mean_retention >= 0.95
    assert min(result.dedicated_balanced_accuracy) > 0.9


def shells(seed, n_classes=3, words_per_class=16, frames=4, width=2):
    """Class = radius of a point in the first two dimensions (concentric rings): no mean difference at all."""
    rng = np.random.default_rng(seed)
    y, groups, word = words_and_labels(n_classes, words_per_class, frames)
    angle = rng.uniform(0, 2 * np.pi, word.max() + 1)[word]
    X = 0.15 * rng.standard_normal((len(y), width))
    X[:, 0] += (1 + y) * np.cos(angle)
    X[:, 1] += (1 + y) * np.sin(angle)
    return X, y, groups


# Adam takes one or two steps an epoch on 150 stimuli, so max_iter ends the fit before it settles;
# on a scan (960 training stimuli) it converges in ~40 epochs.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_finds_what_no_linear_probe_can():
    X, y, groups = shells(9)
    result = mlp_gap(X, y, groups, hidden=64, n_jobs=1)
    assert result.linear_accuracy < 0.5
    assert result.mlp_accuracy > 0.75
    assert result.gap_ci[0] > 0.2


def test_mlp_adds_nothing_on_linear_data():
    X, y, groups = planted_layers(10, strengths=[3.0])
    result = mlp_gap(X[:, 0], y, groups, hidden=64, n_jobs=1)
    assert result.linear_accuracy > 0.7
    assert result.gap_ci[0] <= 0 <= result.gap_ci[1] and result.gap < 0.05


def test_bad_input_says_what_is_wrong():
    X, y, groups = planted_layers(11, strengths=[1.0])
    with pytest.raises(MlxscanError, match="must match"):
        probe_layers(X, y[:-1], groups)
    with pytest.raises(MlxscanError, match="one class only"):
        probe_layers(X, np.zeros_like(y), groups)
    with pytest.raises(MlxscanError, match="groups cannot fill 5 folds"):
        probe_layers(X, y, np.array(["a", "b", "c", "d"])[y])
    with pytest.raises(MlxscanError, match=r"\[n_stimuli, n_layers, width\]"):
        probe_layers(X[:, 0], y, groups)
    with pytest.raises(MlxscanError, match="positions in 0..0"):
        probe_layers(X, y, groups, layers=[3])
    with pytest.raises(MlxscanError, match="at least 2 words per class"):
        concept_rank(X[:, 0], np.r_[np.zeros(6, int), np.ones(len(y) - 6, int)], groups)
    broken = X.copy()
    broken[0, 0, 0] = np.nan
    with pytest.raises(MlxscanError, match="layer 0 holds NaN"):
        probe_layers(broken, y, groups, permutations=0, n_jobs=1)


# ---------------------------------------------------------------------------------------------
# The batched solver behind every multinomial probe (analysis/logistic.py)


def solver_problems(seed=12, n=240, width=12):
    """X with features on very different scales and offsets, and four problems on it: the planted labels
    on two different training sets, shuffled labels, and a two-class problem (scikit-learn's binomial)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = (rng.standard_normal((n, width)) + 1.5 * rng.standard_normal((3, width))[y]) * rng.uniform(0.1, 20, width)
    X += rng.uniform(-50, 50, width)
    labels = np.stack([y, y, rng.permutation(y), np.where(y == 2, 1, y)])
    train = np.stack([np.arange(n) % 4 != 0, np.arange(n) % 4 != 1, np.arange(n) % 5 != 0, np.arange(n) % 3 != 0])
    return X, labels, train


def test_each_batched_fit_is_the_scikit_learn_pipeline_fit():
    X, labels, train = solver_problems()
    fits = fit_many(X, labels, train, n_classes=3, tol=1e-8)
    probabilities = fits.predict_proba(X)
    assert fits.converged.all()
    for p in range(len(labels)):
        pipeline = linear_probe(tol=1e-10).fit(X[train[p]], labels[p, train[p]])
        scaler, model = pipeline[0], pipeline[-1]
        np.testing.assert_allclose(fits.mean[p], scaler.mean_, rtol=1e-10)
        np.testing.assert_allclose(fits.scale[p], scaler.scale_, rtol=1e-10)
        present = model.classes_
        expected = np.zeros((len(X), 3))
        expected[:, present] = pipeline.predict_proba(X)
        np.testing.assert_allclose(probabilities[p], expected, atol=5e-4)  # float32 products: ~1e-4 at best
        if len(present) == 2:  # binomial: one coefficient vector, the difference of the two rows
            assert np.isneginf(fits.intercept[p, 2]) and not fits.coef[p, 2].any()
            np.testing.assert_allclose(fits.coef[p, 1] - fits.coef[p, 0], model.coef_[0], atol=2e-3)
        else:
            np.testing.assert_allclose(fits.coef[p], model.coef_, atol=2e-3)
            np.testing.assert_allclose(fits.intercept[p], model.intercept_, atol=2e-3)


def test_problems_do_not_depend_on_their_batch():
    X, labels, train = solver_problems()
    together = fit_many(X, labels, train, n_classes=3, tol=1e-6)
    alone = fit_many(X, labels[2:3], train[2:3], n_classes=3, tol=1e-6)
    assert together.n_iter[2] == alone.n_iter[0]
    np.testing.assert_allclose(together.coef[2], alone.coef[0], atol=1e-5)


def test_preconditioning_pays_off_where_a_few_directions_dominate():
    # Shuffled labels on features with four huge shared directions (as in an untrained network's
    # residual stream): plain L-BFGS, scikit-learn's, needs several times the steps.
    rng = np.random.default_rng(13)
    n, width = 300, 40
    X = rng.standard_normal((n, width)) + 10 * rng.standard_normal((n, 4)) @ rng.standard_normal((4, width))
    y = rng.integers(0, 4, n)
    fits = fit_many(X, y[None], np.ones((1, n), dtype=bool), n_classes=4, tol=1e-5)
    plain = linear_probe(tol=1e-5).fit(X, y)[-1]
    assert fits.converged.all()
    assert 3 * fits.n_iter[0] < plain.n_iter_[0]


def test_stopping_constant_features_and_absent_classes():
    X, labels, train = solver_problems()
    assert not fit_many(X, labels, train, n_classes=3, max_iter=2).converged.any()
    constant = np.c_[X, np.full(len(X), 7.0)]
    fits = fit_many(constant, labels, train, n_classes=3, tol=1e-6)
    assert np.isfinite(fits.predict_proba(constant)).all() and not fits.coef[:, :, -1].any()
    # Class 2 never trains in fold 0: it gets probability 0 there, as scikit-learn (which never sees it) gives.
    folds = np.arange(len(X)) % 2
    only_two = np.where((labels[0] == 2) & (folds == 1), 0, labels[0])
    probabilities = out_of_fold_probabilities(X, only_two, folds, n_classes=3)
    assert (probabilities[0, folds == 0, 2] == 0).all() and (probabilities[0, folds == 1, 2] > 0).all()
    with pytest.raises(MlxscanError, match="class indices in 0..2"):
        fit_many(X, labels + 1, train, n_classes=3)
    with pytest.raises(MlxscanError, match="must both be"):
        fit_many(X, labels, train[:, 1:], n_classes=3)


def test_compact_direction_is_the_two_loop_recursion():
    # The solver's direction (compact form, float32 memory) against the textbook two-loop recursion in
    # float64, on random curvature pairs: a full ring, a ring with an unused slot, and an empty one.
    from mlxscan.analysis import logistic

    rng = np.random.default_rng(14)
    history, size, n_problems, newest = logistic.HISTORY, 30, 3, 2
    root = rng.standard_normal((size, size))
    M = root @ root.T / size + np.eye(size)  # the preconditioner: any symmetric positive definite matrix
    s = rng.standard_normal((n_problems, history, size))
    y = s @ (2 * np.eye(size) + 0.3 * rng.standard_normal((size, size)) / np.sqrt(size))  # s . y > 0
    grad, gamma = rng.standard_normal((n_problems, size)), rng.uniform(0.5, 2, n_problems)
    used = np.ones((n_problems, history), dtype=bool)
    used[1, (newest + 2) % history] = False
    used[2] = False
    assert (np.einsum("ahn,ahn->ah", s, y) > 0).all()
    memory = np.concatenate([s, y @ M, (grad @ M)[:, None]], axis=1).astype(np.float32)
    batch = logistic._Batch(rows=None, problems=None, theta=None, loss=None, grad=grad.astype(np.float32),
                            memory=memory, projection=np.einsum("ahn,an->ah", memory, grad),
                            sy=np.einsum("ain,ajn->aij", s, y), ymy=np.einsum("ain,ajn->aij", y @ M, y),
                            used=used, gamma=gamma)
    direction = logistic._direction(batch, newest)
    for a in range(n_problems):
        q, alphas = grad[a].copy(), {}
        slots = [(newest - j) % history for j in range(history) if used[a, (newest - j) % history]]  # newest first
        for slot in slots:
            alphas[slot] = s[a, slot] @ q / (s[a, slot] @ y[a, slot])
            q -= alphas[slot] * y[a, slot]
        r = gamma[a] * M @ q
        for slot in reversed(slots):
            r += (alphas[slot] - y[a, slot] @ r / (s[a, slot] @ y[a, slot])) * s[a, slot]
        np.testing.assert_allclose(direction[a], -r, rtol=1e-4, atol=1e-4 * np.abs(r).max())


def test_out_of_fold_fits_at_probe_tolerance_sit_near_the_optimum():
    # The batched solver as `probe_layers` runs it (tol=1e-5, labellings x word-grouped folds) against
    # the same fits run to tol=1e-9: the same held-out predictions, up to a few points near a boundary.
    X, y, groups = planted_layers(15, strengths=[1.5], n_classes=5, words_per_class=8, frames=5, width=40)
    rng = np.random.default_rng(15)
    label_sets = np.stack([y] + [permute_labels_by_group(y, groups, rng) for _ in range(4)])
    fold_sets = np.stack([make_folds(labels, groups, folds=5, seed=0) for labels in label_sets])
    loose = out_of_fold_probabilities(X[:, 0], label_sets, fold_sets, n_classes=5, tol=1e-5)
    tight = out_of_fold_probabilities(X[:, 0], label_sets, fold_sets, n_classes=5, tol=1e-9, max_iter=10_000)
    assert np.abs(loose - tight).max() < 0.02
    assert (loose.argmax(axis=2) != tight.argmax(axis=2)).sum() <= 2
