"""Calibration of the tests behind the causal claims (ablate, steer, invariance) and of every claim that
uses the word bootstrap: under a null, p < 0.05 must happen 5% of the time, within the binomial 99%
interval over the null datasets; with a planted effect of stated size, at least 80% of the time.

Each test prints both figures (`pytest -s` shows them). NumPy and SciPy only: the statistics are the
adapters' own functions on arrays shaped like an experiment's (words x frames, categories as strata).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from mlxscan.study.adapters_causal import _against_draws
from mlxscan.study.evidence import grouped_evidence, prediction_p, weighted_mean

DATASETS = 300
ALPHA = 0.05
WORDS, FRAMES, CATEGORIES = 12, 4, 4  # the smallest design the causal commands accept by default


def null_interval(n: int = DATASETS) -> tuple[float, float]:
    low, high = binom.interval(0.99, n, ALPHA)
    return low / n, high / n


def word_design():
    word = np.repeat(np.arange(WORDS), FRAMES)
    return word.astype(str), (word % CATEGORIES), word


def per_stimulus_effects(rng, word, shift: float) -> np.ndarray:
    """A per-stimulus difference to its control: word effects (frames of one word move together) + noise."""
    return shift + rng.standard_normal(WORDS)[word] + 0.5 * rng.standard_normal(len(word))


def rejection_rate(make_p, rng, n: int = DATASETS) -> float:
    return float(np.mean([make_p(rng, seed) < ALPHA for seed in range(n)]))


def test_the_word_bootstrap_test_is_calibrated_and_has_power():
    groups, strata, word = word_design()

    def p_of(shift):
        return lambda rng, seed: grouped_evidence(weighted_mean(per_stimulus_effects(rng, word, shift)), groups,
                                                  strata=strata, seed=seed, resamples=400).p

    false_positive = rejection_rate(p_of(0.0), np.random.default_rng(0))
    power = rejection_rate(p_of(1.0), np.random.default_rng(1), n=100)  # 1 sd of a word's effect
    low, high = null_interval()
    print(f"word bootstrap t-test: false-positive rate {false_positive:.3f} (99% interval {low:.3f}-{high:.3f}), "
          f"power {power:.2f} at an effect of 1 word-sd with {WORDS} words")
    assert low <= false_positive <= high
    assert power >= 0.8


def test_the_prediction_test_against_random_draws_is_calibrated_and_has_power():
    draws = 10

    def p_of(shift):
        return lambda rng, seed: prediction_p(shift + rng.standard_normal(), rng.standard_normal(draws))

    false_positive = rejection_rate(p_of(0.0), np.random.default_rng(2), n=2000)
    power = rejection_rate(p_of(3.5), np.random.default_rng(3), n=200)
    low, high = null_interval(2000)
    print(f"prediction test among {draws} draws: false-positive rate {false_positive:.3f} (99% interval "
          f"{low:.3f}-{high:.3f}), power {power:.2f} at 3.5 sd of the draws")
    assert low <= false_positive <= high
    assert power >= 0.8


def test_the_claim_against_random_draws_is_calibrated_when_the_own_arm_is_one_more_draw():
    """direction_vs_random and steer.shifts: the own arm no different from the random arms (a direction
    that means nothing) must pass both the word bootstrap and the draws' tail only 5% of the time or less."""
    groups, strata, word = word_design()
    draws = 10

    def p_of(shift):
        def p(rng, seed):
            arms = np.stack([per_stimulus_effects(rng, word, 0.0) for _ in range(draws + 1)])  # [draws + 1, n]
            arms[0] += shift
            own, random = arms[0], arms[1:]
            evidence = grouped_evidence(weighted_mean(own - random.mean(axis=0)), groups, strata=strata, seed=seed,
                                        resamples=300)
            return _against_draws(evidence, float(own.mean()), random.mean(axis=1)).p
        return p

    false_positive = rejection_rate(p_of(0.0), np.random.default_rng(4), n=DATASETS)
    power = rejection_rate(p_of(2.0), np.random.default_rng(5), n=100)
    _, high = null_interval()
    print(f"own arm vs {draws} random arms: false-positive rate {false_positive:.3f} (at most {high:.3f}), "
          f"power {power:.2f} at 2 word-sd")
    assert false_positive <= high  # the larger of two p-values: conservative by construction
    assert power >= 0.8


def test_degenerate_nulls_give_no_p():
    assert np.isnan(prediction_p(1.0, np.zeros(10)))  # every draw equal
    assert np.isnan(prediction_p(1.0, [0.3]))  # one draw has no spread
    groups, strata, _ = word_design()
    constant = grouped_evidence(weighted_mean(np.ones(len(groups))), groups, strata=strata)
    assert np.isnan(constant.p)  # every resample agrees on an effect: no spread to judge it by
    nothing = grouped_evidence(weighted_mean(np.zeros(len(groups))), groups, strata=strata)
    assert nothing.p == 1.0  # every resample agrees there is no effect


def test_calibration_figures_are_reproducible():
    groups, strata, word = word_design()
    values = per_stimulus_effects(np.random.default_rng(9), word, 0.0)
    a = grouped_evidence(weighted_mean(values), groups, strata=strata, seed=3)
    b = grouped_evidence(weighted_mean(values), groups, strata=strata, seed=3)
    assert a == b


def test_null_tail_is_the_prediction_test_and_degenerate_nulls_are_untestable():
    from mlxscan.study.adapters import null_tail

    rng = np.random.default_rng(7)
    false_positive = np.mean([null_tail(rng.standard_normal(), rng.standard_normal(20)) < ALPHA for _ in range(2000)])
    low, high = null_interval(2000)
    print(f"null_tail among 20 draws: false-positive rate {false_positive:.3f} (99% interval {low:.3f}-{high:.3f})")
    assert low <= false_positive <= high
    assert np.isnan(null_tail(1.0, np.full(20, 0.5)))  # once 1e-16
