"""Claims of the connectome step: small-worldness and modularity of each graph, and index topography.

The control is surrogate data, not degree-preserving swaps. A thresholded correlation graph is more
clustered than a random graph of its degrees even when the units are independent (correlation is partly
transitive: Zalesky, Fornito & Bullmore 2012): on independent units, swaps called graphs small-world
(σ 1.6-2.7) and modular. So `mlxscan connectome` also runs its whole pipeline (correlate, threshold at
the same density, Louvain) on S surrogate data sets in which each unit is permuted on its own across
observations (`analysis.connectome.surrogate_nulls`), and saves each surrogate's transitivity, path
length and Q as `<graph>_whole_surrogate_*`. The graph's own C, L and Q are recomputed from its saved
edges and partition.

    p    one-sided prediction test: is the graph's value a draw from the normal the S surrogates' values
         come from? t = (value − null mean) / (null sd · √(1 + 1/S)), Student's t with S − 1 degrees of
         freedom; the empirical p (r+1)/(S+1) is reported in the test text. A null with no spread gives
         no p: the claim is untestable.
    CI   the matching 95% prediction interval of the effect.
    replication  the graph rebuilt on each half of the observations (stimuli), everything refit, each
         against its own surrogates: both halves must show the effect (> 0, one-sided p < 0.05).

The degree-preserving references stay in connectome.json as a described second reference (σ and Q
"against random graphs of the same degrees"), never as a claim's control. Steps saved without surrogate
nulls give untestable graph claims.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import t as student_t

from ..analysis.connectome import clustering, path_length
from ..analysis.graph_nulls import _from_edges
from ..claims import Claim, untestable_claim
from ..errors import MlxscanError
from .adapters import StepContext, claim, null_tail
from .evidence import HALF_ALPHA, P_FLOOR, Evidence, grouped_evidence, weighted_mean


def partition_q(edges: np.ndarray, community: np.ndarray) -> float:
    """Newman's Q of a partition of an unweighted graph: Σ_c e_c / m − (d_c / 2m)², as networkx's modularity."""
    m = len(edges)
    same = community[edges[:, 0]] == community[edges[:, 1]]
    inside = np.bincount(community[edges[same, 0]], minlength=community.max() + 1)  # [c] edges within c
    degree = np.bincount(edges.ravel(), minlength=len(community))
    total = np.bincount(community, weights=degree, minlength=community.max() + 1)  # [c] summed degree
    return float(inside.sum() / m - ((total / (2 * m)) ** 2).sum())


def sigma_null(random_c: np.ndarray, random_l: np.ndarray) -> np.ndarray:
    """[r] σ of each random reference against the mean of the others: the spread of σ where there is none."""
    n = len(random_c)
    others_c = (random_c.sum() - random_c) / (n - 1)
    others_l = (random_l.sum() - random_l) / (n - 1)
    return (random_c / others_c) / (random_l / others_l)


def empirical_p(observed: float, null: np.ndarray) -> float:
    """(r + 1) / (n + 1), r the null draws at least as large as the observed value."""
    return float((np.sum(null >= observed) + 1) / (len(null) + 1))


def _numbers(value_c: float, value_l: float, value_q: float, arrays: dict, prefix: str) -> dict:
    """σ and Q of one graph (or half) against its surrogates: {"small_world": ..., "modular": ...}."""
    surrogate_c, surrogate_l = arrays[f"{prefix}_surrogate_transitivity"], arrays[f"{prefix}_surrogate_path_length"]
    surrogate_q = arrays[f"{prefix}_surrogate_q"]
    sigma = (value_c / surrogate_c.mean()) / (value_l / surrogate_l.mean())
    return {"small_world": {"value": float(sigma), "control": 1.0, "null": sigma_null(surrogate_c, surrogate_l)},
            "modular": {"value": float(value_q), "control": float(surrogate_q.mean()), "null": surrogate_q}}


def _graph_numbers(arrays: dict, key: str) -> dict:
    """The whole graph's statistics (recomputed from its edges and partition) and each half's, against
    their surrogates."""
    edges, community = arrays[f"{key}_edges"], arrays[f"{key}_community"]
    A = _from_edges(edges, len(arrays[f"{key}_units"]))
    whole = _numbers(clustering(A)[1], path_length(A)[0], partition_q(edges, community), arrays, f"{key}_whole")
    halves = [_numbers(float(arrays[f"{key}_{half}_transitivity"]), float(arrays[f"{key}_{half}_path_length"]),
                       float(arrays[f"{key}_{half}_q"]), arrays, f"{key}_{half}") for half in ("half_a", "half_b")]
    return {"whole": whole, "halves": halves}


def prediction_test(value: float, null: np.ndarray) -> tuple[float, float]:
    """(one-sided p, CI half-width) of value as one more draw from the normal the null draws come from."""
    n = len(null)
    if n < 2:
        raise MlxscanError(f"{n} reference graph gives no spread to test against; run with --references 2 or more")
    scale = null.std(ddof=1) * np.sqrt(1 + 1 / n)
    if not scale > 1e-12 * max(1.0, float(np.abs(null).max())):
        return float("nan"), 0.0  # every surrogate alike: no spread, no test
    p = student_t.sf((value - null.mean()) / scale, n - 1)
    return float(max(p, P_FLOOR)), float(student_t.ppf(0.975, n - 1) * scale)


def _test(numbers: dict) -> tuple[float, float, float, float]:
    """(effect, p, CI half-width, empirical p) of one graph's statistic against its references."""
    effect = float(numbers["value"] - numbers["control"])
    p, half_width = claim_p(numbers["value"], numbers["null"])
    return effect, p, half_width, empirical_p(numbers["value"], numbers["null"])


