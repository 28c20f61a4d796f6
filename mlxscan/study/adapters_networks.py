"""Claims of the connectome step: small-worldness and modularity of each graph, and index topography.

The graph's own numbers are recomputed from its saved edges and Louvain partition (transitivity, path
length, Q); the degree-matched random references cannot be remade from the files, so their per-reference
transitivity, path length and Louvain Q (saved by `mlxscan connectome` as `<graph>_random_*`) are the
null distribution:

    p    one-sided prediction test: is the graph's value a draw from the normal the n references' values
         come from? t = (value − null mean) / (null sd · √(1 + 1/n)), Student's t with n − 1 degrees of
         freedom (floored at P_FLOOR). Twenty references cannot give an empirical p below 1/21, far above
         a study-wide Holm threshold, so that p is reported in the test text, not gated.
    CI   the matching 95% prediction interval of the effect: effect ± t_0.975 · null sd · √(1 + 1/n), i.e.
         how far a graph no different from its references would stray. The graph itself is one
         realisation, so the replication carries its variability: every other graph of the step (the
         other layer, with --per-layer) must show the effect as well.

A thresholded correlation graph is more clustered than a random graph of its degrees even when the units
are independent (correlation is partly transitive: Zalesky et al. 2012), so "small-world against
degree-matched random graphs" says what the graph is, not that the network was built to be one.
Steps saved before the per-reference arrays existed give only their topography claims.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import t as student_t

from ..analysis.connectome import clustering, path_length
from ..analysis.graph_nulls import _from_edges
from ..claims import Claim
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


def _graph_numbers(arrays: dict, key: str) -> dict:
    """Observed statistics of one graph (recomputed from its edges) and its references' draws."""
    edges, community = arrays[f"{key}_edges"], arrays[f"{key}_community"]
    A = _from_edges(edges, len(arrays[f"{key}_units"]))
    transitivity, length = clustering(A)[1], path_length(A)[0]
    random_c, random_l = arrays[f"{key}_random_transitivity"], arrays[f"{key}_random_path_length"]
    random_q = arrays[f"{key}_random_q"]
    sigma = (transitivity / random_c.mean()) / (length / random_l.mean())
    return {"small_world": {"value": sigma, "control": 1.0, "null": sigma_null(random_c, random_l)},
            "modular": {"value": partition_q(edges, community), "control": random_q.mean(), "null": random_q}}


def prediction_test(value: float, null: np.ndarray) -> tuple[float, float]:
    """(one-sided p, CI half-width) of value as one more draw from the normal the null draws come from."""
    n = len(null)
    if n < 2:
        raise MlxscanError(f"{n} reference graph gives no spread to test against; run with --references 2 or more")
    scale = null.std(ddof=1) * np.sqrt(1 + 1 / n)
    if scale == 0:
        return (P_FLOOR if value > null.mean() else 1.0), 0.0
    p = student_t.sf((value - null.mean()) / scale, n - 1)
    return float(max(p, P_FLOOR)), float(student_t.ppf(0.975, n - 1) * scale)


def _test(numbers: dict) -> tuple[float, float, float, float]:
    """(effect, p, CI half-width, empirical p) of one graph's statistic against its references."""
    effect = float(numbers["value"] - numbers["control"])
    p, half_width = prediction_test(numbers["value"], numbers["null"])
    return effect, p, half_width, empirical_p(numbers["value"], numbers["null"])


CLAIMS = {
    "small_world": dict(
        hypothesis="The {graph} functional connectome is small-world: σ = (C/C_rand)/(L/L_rand) above 1 against "
                   "degree-matched random graphs",
        statistic="σ with C the transitivity and L the mean shortest path (largest component)",
        control="1: σ of a graph no more clustered and no shorter-pathed than its {n} degree-matched random "
                "references (σ of each reference against the others gives the null spread)"),
    "modular": dict(
        hypothesis="The {graph} functional connectome is modular: its Louvain Q exceeds the Q Louvain finds in "
                   "degree-matched random graphs",
        statistic="Newman's modularity Q of the seeded Louvain partition",
        control="mean Louvain Q of the {n} degree-matched random references"),
}


def graph_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("connectome.json"), ctx.npz("connectome.npz")
    keys = [row["graph"] for row in record["graphs"]]
    if not all(f"{key}_random_q" in arrays for key in keys):
        return []  # saved before per-reference values were kept: no spread to test against
    numbers = {key: _graph_numbers(arrays, key) for key in keys}
    files = ctx.files("connectome.json", "connectome.npz")
    claims = []
    for key in keys:
        for kind, text in CLAIMS.items():
            here = numbers[key][kind]
            effect, p, half_width, p_empirical = _test(here)
            others = {other: _test(numbers[other][kind]) for other in keys if other != key}
            n = len(here["null"])
            evidence = Evidence(effect, (effect - half_width, effect + half_width), p, _test_text(n, p_empirical),
                                _replication(others))
            claims.append(claim(ctx, f"{kind}.{key}", evidence, data_files=files,
                                hypothesis=text["hypothesis"].format(graph=_graph_name(key)),
                                statistic=text["statistic"], value=here["value"],
                                control=text["control"].format(n=n), control_value=here["control"]))
    return claims


def _graph_name(key: str) -> str:
    return f"layer {key.removeprefix('layer')}" if key.startswith("layer") else key


def _test_text(n: int, p_empirical: float) -> str:
    return (f"one-sided prediction t-test against the {n} degree-matched random references ({n - 1} df; "
            f"empirical p (r+1)/(n+1) = {p_empirical:.3g}); CI: the 95% prediction interval, effect ± "
            "t·sd·√(1 + 1/n) with sd the references' spread")


def _replication(others: dict) -> dict:
    if not others:
        return {"kind": "none: one graph (run the step with --per-layer for a second)", "value": float("nan"),
                "passed": False, "rule": "another graph of the step must show the effect"}
    effects = {key: result[0] for key, result in others.items()}
    passed = all(result[0] > 0 and result[1] < HALF_ALPHA for result in others.values())
    return {"kind": f"the other graph{'s' if len(others) > 1 else ''} of the step ({', '.join(others)})",
            "value": float(min(effects.values())), "passed": bool(passed), "effects": effects,
            "p_others": {key: result[1] for key, result in others.items()},
            "empirical_p_others": {key: result[3] for key, result in others.items()},
            "rule": f"the effect in every other graph alone, > 0 with one-sided p < {HALF_ALPHA}"}


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
                            f"one-sided: normal tail fitted to {len(null)} shuffled unit orders; CI: bootstrap over "
                            "neighbouring pairs", evidence.replication)
        claims.append(claim(
            ctx, f"topography.L{layer}", evidence, data_files=files,
            hypothesis=f"Index-neighbouring units of layer {layer} prefer the same categories (a topographic map)",
            statistic="mean signal correlation of neighbouring units' d' profiles", value=pairs.mean(),
            control="the same after shuffling the units' order", control_value=null.mean()))
    return claims
