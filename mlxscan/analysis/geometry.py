"""Representational geometry: CKA and RSA between layers, within one scan or across two.

Inputs are plain NumPy arrays (read-only memory maps welcome; scans are read one layer at a time):
    X, Y      [n_stimuli, width]            one layer's representation of each stimulus
    A, B      [n_stimuli, n_layers, width]  a pooled scan site, as the store writes it
    labels    [n_stimuli]                   the condition of each stimulus (any sortable values)
    an RDM    [n, n]                        symmetric dissimilarities, zero diagonal

Arithmetic is float64: CKA subtracts large, nearly equal sums, and float32 loses the small
differences that tell layers apart.

References: Kornblith et al. 2019 (linear CKA); Song et al. 2012 (unbiased HSIC), used as
"debiased CKA" by Nguyen et al. 2021; Kriegeskorte et al. 2008 (RSA); Mantel 1967.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from scipy.spatial.distance import pdist, squareform
from scipy.stats import rankdata

from ..errors import MlxscanError

__all__ = ["MantelResult", "linear_cka", "cka_matrix", "rdm", "condition_rdm", "rsa_matrix",
           "rdm_similarity_test", "RDM_METRICS"]

RDM_METRICS = ("correlation", "euclidean")
MIN_STIMULI = 3  # fewer leaves no pair of dissimilarities to compare
MIN_STIMULI_DEBIASED = 4  # the unbiased HSIC estimator divides by n - 3
# A layer whose centered energy is below this fraction of its raw energy is constant up to rounding:
# CKA with it would compare rounding noise, so it is reported as NaN instead.
NO_VARIANCE = 1e-20
# cka_matrix keeps every layer's [n, n] Gram matrix while they fit in this much memory: a pair then
# costs n² instead of n·width_a·width_b (about 8× faster at 1,000 stimuli and width 576).
GRAM_BUDGET_BYTES = 1 << 30


# ---------------------------------------------------------------- validation


def _check_matrix(X, name: str) -> np.ndarray:
    """[n, width] float64, finite, at least MIN_STIMULI rows."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise MlxscanError(f"{name} must be [n_stimuli, width]; got shape {X.shape}")
    _check_rows_and_values(X, name)
    return X


def _check_rows_and_values(X: np.ndarray, name: str) -> None:
    if X.shape[0] < MIN_STIMULI:
        raise MlxscanError(f"{name} has {X.shape[0]} stimuli; geometry needs at least {MIN_STIMULI}")
    if not np.isfinite(X).all():
        raise MlxscanError(f"{name} contains NaN or infinite values; drop those stimuli or rescan them")


def _check_scan(A, name: str) -> None:
    """Shape checks only: the values are checked layer by layer as they are read."""
    shape = getattr(A, "shape", None)
    if shape is None or len(shape) != 3:
        raise MlxscanError(f"{name} must be [n_stimuli, n_layers, width]; got shape {shape}")
    if shape[0] < MIN_STIMULI:
        raise MlxscanError(f"{name} has {shape[0]} stimuli; geometry needs at least {MIN_STIMULI}")
    if shape[1] < 1:
        raise MlxscanError(f"{name} has no layers")


def _check_same_stimuli(A, B, names: str = "A and B") -> None:
    if B is not None and A.shape[0] != B.shape[0]:
        raise MlxscanError(f"{names} hold different numbers of stimuli ({A.shape[0]} and {B.shape[0]}); "
                           "compare scans of the same stimulus set")


def _load_layer(A, layer: int, name: str) -> np.ndarray:
    """One layer of a scan as float64 [n, width]; only this slice of a memory map is read."""
    X = np.array(A[:, layer, :], dtype=np.float64)
    _check_rows_and_values(X, f"{name} layer {layer}")
    return X


def _check_metric(metric: str) -> None:
    if metric not in RDM_METRICS:
        raise MlxscanError(f"unknown RDM metric {metric!r}; choose one of {', '.join(RDM_METRICS)}")


# ---------------------------------------------------------------- CKA


@dataclass(frozen=True)
class _LayerStats:
    """What CKA needs from one layer, computed once and reused for every pair it is in."""

    features: np.ndarray | None  # [n, width] column-centered; kept when the Gram is not
    gram: np.ndarray | None  # [n, n] Gram matrix of the centered features
    sq_norms: np.ndarray  # [n] the Gram's diagonal: squared norms of the centered rows
    self_inner: float  # <K, K> = ||Xcᵀ Xc||_F²
    has_variance: bool


