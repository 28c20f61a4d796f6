"""The wiring-cost experiment's measurements and statistics (NumPy only).

Inputs are plain arrays:
    weights     per layer {"gate": [d_mlp, d_model], "up": [d_mlp, d_model], "down": [d_model, d_mlp]}
    distances   [n_layers, d_mlp, d_model]  distance between neuron i of a layer and residual dimension j
    X           [n_tokens, n_units]         MLP neuron activations (all layers side by side)
    values      [n_lambdas, n_seeds]        one measure per run; column s of every row is seed s

Modularity Q is always Louvain's Q of a binary graph (mlxscan.analysis.connectome.modularity): the
weight graph joins residual dimensions to the MLP neurons of every layer, and keeps the `density`
fraction of strongest connections (|gate| + |up| + |down| of each pair); the functional graph keeps
the `density` fraction of most correlated neuron pairs, as `mlxscan connectome` does.

Effects against λ = 0 are paired by seed (a seed fixes the init, the unit layout and the data order):
ΔQ_s = Q(λ, s) − Q(0, s), and what the claims test, the change in excess modularity
Δ(Q − Q_rand)_s, where Q_rand is Louvain's Q on a degree-preserving random rewiring of the same graph. The p-value is a one-sided one-sample t-test of the ΔQ_s (df = seeds − 1)
and the interval its t interval; the exact sign-flip p is reported beside it, but with 4 seeds it
cannot go below 1/16, so it could never pass a 0.05 gate and is not the one tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import stdtr, stdtrit  # Student's t cdf and quantile (scipy.stats takes seconds to import)

from ..errors import MlxscanError
from .connectome import modularity, random_reference, threshold_edges, unit_correlation

__all__ = ["GraphQ", "PairedEffect", "local_mass_fraction", "weight_mass", "weight_strength", "weight_graph_q",
           "functional_graph_q", "paired_effect", "sweet_spot", "wiring_claims"]

LOCAL_QUANTILE = 0.1  # "local" = the nearest 10% of neuron–dimension pairs: 0.1 of the mass when place does not matter
REFERENCE_SWAPS = 5  # swap attempts per edge of the random reference whose Q is the chance level


@dataclass(frozen=True)
class GraphQ:
    """Q of one graph, and Q of a degree-preserving random rewiring of it (what chance structure gives)."""

    q: float
    q_random: float
    n_nodes: int
    n_edges: int
    n_communities: int


def _check_weights(weights, distances: np.ndarray) -> None:
    if len(weights) != distances.shape[0]:
        raise MlxscanError(f"{len(weights)} layers of weights but distances for {distances.shape[0]}")
    for layer, block in enumerate(weights):
        if block["gate"].shape != distances.shape[1:] or block["down"].shape != distances.shape[1:][::-1]:
            raise MlxscanError(f"layer {layer}: weights {block['gate'].shape} do not match distances {distances.shape[1:]}")


def weight_strength(weights) -> np.ndarray:
    """[n_layers, d_mlp, d_model] connection strength |gate| + |up| + |downᵀ| between neuron i and dimension j."""
    return np.stack([np.abs(b["gate"]) + np.abs(b["up"]) + np.abs(b["down"]).T for b in weights]).astype(np.float64)


def weight_mass(weights) -> float:
    """Σ|w| over every MLP matrix: how much MLP wiring is left (a large λ can remove nearly all of it)."""
    return float(weight_strength(weights).sum())


def local_mass_fraction(weights, distances: np.ndarray, quantile: float = LOCAL_QUANTILE) -> tuple[float, float]:
    """(fraction of Σ|w| on local pairs, fraction of pairs that are local) over all MLP matrices.

    Local pairs are those within each layer's `quantile` distance quantile. With weight mass independent
    of place, the two fractions are equal; 1.0 means every weight joins near neighbours.
    """
    _check_weights(weights, distances)
    strength = weight_strength(weights)
    cutoff = np.quantile(distances.reshape(len(distances), -1), quantile, axis=1)  # [n_layers]
    local = distances <= cutoff[:, None, None]
    return float(strength[local].sum() / strength.sum()), float(local.mean())


def _q_of(A: sp.csr_array, seed: int) -> GraphQ:
    found = modularity(A, seed=seed, random_ref=random_reference(A, swaps=REFERENCE_SWAPS, seed=(seed, 5)))
    return GraphQ(found.q, found.q_random, A.shape[0], int(A.nnz // 2), int(found.community.max() + 1))


def _symmetric(rows: np.ndarray, cols: np.ndarray, n: int) -> sp.csr_array:
    data = np.ones(2 * len(rows))
    return sp.csr_array((data, (np.r_[rows, cols], np.r_[cols, rows])), shape=(n, n))


def weight_graph_q(weights, *, density: float = 0.05, seed: int = 0) -> GraphQ:
    """Q of the weight graph: nodes are the d_model residual dimensions then every layer's neurons.

    The `density` fraction of (neuron, dimension) pairs with the largest strength become edges; the
    graph is bipartite, as the MLP weights are (attention is not part of it).
    """
    if not 0 < density < 1:
        raise MlxscanError(f"density must lie strictly between 0 and 1; got {density}")
    strength = weight_strength(weights)  # [n_layers, d_mlp, d_model]
    n_layers, d_mlp, d_model = strength.shape
    keep = max(2, int(round(density * strength.size)))
    flat = np.argsort(-strength.ravel(), kind="stable")[:keep]
    layer, neuron, dimension = np.unravel_index(flat, strength.shape)
    return _q_of(_symmetric(dimension, d_model + layer * d_mlp + neuron, d_model + n_layers * d_mlp), seed)


def functional_graph_q(X, *, density: float = 0.05, seed: int = 0) -> GraphQ:
    """Q of the functional connectome of X's columns (constant columns left out), as `mlxscan connectome`."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise MlxscanError(f"X must be [n_tokens, n_units]; got shape {X.shape}")
    varies = X.max(axis=0) > X.min(axis=0)
    if varies.sum() < 10:
        raise MlxscanError(f"only {int(varies.sum())} units vary; the functional graph needs at least 10")
    edges, _ = threshold_edges(unit_correlation(X[:, varies]), density, "positive")
    return _q_of(_symmetric(edges[:, 0], edges[:, 1], int(varies.sum())), seed)


