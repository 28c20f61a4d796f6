"""The numbers a claim needs, from per-stimulus arrays: effect, 95% CI, p-value and a split-half replication.

Words are the unit of chance (a stimulus is one word in one frame, and frames of one word are not
independent), so every resampling draws whole words: the interval is a cluster bootstrap over words,
the p-value a t-test on the bootstrap's standard error (G - 1 degrees of freedom), and the replication recomputes the effect on
two word-disjoint halves, each of which must show it on its own. NumPy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

RESAMPLES = 2000
P_FLOOR = 1e-16  # below this a normal tail says nothing the data could support
HALF_ALPHA = 0.05  # each half must show the effect at this (uncorrected, one-sided) level

EffectOf = Callable[[np.ndarray], np.ndarray]  # weights [B, n] -> effects [B]


@dataclass(frozen=True)
class Evidence:
    effect: float
    ci: tuple[float, float]
    p: float
    test: str
    replication: dict


def word_weights(groups, rng: np.random.Generator, resamples: int, within=None) -> np.ndarray:
    """[resamples, n] how often each stimulus is drawn when words are resampled with replacement.

    `within` (bool [n]) restricts the draw to those stimuli's words; the rest get weight 0.
    """
    groups = np.asarray(groups)
    within = np.ones(len(groups), bool) if within is None else np.asarray(within, bool)
    words, index = np.unique(groups[within], return_inverse=True)
    counts = rng.multinomial(len(words), np.full(len(words), 1 / len(words)), size=resamples)  # [B, words]
    weights = np.zeros((resamples, len(groups)))
    weights[:, within] = counts[:, index]
    return weights


def split_halves(groups, strata=None, seed: int = 0) -> np.ndarray:
    """bool [n]: True for stimuli in half A. Each stratum's (category's) words are split in two at random."""
    groups = np.asarray(groups)
    strata = np.zeros(len(groups), int) if strata is None else np.asarray(strata)
    rng = np.random.default_rng([seed, 77])
    in_a = np.zeros(len(groups), bool)
    for stratum in np.unique(strata):
        words = rng.permutation(np.unique(groups[strata == stratum]))
        in_a |= (strata == stratum) & np.isin(groups, words[: len(words) // 2])
    return in_a


def _p_value(point: float, samples: np.ndarray, two_sided: bool, n_groups: int | None = None) -> float:
    """p of the effect from its bootstrap spread: a t-test with G - 1 degrees of freedom on the bootstrap
    standard error scaled by √(G/(G-1)), G the groups resampled. The plain z-test on the bootstrap's sd
    (its variance is (G-1)/G of the usual one) called 6.8% of null effects significant at 0.05 with 12
    words; this is calibrated (tests/test_calibration_causal.py). Zero spread tests nothing: NaN."""
    samples = samples[np.isfinite(samples)]
    if not math.isfinite(point) or len(samples) < 2:
        return math.nan
    sd = float(samples.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(point)):  # every resample agrees
        # No effect in any resample is an honest p = 1; an effect that never varies has no spread to judge
        # it by (once this returned 1e-16): untestable.
        return 1.0 if (point == 0 if two_sided else point <= 0) else math.nan
    if n_groups is not None and n_groups >= 2:
        statistic = point / (sd * math.sqrt(n_groups / (n_groups - 1)))
        p = 2 * student_t.sf(abs(statistic), n_groups - 1) if two_sided else student_t.sf(statistic, n_groups - 1)
    else:
        p = 2 * norm.sf(abs(point / sd)) if two_sided else norm.sf(point / sd)
    return float(max(p, P_FLOOR))


def _interval(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) < 2:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def grouped_evidence(effect_of: EffectOf, groups, *, strata=None, seed: int = 0, resamples: int = RESAMPLES,
                     two_sided: bool = False, unit: str = "words") -> Evidence:
    """Effect, CI and p of a statistic of per-stimulus arrays, resampling groups; split-half replication.

    effect_of maps stimulus weights [B, n] (group-bootstrap counts, or 0/1 masks) to the effect [B];
    `unit` names the groups (words, or networks, layers...) in the test's description.
    """
    groups = np.asarray(groups)
    n = len(groups)
    point = float(effect_of(np.ones((1, n)))[0])
    samples = effect_of(word_weights(groups, np.random.default_rng([seed, 11]), resamples))
    in_a = split_halves(groups, strata, seed)
    halves, half_p = [], []
    for number, half in enumerate((in_a, ~in_a)):
        halves.append(float(effect_of(half[None].astype(np.float64))[0]))
        half_samples = effect_of(word_weights(groups, np.random.default_rng([seed, 12, number]), resamples, half))
        half_p.append(_p_value(halves[-1], half_samples, two_sided, len(np.unique(groups[half]))))
    same_side = all(np.sign(h) == np.sign(point) and h != 0 for h in halves)
    passed = bool(same_side and all(p < HALF_ALPHA for p in half_p))
    weaker = min(halves, key=abs) if same_side else min(halves, key=lambda h: h * np.sign(point or 1))
    return Evidence(
        effect=point, ci=_interval(samples), p=_p_value(point, samples, two_sided, len(np.unique(groups))),
        test=f"{'two' if two_sided else 'one'}-sided t-test ({len(np.unique(groups)) - 1} df) on the standard error "
             f"of {resamples} bootstrap resamples of {unit}; CI: their 2.5-97.5 percentiles",
        replication={"kind": f"split-half over {unit}", "value": float(weaker), "passed": passed,
                     "halves": halves, "p_halves": half_p,
                     "rule": f"the effect on each half of the {unit} alone, same sign, one-sided p < {HALF_ALPHA}"})


def weighted_mean(values) -> EffectOf:
    """effect_of for the mean of per-stimulus values [n] (e.g. a per-stimulus difference to a control)."""
    values = np.asarray(values, np.float64)

    def effect_of(weights: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return weights @ values / weights.sum(axis=1)

    return effect_of


def prediction_p(observed: float, draws) -> float:
    """One-sided p of `observed` as one more draw from the normal that k control draws come from:
    t = (observed - mean) / (sd·√(1 + 1/k)), Student's t with k - 1 degrees of freedom. Exact for any k
    under normal draws, and a fitted tail, so its resolution is not bounded by 1/(k + 1). NaN when the
    draws cannot give a spread (fewer than 2 finite, or all equal): such a control tests nothing."""
    from scipy.stats import t as student_t

    draws = np.asarray(draws, np.float64)
    draws = draws[np.isfinite(draws)]
    if len(draws) < 2 or not math.isfinite(observed):
        return math.nan
    sd = float(draws.std(ddof=1))
    if sd <= 1e-12 * max(1.0, float(np.abs(draws).max())):
        return math.nan
    k = len(draws)
    return float(student_t.sf((observed - draws.mean()) / (sd * math.sqrt(1 + 1 / k)), k - 1))