def _layer_stats(X: np.ndarray, gram_fits: bool = False) -> _LayerStats:
    """Keep the Gram when it is no larger than the features, or when the caller has room for it."""
    centered = X - X.mean(axis=0)  # [n, width]
    n, width = centered.shape
    sq_norms = np.einsum("ij,ij->i", centered, centered)  # [n]
    has_variance = bool(sq_norms.sum() > NO_VARIANCE * np.einsum("ij,ij->", X, X))
    if width < n and not gram_fits:
        cov = centered.T @ centered  # [width, width]
        return _LayerStats(centered, None, sq_norms, float(np.vdot(cov, cov)), has_variance)
    gram = centered @ centered.T  # [n, n]
    return _LayerStats(None, gram, sq_norms, float(np.vdot(gram, gram)), has_variance)


def _gram_inner(a: _LayerStats, b: _LayerStats) -> float:
    """<K_a, K_b> = ||Xbᵀ Xa||_F², by the cheapest route the stored forms allow."""
    if a.features is not None and b.features is not None:
        cross = b.features.T @ a.features  # [width_b, width_a]
        return float(np.vdot(cross, cross))
    if a.gram is not None and b.gram is not None:
        return float(np.vdot(a.gram, b.gram))
    features, gram = (a.features, b.gram) if a.features is not None else (b.features, a.gram)
    return float(np.vdot(gram @ features, features))  # tr(Fᵀ G F)


def _hsic(a: _LayerStats, b: _LayerStats, inner: float, debiased: bool) -> float:
    """HSIC up to a factor shared by numerator and denominator of CKA (so it cancels)."""
    if not debiased:
        return inner  # centered Grams: HSIC = <K, L> / (n - 1)²
    # Song et al. 2012 with K̃ = K minus its diagonal. For centered features K·1 = 0, so K̃·1 = −diag(K)
    # and every sum in the estimator reduces to the rows' squared norms.
    n = a.sq_norms.shape[0]
    diagonal = float(a.sq_norms @ b.sq_norms)
    trace = inner - diagonal  # tr(K̃ L̃)
    sums = float(a.sq_norms.sum()) * float(b.sq_norms.sum()) / ((n - 1) * (n - 2))  # (1ᵀK̃1)(1ᵀL̃1)/…
    cross = 2.0 * diagonal / (n - 2)  # 2·1ᵀK̃L̃1/(n − 2)
    return (trace + sums - cross) / (n * (n - 3))


def _cka(a: _LayerStats, b: _LayerStats, debiased: bool) -> float:
    if not (a.has_variance and b.has_variance):
        return float("nan")
    denominator = _hsic(a, a, a.self_inner, debiased) * _hsic(b, b, b.self_inner, debiased)
    if not denominator > 0:  # the unbiased self-HSIC can fall to ≤ 0 for tiny, degenerate n
        return float("nan")
    return _hsic(a, b, _gram_inner(a, b), debiased) / float(np.sqrt(denominator))


def _check_debiased_n(n: int, debiased: bool) -> None:
    if debiased and n < MIN_STIMULI_DEBIASED:
        raise MlxscanError(f"debiased CKA needs at least {MIN_STIMULI_DEBIASED} stimuli; got {n}")


def linear_cka(X, Y, *, debiased: bool = False) -> float:
    """Linear CKA between two representations of the same n stimuli.

    X: [n, p], Y: [n, q]. Biased (Kornblith et al. 2019): ||Ycᵀ Xc||_F² / (||Xcᵀ Xc||_F ||Ycᵀ Yc||_F),
    invariant to rotation, isotropic scaling and translation; in [0, 1]. With few stimuli and wide
    layers it is well above 0 even for unrelated data. `debiased=True` uses the unbiased HSIC estimator
    instead, which is ≈ 0 for unrelated data at any n (and may be slightly negative).
    Returns NaN when either representation is constant across stimuli (CKA is undefined there).
    """
    X, Y = _check_matrix(X, "X"), _check_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise MlxscanError(f"X and Y hold different numbers of stimuli ({X.shape[0]} and {Y.shape[0]})")
    _check_debiased_n(X.shape[0], debiased)
    return _cka(_layer_stats(X), _layer_stats(Y), debiased)