# ---------------------------------------------------------------- effects across seeds


@dataclass(frozen=True)
class PairedEffect:
    """Mean of the per-seed differences (treatment − control) with its t interval and one-sided p-values."""

    differences: np.ndarray  # [n_seeds]
    mean: float
    sd: float
    ci: tuple[float, float]  # 95%, t with n − 1 degrees of freedom
    p_t: float  # one-sided, mean > 0
    p_sign_flip: float  # exact: the share of the 2^n sign patterns whose mean is >= the observed
    first_half: float  # mean difference over the first half of the seeds, and the second
    second_half: float

    def to_dict(self) -> dict:
        return {"differences": self.differences.tolist(), "mean": self.mean, "sd": self.sd, "ci": list(self.ci),
                "p_t": self.p_t, "p_sign_flip": self.p_sign_flip, "first_half": self.first_half,
                "second_half": self.second_half}


def _sign_flip_p(differences: np.ndarray) -> float:
    n = len(differences)
    signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # [2^n, n] every pattern of ±1
    means = (signs * differences).mean(axis=1)
    return float(np.mean(means >= differences.mean() - 1e-12 * (1 + abs(differences.mean()))))


def paired_effect(treatment, control) -> PairedEffect:
    """Treatment minus control, seed by seed ([n_seeds] each, n >= 2).

    With zero spread the t statistic is undefined: the interval is the point and p is 0 when every
    difference is the same positive number, 1 otherwise.
    """
    differences = np.asarray(treatment, np.float64) - np.asarray(control, np.float64)
    n = len(differences)
    if n < 2 or not np.isfinite(differences).all():
        raise MlxscanError(f"a paired effect needs finite values from at least 2 seeds; got {n}")
    mean, sd = float(differences.mean()), float(differences.std(ddof=1))
    if sd == 0:
        ci, p = (mean, mean), 0.0 if mean > 0 else 1.0
    else:
        half = float(stdtrit(n - 1, 0.975)) * sd / math.sqrt(n)
        ci, p = (mean - half, mean + half), float(stdtr(n - 1, -mean / (sd / math.sqrt(n))))
    split = n // 2
    return PairedEffect(differences, mean, sd, ci, p, _sign_flip_p(differences), float(differences[:split].mean()),
                        float(differences[split:].mean()))


