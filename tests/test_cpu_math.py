"""The CPU activation functions against float64 references: they must sit at float32 rounding."""

import mlxscan  # noqa: F401  (first: the fast BLAS)
import mlx.core as mx
import numpy as np
import pytest

from mlxscan.capture.cpu_math import exp_poly, gated_activation


def as_numpy(fn, *arrays):
    return np.array(fn(*[mx.array(a) for a in arrays]), dtype=np.float64)


def test_exp_is_within_float32_rounding_over_its_whole_range():
    x = np.linspace(-87, 88, 400_001, dtype=np.float32)
    reference = np.exp(x.astype(np.float64))
    worst = np.max(np.abs(as_numpy(exp_poly, x) - reference) / reference)
    assert worst <= 1.5e-7  # measured 9.6e-8; numpy's own float32 exp is 1.9e-7 here


def test_exp_saturates_instead_of_wrapping():
    values = as_numpy(exp_poly, np.array([-1e4, -100.0, 0.0, 100.0, 1e4], np.float32))
    assert np.all(np.isfinite(values)) and values[2] == 1.0
    assert values[0] < 1e-37 and values[-1] > 1e38


GATES = np.linspace(-30, 30, 100_001, dtype=np.float32)
UPS = np.random.default_rng(0).normal(size=GATES.shape).astype(np.float32)
REFERENCES = {
    "silu": lambda g: g / (1 + np.exp(-g)),
    "gelu_tanh": lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_fast_gated_activation_matches_float64_and_mlx_own(name):
    reference = REFERENCES[name](GATES.astype(np.float64)) * UPS
    fast = as_numpy(gated_activation(name, fast_cpu=True), GATES, UPS)
    exact = as_numpy(gated_activation(name, fast_cpu=False), GATES, UPS)
    scale = np.abs(reference).max()
    assert np.abs(fast - reference).max() <= 1e-6 * scale  # measured: silu 1.3e-6 abs of 30, gelu 5e-7
    assert np.abs(fast - exact).max() <= 1e-6 * scale