def cka_matrix(A, B=None, *, debiased: bool = False,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Layer × layer linear CKA: [L_a, L_b] for A [n, L_a, width_a] and B [n, L_b, width_b].

    B=None compares A's layers with each other: the result is symmetric with diagonal 1 (NaN for a
    constant layer), and only the upper triangle is computed. Each layer is read once and kept as
    its Gram matrix [n, n] while all of them fit in GRAM_BUDGET_BYTES (or when width ≥ n), otherwise as
    centered features [n, width]. `progress(done, total)` is called after each row of the matrix,
    counting layer pairs.
    """
    _check_scan(A, "A")
    if B is not None:
        _check_scan(B, "B")
        _check_same_stimuli(A, B)
    _check_debiased_n(A.shape[0], debiased)
    n_layers = A.shape[1] + (0 if B is None else B.shape[1])
    gram_fits = n_layers * A.shape[0] ** 2 * 8 <= GRAM_BUDGET_BYTES
    stats_a = [_layer_stats(_load_layer(A, layer, "A"), gram_fits) for layer in range(A.shape[1])]
    stats_b = stats_a if B is None else [_layer_stats(_load_layer(B, layer, "B"), gram_fits)
                                         for layer in range(B.shape[1])]
    within = B is None
    n_a, n_b = len(stats_a), len(stats_b)
    total = n_a * (n_a + 1) // 2 if within else n_a * n_b
    result = np.empty((n_a, n_b))
    done = 0
    for i, a in enumerate(stats_a):
        first = i if within else 0
        for j in range(first, n_b):
            b = stats_b[j]
            if within and i == j:
                result[i, j] = 1.0 if a.has_variance else np.nan  # exact, not 1 ± rounding
            else:
                result[i, j] = _cka(a, b, debiased)
            if within:
                result[j, i] = result[i, j]
        done += n_b - first
        if progress is not None:
            progress(done, total)
    return result


# ---------------------------------------------------------------- RSA


def rdm(X, metric: str = "correlation") -> np.ndarray:
    """Representational dissimilarity matrix [n, n] of X [n, width].

    "correlation": 1 − Pearson correlation between two stimuli's patterns (in [0, 2]);
    "euclidean": the distance between them. Symmetric, with an exact zero diagonal.
    """
    _check_metric(metric)
    X = _check_matrix(X, "X")
    if metric == "euclidean":
        return squareform(pdist(X, "euclidean"))
    patterns = X - X.mean(axis=1, keepdims=True)  # [n, width]
    norms = np.linalg.norm(patterns, axis=1)  # [n]
    flat = norms <= 1e-12 * np.linalg.norm(X, axis=1)
    if flat.any():
        raise MlxscanError(f"stimulus {int(np.flatnonzero(flat)[0])} has the same value in every feature, so "
                           "its correlation distance is undefined; use metric='euclidean'")
    patterns /= norms[:, None]
    dissimilarity = 1.0 - patterns @ patterns.T  # [n, n]
    dissimilarity = np.clip((dissimilarity + dissimilarity.T) / 2, 0.0, 2.0)
    np.fill_diagonal(dissimilarity, 0.0)
    return dissimilarity


def _condition_means(X: np.ndarray, labels, name: str = "X") -> np.ndarray:
    """[k, width]: the mean pattern of each condition, conditions in np.unique(labels) order."""
    labels = np.asarray(labels)
    if labels.shape != (X.shape[0],):
        raise MlxscanError(f"labels must have one entry per stimulus ({X.shape[0]}); got shape {labels.shape}")
    _, condition = np.unique(labels, return_inverse=True)  # [n] index of each stimulus's condition
    k = int(condition.max()) + 1
    if k < MIN_STIMULI:
        raise MlxscanError(f"{name}: {k} conditions; a condition RDM needs at least {MIN_STIMULI}")
    membership = np.zeros((k, X.shape[0]))  # [k, n]
    membership[condition, np.arange(X.shape[0])] = 1.0
    return (membership / membership.sum(axis=1, keepdims=True)) @ X


def condition_rdm(X, labels, metric: str = "correlation") -> np.ndarray:
    """RDM [k, k] of the k condition means of X [n, width]; rows follow np.unique(labels)."""
    _check_metric(metric)
    return rdm(_condition_means(_check_matrix(X, "X"), labels), metric)


def _upper(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(matrix.shape[0], k=1)]


def _standard_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (ties averaged) centered to mean 0 and scaled to norm 1, so a dot product is Spearman's rho."""
    ranks = rankdata(values)
    ranks -= ranks.mean()
    norm = np.linalg.norm(ranks)
    return ranks / norm if norm > 0 else np.full_like(ranks, np.nan)  # all dissimilarities equal