def sweet_spot(lambdas, mean_effects) -> dict:
    """Where the mean effect peaks over the λ > 0 tested, and whether the curve is non-monotonic there.

    `positive` is False when no λ raises the measure at all (then there is no sweet spot, only a least
    bad λ); `interior` is True when the peak lies below the largest λ and the largest λ's effect is
    smaller: more penalty past the peak gives less, as in the seed study.
    """
    lambdas, effects = np.asarray(lambdas, np.float64), np.asarray(mean_effects, np.float64)
    if len(lambdas) != len(effects) or len(lambdas) == 0:
        raise MlxscanError("sweet_spot needs one mean effect per λ > 0")
    best = int(np.nanargmax(effects))
    return {"lambda": float(lambdas[best]), "mean_effect": float(effects[best]), "positive": bool(effects[best] > 0),
            "interior": bool(best < len(lambdas) - 1 and effects[-1] < effects[best]),
            "largest_lambda_effect": float(effects[-1])}


def wiring_claims(lambdas, q_by_kind: dict[str, np.ndarray], q_random_by_kind: dict[str, np.ndarray],
                  data_files: list[dict]) -> list:
    """One Claim per graph kind and λ > 0: "this wiring cost raises excess modularity over λ = 0" (unjudged).

    q_by_kind and q_random_by_kind: {"weight" | "functional": [n_lambdas, n_seeds]}, row 0 is λ = 0. The
    statistic is excess modularity, Q − Q of a degree-preserving random rewiring of the same graph: a
    penalty that only concentrates edges on a few hub units raises Q and its rewiring's Q alike, and
    that is not modular structure. The replication is split-half over seeds (both halves' mean effect
    above 0); chance_p tests the excess itself (> 0), so one that beats chance but not λ = 0 is
    `failed-control`.
    """
    from ..claims import Claim

    lambdas = np.asarray(lambdas, np.float64)
    if lambdas[0] != 0:
        raise MlxscanError("the first λ must be 0: it is the control")
    claims = []
    for kind, values in q_by_kind.items():
        excess, n_seeds = values - q_random_by_kind[kind], values.shape[1]
        for row in range(1, len(lambdas)):
            effect = paired_effect(excess[row], excess[0])
            chance = paired_effect(values[row], q_random_by_kind[kind][row])
            claims.append(Claim(
                id=f"wiring.{kind}_q.lambda={lambdas[row]:g}", analysis="wiring",
                hypothesis=f"A wiring cost of λ = {lambdas[row]:g} makes the {kind} graph of the MLP neurons more "
                           "modular than training without it",
                statistic=f"excess modularity of the {kind} graph (Louvain Q minus Q of a degree-preserving random "
                          f"rewiring), mean over {n_seeds} seeds",
                value=float(excess[row].mean()), control="λ = 0 with the same seeds (init, layout, data order)",
                control_value=float(excess[0].mean()), effect=effect.mean, ci=effect.ci, p=effect.p_t,
                test=f"one-sided paired t-test over {n_seeds} seeds (df {n_seeds - 1}); exact sign-flip p "
                     f"{effect.p_sign_flip:.3g}",
                replication={"kind": "split-half over seeds", "value": effect.second_half,
                             "passed": effect.first_half > 0 and effect.second_half > 0},
                data_files=list(data_files), chance_p=chance.p_t))
    return claims
