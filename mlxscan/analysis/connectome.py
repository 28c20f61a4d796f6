"""Functional connectomes: units linked by correlated activity, and the graph's small-world, rich-club,
modular and topographic structure.

Inputs are plain NumPy arrays:
    X            [n_observations, n_units]  activations over stimuli (pooled scan) or tokens (--pool all)
    adjacency    [n, n] symmetric 0/1 without self-loops: a scipy sparse matrix, a dense array or a
                 networkx graph (taken in its own node order)
    selectivity  [n_classes, n_units]  d' of every unit for every class, units in index order

The graph is binary: the `density` fraction of unit pairs with the strongest correlation become edges.
Every metric follows networkx's definition and is tested against it, but is computed with sparse
matrices and scipy's C breadth-first search: networkx's pure-Python versions take minutes at 2,000
nodes and 100,000 edges, and its sigma/omega rebuild (unseeded) reference graphs on every call.

Null models are made once per graph and seed (NullModelCache) and shared by σ, ω, rich club and Q:
degree-preserving random graphs and ring lattices, in mlxscan.analysis.graph_nulls. The index topography
score is in mlxscan.analysis.topography. Both are re-exported here.

References: Watts & Strogatz 1998; Humphries & Gurney 2008 (σ); Telesford et al. 2011 (ω);
Colizza et al. 2006 (normalized rich club); Blondel et al. 2008 (Louvain); Newman 2006 (Q).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components, shortest_path

from ..errors import MlxscanError
from .graph_nulls import NullModelCache, _adjacency, _edges, _from_edges, lattice_reference, random_reference
from .topography import Topography, topography
from ._json import jsonable as _jsonable

__all__ = ["SmallWorld", "RichClub", "Modularity", "Topography", "Connectome", "NullModelCache",
           "unit_correlation", "threshold_edges", "clustering", "path_length", "rich_club", "small_world",
           "rich_club_curve", "modularity", "random_reference", "lattice_reference", "topography",
           "build_connectome", "SIGNS"]

SIGNS = ("positive", "abs")  # rank pairs by r (co-activation only) or by |r| (anti-correlation links too)
MIN_UNITS = 10  # fewer leave no graph whose clustering or communities mean anything
CHUNK_ROWS = 4096  # observations turned to float64 at once: ~65 MB at 2,000 units




# ---------------------------------------------------------------- correlation and threshold


def unit_correlation(X) -> np.ndarray:
    """[n_units, n_units] Pearson correlation of X's columns, in float64 (two passes over row chunks).

    Centering before the cross-products keeps units with large means (massive activations) exact.
    """
    shape = getattr(X, "shape", ())
    if len(shape) != 2 or shape[0] < 3:
        raise MlxscanError(f"X must be [n_observations >= 3, n_units]; got shape {shape}")
    n = shape[0]
    mean = sum(np.asarray(X[s:s + CHUNK_ROWS], np.float64).sum(0) for s in range(0, n, CHUNK_ROWS)) / n
    cross = np.zeros((shape[1], shape[1]))
    for start in range(0, n, CHUNK_ROWS):
        chunk = np.asarray(X[start:start + CHUNK_ROWS], np.float64) - mean  # [rows, n_units]
        if not np.isfinite(chunk).all():
            raise MlxscanError("X contains NaN or infinite values; rescan, or leave those units out")
        cross += chunk.T @ chunk
    scale = np.sqrt(np.diag(cross))
    if (scale == 0).any():
        raise MlxscanError(f"unit {int(np.flatnonzero(scale == 0)[0])} is constant; its correlation is undefined")
    correlation = np.clip(cross / scale[:, None] / scale[None, :], -1.0, 1.0)
    np.fill_diagonal(correlation, 1.0)
    return correlation


def threshold_edges(correlation: np.ndarray, density: float, sign: str = "positive") -> tuple[np.ndarray, float]:
    """The `density` fraction of pairs with the largest r ("positive") or |r| ("abs"): edges [m, 2], cutoff.

    "positive" never links anti-correlated units, so with fewer positive pairs than asked for the graph
    is sparser than `density`. Ties at the cutoff go to the pair that comes first in row-major order.
    """
    if not 0 < density < 1:
        raise MlxscanError(f"density must lie strictly between 0 and 1; got {density}")
    if sign not in SIGNS:
        raise MlxscanError(f"unknown sign {sign!r}; choose {' or '.join(SIGNS)}")
    n = correlation.shape[0]
    rows, cols = np.triu_indices(n, k=1)
    score = correlation[rows, cols]
    if sign == "abs":
        score = np.abs(score)
    wanted = int(round(density * len(score)))
    order = np.argsort(-score, kind="stable")[:wanted]
    order = order[score[order] > 0]
    if len(order) < 2:
        raise MlxscanError(f"density {density} leaves {len(order)} edges among {n} units; raise the density")
    order.sort()  # edges listed in row-major order, not by strength
    return np.stack([rows[order], cols[order]], axis=1).astype(np.int64), float(score[order].min())


# ---------------------------------------------------------------- metrics (networkx's definitions)


def clustering(adjacency) -> tuple[float, float]:
    """(average clustering, transitivity), as nx.average_clustering and nx.transitivity.

    Nodes of degree < 2 count as 0 in the average, as in networkx.
    """
    A = _adjacency(adjacency)
    degree = np.asarray(A.sum(axis=1)).ravel()
    closed = np.asarray((A @ A).multiply(A).sum(axis=1)).ravel()  # [n] 2 × triangles through each node
    pairs = degree * (degree - 1)  # [n] 2 × pairs of neighbours
    local = np.divide(closed, pairs, out=np.zeros_like(closed), where=pairs > 0)
    return float(local.mean()) if len(local) else 0.0, float(closed.sum() / pairs.sum()) if pairs.sum() else 0.0


def path_length(adjacency) -> tuple[float, int]:
    """(average shortest path length, nodes) of the largest connected component.

    A thresholded graph can fall apart; networkx would refuse it, here the largest component stands in.
    """
    A = _adjacency(adjacency)
    _, component = connected_components(A, directed=False)
    largest = np.flatnonzero(component == np.bincount(component).argmax())
    if len(largest) < 2:
        return float("nan"), len(largest)
    distances = shortest_path(A[largest][:, largest], unweighted=True, directed=False)  # [s, s]
    return float(distances.sum() / (len(largest) * (len(largest) - 1))), len(largest)


def _club_counts(A: sp.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """For k = 0, 1, …: nodes of degree > k, and edges between them (while more than one node is left)."""
    degree = np.asarray(A.sum(axis=1)).ravel().astype(np.int64)
    edges = _edges(A)
    nodes_above = len(degree) - np.cumsum(np.bincount(degree))  # [k_max + 1]
    lower_end = np.minimum(degree[edges[:, 0]], degree[edges[:, 1]])  # an edge stays while both ends do
    edges_above = len(edges) - np.cumsum(np.bincount(lower_end, minlength=len(nodes_above)))
    keep = int(np.argmin(nodes_above > 1)) if (nodes_above <= 1).any() else len(nodes_above)
    return nodes_above[:keep], edges_above[:keep]


def rich_club(adjacency) -> np.ndarray:
    """φ(k) for k = 0, 1, …: nx.rich_club_coefficient(G, normalized=False) as an array."""
    nodes, edges = _club_counts(_adjacency(adjacency))
    return 2.0 * edges / (nodes * (nodes - 1.0))


@dataclass(frozen=True)
class SmallWorld:
    """σ and ω (networkx's definitions) against the given random and lattice references."""

    transitivity: float  # C in σ (Humphries & Gurney use the global clustering)
    clustering: float  # average clustering: C in ω
    path_length: float  # L, on the largest connected component
    component_nodes: int  # size of that component
    random_transitivity: float  # mean over random references
    random_path_length: float  # mean over random references (each on its largest component)
    lattice_clustering: float  # max(C, the most clustered lattice reference), as networkx takes it
    sigma: float  # (C / C_rand) / (L / L_rand): > 1 small-world
    omega: float  # L_rand / L − C / C_latt clipped to [−1, 1]: −1 lattice, 0 small-world, +1 random
    # ω's terms are ≤ 1 by construction only in the limit: L_rand / L exceeds 1 when the graph's (largest
    # component's) paths are shorter than the finite references', so the unclipped value is kept too.
    omega_unclipped: float
    # Each random reference's transitivity and path length: the spread a test of σ needs (saved as arrays).
    random_transitivities: tuple[float, ...] = ()
    random_path_lengths: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        per_reference = ("random_transitivities", "random_path_lengths")
        return {key: _jsonable(value) for key, value in self.__dict__.items() if key not in per_reference}


def small_world(adjacency, random_refs, lattice_refs) -> SmallWorld:
    """σ = (C/C_r)/(L/L_r) with C the transitivity, and ω = L_r/L − C/C_l with C the average clustering.

    The references are adjacencies (see random_reference, lattice_reference). Given the graphs
    nx.sigma and nx.omega draw internally, the values are theirs (tested).
    """
    if not random_refs or not lattice_refs:
        raise MlxscanError("small-worldness needs at least one random and one lattice reference")
    average, transitivity = clustering(adjacency)
    length, component = path_length(adjacency)
    random_cs = tuple(clustering(ref)[1] for ref in random_refs)
    random_ls = tuple(path_length(ref)[0] for ref in random_refs)
    random_c, random_l = np.mean(random_cs), np.mean(random_ls)  # NumPy floats: x / 0 is inf, not an error
    lattice_c = max([average] + [clustering(ref)[0] for ref in lattice_refs])
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = float((transitivity / random_c) / (length / random_l))
        omega = float(random_l / np.float64(length) - (average / lattice_c if lattice_c > 0 else 0.0))
    return SmallWorld(transitivity, average, length, component, float(random_c), float(random_l), lattice_c, sigma,
                      float(np.clip(omega, -1.0, 1.0)) if math.isfinite(omega) else omega, omega, random_cs, random_ls)


@dataclass(frozen=True, eq=False)
class RichClub:
    """φ(k) over degree k, against degree-preserving random references."""

    coefficient: np.ndarray  # [k] φ(k): edge density among the nodes of degree > k
    random_coefficient: np.ndarray  # [k] mean φ over the random references
    club_size: np.ndarray  # [k] nodes of degree > k
    min_club: int  # the max below only looks at clubs at least this large
    max_normalized: float  # max over those k of φ / φ_rand: > 1 hubs link to each other beyond chance
    k_at_max: int

    @property
    def normalized(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.coefficient / self.random_coefficient

    def to_dict(self) -> dict:
        at = self.k_at_max
        return {"max_normalized": _jsonable(self.max_normalized), "k_at_max": at, "min_club": self.min_club,
                "club_size_at_max": int(self.club_size[at]) if at >= 0 else None}


def rich_club_curve(adjacency, random_refs, *, min_club: int = 20) -> RichClub:
    """Normalized rich club φ(k)/φ_rand(k); the max is over k whose club has ≥ min_club nodes.

    Small clubs have few possible edges (a club of 5 has 10), so their ratio is mostly noise.
    """
    phi = rich_club(adjacency)
    nodes, _ = _club_counts(_adjacency(adjacency))
    randoms = [rich_club(ref) for ref in random_refs]
    reference = np.mean([np.pad(r, (0, max(0, len(phi) - len(r))))[:len(phi)] for r in randoms], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = phi / reference
    usable = np.flatnonzero((nodes >= min_club) & np.isfinite(ratio))
    at = int(usable[np.argmax(ratio[usable])]) if len(usable) else -1
    return RichClub(phi, reference, nodes, min_club, float(ratio[at]) if at >= 0 else float("nan"), at)


@dataclass(frozen=True, eq=False)
class Modularity:
    """Louvain communities of the graph (seeded) and their modularity Q."""

    q: float
    community: np.ndarray  # [n] community of each node: 0 the largest
    q_random: float  # Q that Louvain finds in the first random reference: what chance structure gives
    seed: int
    random_qs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [r] Q of every random reference

    def to_dict(self) -> dict:
        sizes = np.bincount(self.community)
        return {"q": self.q, "q_random": _jsonable(self.q_random), "n_communities": len(sizes),
                "community_sizes": sizes.tolist(), "seed": self.seed}


def _louvain(A: sp.csr_array, seed: int) -> tuple[np.ndarray, float]:
    graph = nx.from_scipy_sparse_array(A)
    communities = nx.community.louvain_communities(graph, weight=None, seed=seed)
    q = nx.community.modularity(graph, communities, weight=None)
    communities = sorted(communities, key=lambda c: (-len(c), min(c)))  # ids independent of set order
    label = np.empty(A.shape[0], dtype=np.int64)
    for number, members in enumerate(communities):
        label[list(members)] = number
    return label, float(q)


def modularity(adjacency, *, seed: int = 0, random_ref=None, random_refs=()) -> Modularity:
    """Louvain (networkx, seeded so the partition repeats) and Q; with references, their Qs as well.

    `random_ref` is one reference, `random_refs` several (the Q of each is kept: the spread of chance
    structure a test of Q needs); q_random is the first one's Q.
    """
    label, q = _louvain(_adjacency(adjacency), seed)
    references = ([random_ref] if random_ref is not None else []) + list(random_refs)
    random_qs = np.array([_louvain(_adjacency(ref), seed)[1] for ref in references])
    return Modularity(q, label, float(random_qs[0]) if len(random_qs) else float("nan"), seed, random_qs)


# ---------------------------------------------------------------- the whole connectome


@dataclass(frozen=True, eq=False)
class Connectome:
    """One thresholded functional graph and its metrics; `arrays` and `graph` hold what figures need."""

    units: np.ndarray  # [n, 2] (layer, index) of each node, as given to build_connectome
    dropped_units: np.ndarray  # [d, 2] constant units left out: their correlation is undefined
    correlation: np.ndarray  # [n, n] float32 Pearson r between the nodes
    edges: np.ndarray  # [m, 2] node pairs (i < j)
    threshold: float  # the weakest kept r (sign "positive") or |r| ("abs")
    density: float  # m / (n (n − 1) / 2): below the target when too few pairs qualify
    sign: str
    small_world: SmallWorld
    rich_club: RichClub
    modularity: Modularity
    settings: dict = field(default_factory=dict)  # density asked for, references, swaps, seed

    def to_dict(self) -> dict:
        return {"nodes": len(self.units), "constant_units_dropped": len(self.dropped_units),
                "edges": len(self.edges), "density": self.density,
                "threshold": self.threshold, "sign": self.sign, "layers": sorted(set(self.units[:, 0].tolist())),
                "small_world": self.small_world.to_dict(), "rich_club": self.rich_club.to_dict(),
                "modularity": self.modularity.to_dict(), **self.settings}

    def arrays(self) -> dict[str, np.ndarray]:
        club = self.rich_club
        return {"units": self.units, "dropped_units": self.dropped_units, "correlation": self.correlation, "edges": self.edges,
                "community": self.modularity.community, "rich_club": club.coefficient,
                "rich_club_random": club.random_coefficient, "rich_club_normalized": club.normalized,
                "rich_club_size": club.club_size,
                # per random reference (the spread σ's and Q's tests need)
                "random_transitivity": np.array(self.small_world.random_transitivities),
                "random_path_length": np.array(self.small_world.random_path_lengths),
                "random_q": self.modularity.random_qs}

    def graph(self) -> nx.Graph:
        """The graph with node attributes layer, unit, community and edge attribute weight (r)."""
        graph = nx.Graph()
        for node, ((layer, unit), community) in enumerate(zip(self.units.tolist(), self.modularity.community)):
            graph.add_node(node, layer=int(layer), unit=int(unit), community=int(community))
        weights = self.correlation[self.edges[:, 0], self.edges[:, 1]].astype(float).tolist()
        graph.add_edges_from((int(i), int(j), {"weight": w}) for (i, j), w in zip(self.edges.tolist(), weights))
        return graph


def build_connectome(X, *, units=None, density: float = 0.05, sign: str = "positive", references: int = 5,
                     swaps: int = 10, seed: int = 0, min_club: int = 20, cache: NullModelCache | None = None,
                     say: Callable[[str], None] = lambda message: None) -> Connectome:
    """Correlate X's columns [n_observations, n_units], keep the strongest `density` of pairs, and measure.

    `units` [n_units, 2] names each column (layer, index); constant columns are left out (and listed).
    Reference graph r is seeded by (seed, kind, r); Louvain by seed.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise MlxscanError(f"X must be [n_observations, n_units]; got shape {X.shape}")
    units = np.asarray(units if units is not None else np.stack([np.zeros(X.shape[1]), np.arange(X.shape[1])], 1),
                       np.int64)
    if units.shape != (X.shape[1], 2):
        raise MlxscanError(f"units must be [n_units, 2] (layer, index) for {X.shape[1]} columns; got {units.shape}")
    low, high = X.min(axis=0), X.max(axis=0)  # [n_units] each; NaN and infinity carry through
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise MlxscanError("X contains NaN or infinite values; rescan, or leave those units out")
    varies = np.asarray(high > low)
    units, dropped, X = units[varies], units[~varies], X[:, varies] if not varies.all() else X
    if X.shape[1] < MIN_UNITS:
        raise MlxscanError(f"{X.shape[1]} units vary; a connectome needs at least {MIN_UNITS}")
    if references < 1 or swaps < 1:
        raise MlxscanError("references and swaps must be at least 1")
    cache = cache or NullModelCache()
    say(f"correlating {X.shape[1]} units over {X.shape[0]} observations")
    correlation = unit_correlation(X)
    edges, cutoff = threshold_edges(correlation, density, sign)
    A = _from_edges(edges, len(units))
    randoms, lattices = [], []
    for r in range(references):
        say(f"reference graphs {r + 1}/{references} (random: {swaps} swaps per edge; lattice)")
        randoms.append(cache.get("random", A, seed=(seed, 1, r), swaps=swaps))
        lattices.append(cache.get("lattice", A, seed=(seed, 2, r)))
    say("small-world, rich-club and modularity metrics")
    n = len(units)
    return Connectome(
        units, dropped, correlation.astype(np.float32), edges, cutoff, len(edges) / (n * (n - 1) / 2), sign,
        small_world(A, randoms, lattices), rich_club_curve(A, randoms, min_club=min_club),
        modularity(A, seed=seed, random_refs=randoms),
        {"density_target": density, "references": references, "swaps": swaps, "seed": seed})


# ---------------------------------------------------------------- surrogate-data nulls

SURROGATE_MIN_OBSERVATIONS = 8  # per half: fewer rows give correlations too coarse to threshold


def graph_statistics(X, density: float, sign: str, seed: int) -> dict[str, float]:
    """The pipeline's numbers of one activation matrix [observations, units]: correlate, keep the strongest
    `density` of pairs, then transitivity C, mean path length L (largest component) and seeded Louvain Q."""
    edges, _ = threshold_edges(unit_correlation(X), density, sign)
    A = _from_edges(edges, X.shape[1])
    return {"transitivity": clustering(A)[1], "path_length": path_length(A)[0], "q": _louvain(A, seed)[1]}


def independent_units(X, rng: np.random.Generator) -> np.ndarray:
    """X with each unit (column) permuted on its own across observations: every unit keeps its values and
    distribution, and no two units are related any more."""
    return rng.permuted(np.asarray(X), axis=0)


def surrogate_nulls(X, *, density: float, sign: str = "positive", surrogates: int = 10, seed: int = 0,
                    say: Callable[[str], None] = lambda message: None) -> dict[str, np.ndarray]:
    """The claims' nulls for a correlation graph: the same pipeline on surrogate activations whose inter-unit
    dependence is removed (`independent_units`), `surrogates` times, for the whole X and for each half of
    its observations (the replication refits everything on each half).

    Degree-preserving swaps keep the clustering that thresholding a correlation matrix creates by itself
    (correlation is partly transitive: Zalesky, Fornito & Bullmore 2012), so on independent units they
    call the graph small-world; a surrogate graph made by the same pipeline has that clustering too.
    Returns {"<part>_<statistic>": value} for the observed graphs and {"<part>_surrogate_<statistic>": [S]},
    part in whole, half_a, half_b (halves: a seeded split of the observations)."""
    X = np.asarray(X, np.float64)
    if surrogates < 2:
        raise MlxscanError(f"--surrogates {surrogates}: a null needs at least 2 surrogates to have a spread")
    if len(X) < 2 * SURROGATE_MIN_OBSERVATIONS:
        raise MlxscanError(f"{len(X)} observations: surrogate nulls need at least {2 * SURROGATE_MIN_OBSERVATIONS} "
                           f"({SURROGATE_MIN_OBSERVATIONS} per half); scan more stimuli")
    rng = np.random.default_rng([seed, 31])
    order = rng.permutation(len(X))
    parts = {"whole": X, "half_a": X[np.sort(order[: len(X) // 2])], "half_b": X[np.sort(order[len(X) // 2:])]}
    out: dict[str, np.ndarray] = {}
    for part, rows in parts.items():
        for name, value in graph_statistics(rows, density, sign, seed).items():
            out[f"{part}_{name}"] = np.float64(value)
        draws: dict[str, list[float]] = {}
        for s in range(surrogates):
            say(f"surrogate graphs ({part}) {s + 1}/{surrogates}")
            for name, value in graph_statistics(independent_units(rows, rng), density, sign, seed).items():
                draws.setdefault(name, []).append(value)
        out.update({f"{part}_surrogate_{name}": np.asarray(values) for name, values in draws.items()})
    return out