def _layer_rdm_ranks(A, name: str, labels, metric: str) -> np.ndarray:
    """[n_layers, n_pairs]: each layer's RDM upper triangle as standardized ranks."""
    rows = []
    for layer in range(A.shape[1]):
        X = _load_layer(A, layer, name)
        if labels is not None:
            X = _condition_means(X, labels, name)
        rows.append(_standard_ranks(_upper(rdm(X, metric))))
    return np.stack(rows)


def rsa_matrix(A, B=None, *, labels=None, metric: str = "correlation") -> np.ndarray:
    """Layer × layer RSA: Spearman's rho between the RDMs of every layer pair, [L_a, L_b].

    A [n, L_a, width_a], B [n, L_b, width_b] (B=None: A against itself, symmetric). With `labels` [n],
    each layer's RDM is over the condition means rather than single stimuli. Each layer's RDM is reduced
    to its ranked upper triangle and kept, so memory is about (L_a + L_b) · m² / 2 · 8 bytes for m
    stimuli (or conditions).
    """
    _check_metric(metric)
    _check_scan(A, "A")
    if B is not None:
        _check_scan(B, "B")
        _check_same_stimuli(A, B)
    ranks_a = _layer_rdm_ranks(A, "A", labels, metric)  # [L_a, n_pairs]
    ranks_b = ranks_a if B is None else _layer_rdm_ranks(B, "B", labels, metric)  # [L_b, n_pairs]
    result = ranks_a @ ranks_b.T
    if B is None:
        result = (result + result.T) / 2
        np.fill_diagonal(result, np.where(np.isnan(ranks_a[:, 0]), np.nan, 1.0))
    return result


class MantelResult(NamedTuple):
    """A named, immutable pair, so `rho, p = rdm_similarity_test(...)` also works."""

    rho: float  # Spearman correlation of the two RDMs' upper triangles
    p_value: float  # one-sided: the chance of a rho this large from unrelated stimulus orders


def _check_rdm(D, name: str) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise MlxscanError(f"{name} must be a square [n, n] RDM; got shape {D.shape}")
    _check_rows_and_values(D, name)
    if not np.allclose(D, D.T):
        raise MlxscanError(f"{name} is not symmetric; an RDM holds one dissimilarity per pair of stimuli")
    return D


def rdm_similarity_test(rdm_a, rdm_b, *, permutations: int = 1000, seed: int = 0) -> MantelResult:
    """Mantel test: is rdm_a's structure related to rdm_b's beyond chance?

    rho is Spearman's correlation between the upper triangles. The null relabels the stimuli of rdm_b
    (its rows and columns permuted together, keeping its own structure intact); the p-value is
    (1 + #{null rho ≥ rho}) / (1 + permutations), so it is never 0.
    """
    D_a, D_b = _check_rdm(rdm_a, "rdm_a"), _check_rdm(rdm_b, "rdm_b")
    if D_a.shape != D_b.shape:
        raise MlxscanError(f"the RDMs cover different numbers of stimuli ({D_a.shape[0]} and {D_b.shape[0]})")
    if permutations < 1:
        raise MlxscanError(f"permutations must be at least 1; got {permutations}")
    n = D_a.shape[0]
    rows, cols = np.triu_indices(n, k=1)
    ranks_a = _standard_ranks(D_a[rows, cols])  # [n_pairs]
    # Permuting stimuli only reorders rdm_b's entries, so its ranks are computed once and then reordered.
    ranks_b = np.zeros((n, n))
    ranks_b[rows, cols] = _standard_ranks(D_b[rows, cols])
    ranks_b += ranks_b.T
    rho = float(ranks_a @ ranks_b[rows, cols])
    if np.isnan(rho):
        raise MlxscanError("an RDM with all dissimilarities equal has no rank structure to test")
    generator = np.random.default_rng(seed)
    at_least = 0
    for _ in range(permutations):
        order = generator.permutation(n)
        # Tolerance: a permutation that reproduces rho exactly must count, whatever the rounding.
        at_least += ranks_a @ ranks_b[order[rows], order[cols]] >= rho - 1e-12
    return MantelResult(rho, float((1 + at_least) / (1 + permutations)))
