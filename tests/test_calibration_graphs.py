"""Calibration of the connectome's graph claims against independent-unit surrogates: on data whose units
are independent, p < 0.05 must come out 5% of the time (within the binomial 99% interval over the null
data sets); on units driven by planted latent modules, at least 80% of the time. Both figures are
printed (`pytest -s`). Small graphs (30 units, 60 observations, 9 surrogates) keep it to seconds.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

from mlxscan.analysis.connectome import graph_statistics, independent_units
from mlxscan.study.adapters_networks import claim_p, sigma_null

DATASETS, ALPHA, SURROGATES, DENSITY = 400, 0.05, 9, 0.15
UNITS, OBSERVATIONS = 30, 60


def claim_ps(X, seed: int) -> tuple[float, float]:
    """(small-world p, modular p) of one data set, as graph_claims computes them for the whole graph."""
    rng = np.random.default_rng([seed, 5])
    observed = graph_statistics(X, DENSITY, "positive", seed)
    draws = [graph_statistics(independent_units(X, rng), DENSITY, "positive", seed) for _ in range(SURROGATES)]
    c, length, q = (np.array([d[name] for d in draws]) for name in ("transitivity", "path_length", "q"))
    sigma = (observed["transitivity"] / c.mean()) / (observed["path_length"] / length.mean())
    return claim_p(sigma, sigma_null(c, length))[0], claim_p(observed["q"], q)[0]


def modules(rng, loading: float) -> np.ndarray:
    factors = rng.standard_normal((OBSERVATIONS, 3))
    return np.repeat(factors, UNITS // 3, axis=1) * loading + rng.standard_normal((OBSERVATIONS, UNITS))


def rates(make_data, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.mean([[p < ALPHA for p in claim_ps(make_data(rng), seed)] for seed in range(n)], axis=0)


def test_graph_claims_are_calibrated_on_independent_units_and_find_planted_modules():
    false_positive = rates(lambda rng: rng.standard_normal((OBSERVATIONS, UNITS)), DATASETS)
    power = rates(lambda rng: modules(rng, 0.6), 50)
    low, high = (bound / DATASETS for bound in binom.interval(0.99, DATASETS, ALPHA))
    print(f"small-world: false-positive rate {false_positive[0]:.3f}, power {power[0]:.2f}; modular: false-positive "
          f"rate {false_positive[1]:.3f}, power {power[1]:.2f} (99% interval {low:.3f}-{high:.3f}; modules: 3 latent "
          f"factors at loading 0.6 over {UNITS} units, {OBSERVATIONS} observations)")
    assert low <= false_positive[0] <= high and low <= false_positive[1] <= high
    assert power[1] >= 0.8  # modular: planted
    assert power[0] >= 0.8  # latent modules cluster more than independent units: small-world too