def claim_p(value: float, null: np.ndarray) -> tuple[float, float]:
    """(one-sided p, CI half-width): the prediction test on the log scale where every value is positive.
    σ and Q are ratio-like and right-skewed across surrogates; on the natural scale the normal tail called
    7.1% of independent-unit data sets modular at 0.05, on the log scale 6% (tests/test_calibration_graphs.py)."""
    null = np.asarray(null, np.float64)
    half_width = prediction_test(value, null)[1]
    if value > 0 and np.all(null > 0):
        return prediction_test(float(np.log(value)), np.log(null))[0], half_width
    return prediction_test(value, null)[0], half_width


CLAIMS = {
    "small_world": dict(
        hypothesis="The {graph} functional connectome is small-world: σ = (C/C_surr)/(L/L_surr) above 1 against "
                   "graphs made by the same pipeline from independent-unit surrogates",
        statistic="σ with C the transitivity and L the mean shortest path (largest component)",
        control="1: σ of a graph no more clustered and no shorter-pathed than its {n} surrogate graphs (each "
                "unit permuted on its own, then correlated and thresholded at the same density)"),
    "modular": dict(
        hypothesis="The {graph} functional connectome is modular: its Louvain Q exceeds the Q of graphs made by the "
                   "same pipeline from independent-unit surrogates",
        statistic="Newman's modularity Q of the seeded Louvain partition",
        control="mean Louvain Q of the {n} surrogate graphs"),
}


def graph_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("connectome.json"), ctx.npz("connectome.npz")
    keys = [row["graph"] for row in record["graphs"]]
    files = ctx.files("connectome.json", "connectome.npz")
    claims = []
    for key in keys:
        if f"{key}_whole_surrogate_q" not in arrays:
            for kind, text in CLAIMS.items():
                claims.append(untestable_claim(claim(
                    ctx, f"{kind}.{key}", Evidence(float("nan"), (float("nan"), float("nan")), float("nan"), "not run",
                                                   {"kind": "none", "value": float("nan"), "passed": False}),
                    data_files=files, hypothesis=text["hypothesis"].format(graph=_graph_name(key)),
                    statistic=text["statistic"], value=float("nan"), control=text["control"].format(n=0),
                    control_value=float("nan")), "saved without surrogate-data nulls; rerun the connectome step"))
            continue
        numbers = _graph_numbers(arrays, key)
        for kind, text in CLAIMS.items():
            here = numbers["whole"][kind]
            effect, p, half_width, p_empirical = _test(here)
            halves = {name: _test(half[kind]) for name, half in zip(("half A", "half B"), numbers["halves"])}
            n = len(here["null"])
            evidence = Evidence(effect, (effect - half_width, effect + half_width), p, _test_text(n, p_empirical),
                                _replication(halves))
            made = claim(ctx, f"{kind}.{key}", evidence, data_files=files,
                         hypothesis=text["hypothesis"].format(graph=_graph_name(key)),
                         statistic=text["statistic"], value=here["value"],
                         control=text["control"].format(n=n), control_value=here["control"])
            claims.append(made if np.isfinite(p) else
                          untestable_claim(made, f"the {n} surrogate graphs give no spread to test against"))
    return claims


def _graph_name(key: str) -> str:
    return f"layer {key.removeprefix('layer')}" if key.startswith("layer") else key


def _test_text(n: int, p_empirical: float) -> str:
    return (f"one-sided prediction t-test (log scale) against the {n} independent-unit surrogate graphs ({n - 1} df; "
            f"empirical p (r+1)/(n+1) = {p_empirical:.3g}); CI: the 95% prediction interval, effect ± "
            "t·sd·√(1 + 1/n) with sd the references' spread")


def _replication(halves: dict) -> dict:
    """Both halves of the observations, each graph rebuilt and judged against its own surrogates."""
    effects = {key: result[0] for key, result in halves.items()}
    passed = all(result[0] > 0 and result[1] < HALF_ALPHA for result in halves.values())
    return {"kind": "split-half over observations (graph, threshold, Louvain and surrogates refit on each)",
            "value": float(min(effects.values())), "passed": bool(passed), "effects": effects,
            "p_halves": {key: result[1] for key, result in halves.items()},
            "empirical_p_halves": {key: result[3] for key, result in halves.items()},
            "rule": f"the effect in each half alone, > 0 with one-sided p < {HALF_ALPHA}"}


def connectome_claims(ctx: StepContext) -> list[Claim]:
    """Small-world and modularity claims of every graph, then the index topography claims per layer."""
    return graph_claims(ctx) + topography_claims(ctx)


# ---------------------------------------------------------------------------------------------
# connectome: topography


def topography_claims(ctx: StepContext) -> list[Claim]:
    """Index topography per layer: do neighbouring units prefer the same categories (the seed: no)?"""
    record, arrays = ctx.json("connectome.json"), ctx.npz("connectome.npz")
    files = ctx.files("connectome.json", "connectome.npz")
    claims = []
    for row in record.get("topography") or []:
        layer = row["layer"]
        d = np.asarray(arrays[f"topography_layer{layer}_selectivity"], np.float64)
        null = arrays[f"topography_layer{layer}_null"]
        profiles = d.T - d.T.mean(axis=1, keepdims=True)  # as analysis.topography: centred d' profiles
        norms = np.linalg.norm(profiles, axis=1)
        profiles = profiles[norms > 1e-12 * (1 + np.abs(d).max())]
        profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
        pairs = np.einsum("ik,ik->i", profiles[:-1], profiles[1:])  # neighbour agreement of each pair
        evidence = grouped_evidence(weighted_mean(pairs - null.mean()), np.arange(len(pairs)).astype(str),
                                    seed=layer, resamples=1000, unit="neighbouring pairs")
        evidence = Evidence(evidence.effect, evidence.ci, null_tail(pairs.mean(), null),
                            f"one-sided: Student-t prediction test among {len(null)} shuffled unit orders; CI: bootstrap over "
                            "neighbouring pairs", evidence.replication)
        claims.append(claim(
            ctx, f"topography.L{layer}", evidence, data_files=files,
            hypothesis=f"Index-neighbouring units of layer {layer} prefer the same categories (a topographic map)",
            statistic="mean signal correlation of neighbouring units' d' profiles", value=pairs.mean(),
            control="the same after shuffling the units' order", control_value=null.mean()))
    return claims
