"""Semi-nonnegative matrix factorization (SNMF) of MLP activations: features as co-activating neurons.

A token-level recording of one layer's MLP neurons, A [n_tokens, n_neurons] (raw activations, not
centred: a feature is something a token has more or less of, never less than nothing), is factorized

    A ≈ Y · L,   Y [n_tokens, k] ≥ 0 (how much each token expresses each feature),
                 L [k, n_neurons] unconstrained (each feature's neuron loadings),

the transposed, token-major form of A ≈ Z·Y in Shafran, Geiger & Geva (2025, "Decomposing MLP
activations into interpretable features via semi-nonnegative matrix factorization"). The updates are
Ding, Li & Jordan's (2010): L is the exact least-squares solution given Y, and Y takes the
multiplicative step Y ← Y ⊙ sqrt(([AL']⁺ + Y[LL']⁻) / ([AL']⁻ + Y[LL']⁺)); both never increase
||A − YL||², and Y stays ≥ 0 because it is only ever multiplied by non-negative factors. Y starts from
k-means cluster indicators + 0.2 (Ding et al.'s initialisation), which is what the seed changes.

Sparse loadings (`keep`), as in the paper: each feature keeps only its `keep` fraction of largest
|loadings| (winner-take-all), re-chosen after every least-squares step. Re-choosing the support can raise
the objective, so once the support has not changed for SETTLE iterations it is frozen and the fit goes
on with L the least-squares solution within it: from `settled_at` on the objective never increases.
A dense fit (no `keep`) never increases it at all.

Quality is the relative error ||A − YL|| / ||A|| against the rank-k truncated SVD of the same matrix,
the best any rank-k factorization can do (Eckart–Young). Stability matches two fits' loadings one to
one by |cosine| (Hungarian), against the same matching after shuffling which neuron is which.

NumPy, SciPy and scikit-learn only.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import MlxscanError
from ._json import jsonable as _jsonable

__all__ = ["SemiNMF", "Stability", "LayerSnmf", "semi_nmf", "svd_relative_error", "match_loadings",
           "loading_stability", "neurons_carrying", "top_tokens", "token_context", "snmf_layer"]

INIT_OFFSET = 0.2  # Ding et al.: cluster indicators + 0.2, so every token starts with some of every feature
SETTLE = 10  # iterations without a change of support after which a sparse fit's support is frozen




@dataclass(frozen=True, eq=False)
class SemiNMF:
    """One fit, features ordered by the share of ||A||² each reconstructs alone (largest first)."""

    loadings: np.ndarray  # [k, n_neurons] unit-norm neuron loadings of each feature (L, rows)
    coefficients: np.ndarray  # [n_tokens, k] ≥ 0: each token's amount of each feature (Y)
    objective: np.ndarray  # [iterations + 1] ||A − YL||² from the start, after every iteration
    energy: np.ndarray  # [k] ||Y_f||² ||L_f||² / ||A||² (features overlap: not additive)
    relative_error: float  # ||A − YL||_F / ||A||_F
    svd_relative_error: float  # the same for the rank-k truncated SVD (the floor)
    converged: bool  # the support settled and the relative decrease fell below tol, each within max_iter
    settled_at: int | None  # index into `objective` from which the support was fixed (None: dense fit)
    keep: float | None  # fraction of neurons each feature keeps (None: dense)
    seed: int

    @property
    def n_features(self) -> int:
        return int(self.loadings.shape[0])

    def neurons_carrying(self, share: float) -> np.ndarray:
        """[k] how many neurons hold `share` of each feature's squared loading."""
        return neurons_carrying(self.loadings, share)

    def to_dict(self) -> dict:
        return _jsonable({
            "n_features": self.n_features, "n_neurons": int(self.loadings.shape[1]),
            "n_tokens": int(self.coefficients.shape[0]), "relative_error": self.relative_error,
            "svd_relative_error": self.svd_relative_error, "energy": self.energy,
            "neurons_50": self.neurons_carrying(0.5), "neurons_90": self.neurons_carrying(0.9),
            "support": np.count_nonzero(self.loadings, axis=1), "iterations": len(self.objective) - 1,
            "converged": self.converged, "settled_at": self.settled_at, "keep": self.keep, "seed": self.seed,
            "active_tokens": np.count_nonzero(self.coefficients > 0, axis=0),
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return {"loadings": self.loadings, "coefficients": self.coefficients, "objective": self.objective,
                "energy": self.energy}


def neurons_carrying(loadings, share: float) -> np.ndarray:
    """[k] the fewest neurons whose squared loadings reach `share` of each row's total (0 for a zero row)."""
    squared = np.sort(np.asarray(loadings, np.float64) ** 2, axis=1)[:, ::-1]
    total = squared.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(squared, axis=1) / np.where(total > 0, total, 1.0)
    counts = np.sum(cumulative < share - 1e-12, axis=1) + 1
    return np.where(total[:, 0] > 0, counts, 0)


def _as_matrix(activations) -> np.ndarray:
    A = np.asarray(activations)
    if A.ndim != 2:
        raise MlxscanError(f"activations must be [n_tokens, n_neurons]; got shape {A.shape}")
    A = A.astype(np.float64 if A.dtype == np.float64 else np.float32, copy=False)
    if not np.isfinite(A).all():
        raise MlxscanError("the activations contain NaN or inf; rescan in float32 (float16 can overflow)")
    return A


def _check(shape: tuple[int, int], k: int, keep: float | None, max_iter: int) -> None:
    if k < 1:
        raise MlxscanError(f"--features {k}: ask for at least one feature")
    if k >= min(shape):
        raise MlxscanError(f"--features {k} needs more tokens and neurons than features; the activations are "
                           f"{shape[0]} tokens x {shape[1]} neurons")
    if keep is not None and not 0 < keep <= 1:
        raise MlxscanError(f"--keep {keep}: give the fraction of neurons each feature keeps, in (0, 1]")
    if max_iter < 1:
        raise MlxscanError("--iterations must be at least 1")


def svd_relative_error(A: np.ndarray, k: int) -> float:
    """||A − A_k|| / ||A|| for the best rank-k approximation, from the eigenvalues of the smaller Gram matrix."""
    A = np.asarray(A)
    gram = A.T @ A if A.shape[1] <= A.shape[0] else A @ A.T
    eigenvalues = np.linalg.eigvalsh(gram.astype(np.float64))[::-1]
    total = float(np.trace(gram.astype(np.float64)))
    return math.sqrt(max(0.0, 1.0 - float(np.sum(eigenvalues[:k])) / total)) if total > 0 else 0.0


def _directions(A: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm: tokens on one feature's ray, at any strength, fall in one cluster."""
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return A / np.where(norms > 0, norms, 1.0)


def _kmeans_start(A: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Y0 [n_tokens, k]: k-means cluster indicators + 0.2 (Ding et al. 2010)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: fewer clusters than k is fine
        labels = KMeans(k, n_init=1, max_iter=50, random_state=seed).fit_predict(_directions(A))
    Y = np.full((len(A), k), INIT_OFFSET, A.dtype)
    Y[np.arange(len(A)), labels] += 1.0
    return Y


def _solve_loadings(gram: np.ndarray, cross: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """L [k, n] minimizing ||A − YL||² given gram = Y'Y [k, k] and cross = Y'A [k, n]; within `mask` if given.

    The pseudo-inverse gives the exact (minimum-norm) minimizer even when a feature has died (Y_f = 0).
    """
    if mask is None:
        return np.linalg.pinv(gram) @ cross
    L = np.zeros_like(cross)
    patterns, which = np.unique(mask.T, axis=0, return_inverse=True)  # neurons sharing one support solve together
    for number, pattern in enumerate(patterns):
        support = np.flatnonzero(pattern)
        if support.size:
            columns = np.flatnonzero(which.ravel() == number)
            L[np.ix_(support, columns)] = np.linalg.pinv(gram[np.ix_(support, support)]) @ cross[np.ix_(support, columns)]
    return L


def _update_coefficients(Y: np.ndarray, AL: np.ndarray, LL: np.ndarray) -> np.ndarray:
    """Ding et al.'s multiplicative step, its ratio in float64 (a tiny float32 denominator overflows).

    A 0/0 ratio (a dead feature) leaves the entry as it is, and an entry at 0 stays 0.
    """
    Y64 = Y.astype(np.float64)
    numerator = np.maximum(AL, 0).astype(np.float64) + Y64 @ np.maximum(-LL, 0)
    denominator = np.maximum(-AL, 0).astype(np.float64) + Y64 @ np.maximum(LL, 0)
    ratio = np.divide(numerator, denominator, out=np.ones_like(numerator), where=denominator > 0)
    return np.where(Y64 > 0, Y64 * np.sqrt(ratio), 0.0).astype(Y.dtype)


def _loss(squared_norm: float, Y: np.ndarray, AL: np.ndarray, LL: np.ndarray) -> float:
    """||A − YL||² = ||A||² − 2<Y, AL> + <Y'Y, LL'>: no [n_tokens, n_neurons] residual is ever formed."""
    cross = float(np.sum(Y * AL, dtype=np.float64))
    return max(squared_norm - 2 * cross + float(np.sum((Y.T @ Y).astype(np.float64) * LL)), 0.0)


def _iterate(A, Y, squared_norm, max_iter, tol, objective: list, *, keep=None, mask=None):
    """Alternate the two updates; appends to objective. (Y, L, mask, stopped) where stopped says why it ended.

    keep: re-choose each feature's support after every L step until it holds SETTLE iterations ("settled");
    mask: a fixed support; neither: dense. A fixed or dense fit stops when the relative decrease < tol.
    """
    unchanged, start = 0, len(objective)
    for _ in range(max_iter):
        # the k x k pieces are tiny: solved in float64, so the descent is exact even for float32 data
        L = _solve_loadings((Y.T @ Y).astype(np.float64), (Y.T @ A).astype(np.float64), None if keep else mask)
        if keep is not None:
            chosen = _top_mask(L, keep)
            unchanged = unchanged + 1 if mask is not None and np.array_equal(chosen, mask) else 0
            mask, L = chosen, L * chosen
        L = L.astype(A.dtype)
        AL, LL = A @ L.T, (L @ L.T).astype(np.float64)  # [n_tokens, k], [k, k]
        Y = _update_coefficients(Y, AL, LL)
        objective.append(_loss(squared_norm, Y, AL, LL))
        if keep is not None and unchanged >= SETTLE:
            return Y, L, mask, "settled"
        # the first step of a fixed-support phase may rise above the last re-chosen one: never stop on it
        if keep is None and len(objective) - start > 1 and objective[-2] - objective[-1] <= tol * objective[-2]:
            return Y, L, mask, "converged"
    return Y, L, mask, "max_iter"


def _top_mask(L: np.ndarray, keep: float) -> np.ndarray:
    """[k, n] bool: each feature's ceil(keep · n) largest |loadings|."""
    n_keep = max(1, math.ceil(keep * L.shape[1]))
    order = np.argsort(-np.abs(L), axis=1, kind="stable")[:, :n_keep]
    mask = np.zeros(L.shape, bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def semi_nmf(activations, n_features: int, *, keep: float | None = None, max_iter: int = 500, tol: float = 1e-5,
             seed: int = 0) -> SemiNMF:
    """Factorize activations [n_tokens, n_neurons] ≈ coefficients (≥ 0) @ loadings; see the module docstring.

    keep: the fraction of neurons each feature keeps (the paper: 0.01); None or 1: dense loadings.
    max_iter bounds each phase (support search, then descent). Float64 input is fitted in float64,
    anything else in float32.
    """
    A = _as_matrix(activations)
    _check(A.shape, n_features, keep, max_iter)
    keep = None if keep == 1 else keep
    squared_norm = float(np.einsum("ij,ij->", A, A, dtype=np.float64))
    if squared_norm == 0:
        raise MlxscanError("every activation is zero; there is nothing to factorize")
    Y = _kmeans_start(A, n_features, seed)
    objective = [squared_norm]  # the objective of L = 0: where any fit starts from
    settled_at, mask, settled = None, None, True
    if keep is not None:
        Y, _, mask, why = _iterate(A, Y, squared_norm, max_iter, tol, objective, keep=keep)
        settled, settled_at = why == "settled", len(objective) - 1
    Y, L, _, why = _iterate(A, Y, squared_norm, max_iter, tol, objective, mask=mask)
    norms = np.linalg.norm(L.astype(np.float64), axis=1)
    Y = Y * norms.astype(Y.dtype)  # unit-norm loadings; the scale moves into Y (YL is unchanged)
    L = L / np.where(norms > 0, norms, 1.0)[:, None].astype(L.dtype)
    energy = np.sum(Y.astype(np.float64) ** 2, axis=0) / squared_norm
    order = np.argsort(-energy, kind="stable")
    return SemiNMF(
        loadings=L[order], coefficients=Y[:, order], objective=np.array(objective), energy=energy[order],
        relative_error=math.sqrt(objective[-1] / squared_norm), svd_relative_error=svd_relative_error(A, n_features),
        converged=settled and why == "converged", settled_at=settled_at, keep=keep, seed=seed)


# ---------------------------------------------------------------------------------------------
# Matching two fits


def match_loadings(loadings_a, loadings_b) -> tuple[np.ndarray, np.ndarray]:
    """(partner [k_a] index into loadings_b or -1, |cos| [k_a]): the one-to-one pairing of largest total |cos|."""
    from scipy.optimize import linear_sum_assignment

    def unit(rows):
        rows = np.asarray(rows, np.float64)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)

    strength = np.abs(unit(loadings_a) @ unit(loadings_b).T)
    rows, cols = linear_sum_assignment(strength, maximize=True)
    partner, matched = np.full(len(strength), -1), np.full(len(strength), np.nan)
    partner[rows], matched[rows] = cols, strength[rows, cols]
    return partner, matched


@dataclass(frozen=True, eq=False)
class Stability:
    """Do the features come back in another fit (other texts, or another seed)?"""

    kind: str  # "split-half" (fits on two disjoint halves of the texts) or "seed" (all tokens, another seed)
    cosine: np.ndarray  # [k] |cos| of each reference feature's partners in fit A and fit B
    pair_cosine: np.ndarray  # [k] |cos| of fit A's features with their Hungarian partners in fit B
    null_cosine: np.ndarray  # [permutations, k] pair_cosine after shuffling which neuron is which in fit B

    @property
    def null_threshold(self) -> float:
        """95th percentile over permutations of the best matched |cos|: above it a pair beats the shuffle."""
        return float(np.percentile(self.null_cosine.max(axis=1), 95))

    def to_dict(self) -> dict:
        return _jsonable({
            "kind": self.kind, "cosine": self.cosine, "pair_cosine": self.pair_cosine,
            "median_cosine": float(np.median(self.cosine)), "null_cosine_mean": float(self.null_cosine.mean()),
            "null_cosine_95_of_max": self.null_threshold,
            "n_above_null": int(np.sum(self.cosine > self.null_threshold)),
        })

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}_cosine": self.cosine, f"{prefix}_pair_cosine": self.pair_cosine,
                f"{prefix}_null_cosine": self.null_cosine}


def loading_stability(reference, fit_a, fit_b, *, kind: str, permutations: int = 20, seed: int = 0) -> Stability:
    """Follow each reference feature into fits A and B and compare its two partners; null: neurons shuffled in B."""
    if permutations < 1:
        raise MlxscanError("permutations must be at least 1")
    reference, fit_a, fit_b = (np.asarray(x) for x in (reference, fit_a, fit_b))
    to_a, _ = match_loadings(reference, fit_a)
    to_b, _ = match_loadings(reference, fit_b)
    cosine = np.array([_abs_cos(fit_a[i], fit_b[j]) for i, j in zip(to_a, to_b)])
    _, pair = match_loadings(fit_a, fit_b)
    rng = np.random.default_rng([seed, 29])
    null = np.array([match_loadings(fit_a, fit_b[:, rng.permutation(fit_b.shape[1])])[1] for _ in range(permutations)])
    return Stability(kind=kind, cosine=cosine, pair_cosine=pair, null_cosine=null)


def _abs_cos(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(abs(np.dot(a.astype(np.float64), b.astype(np.float64))) / norms) if norms > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Reading a feature


def top_tokens(coefficients, n_top: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [k, n], values [k, n]): each feature's tokens of largest coefficient, largest first (ties: earlier row).

    Rows where a feature is exactly 0 are never listed: a feature may have fewer than n_top tokens (row -1).
    """
    Y = np.asarray(coefficients)
    n = min(n_top, len(Y))
    rows = np.argsort(-Y, axis=0, kind="stable")[:n].T  # [k, n]
    values = np.take_along_axis(Y.T, rows, axis=1)
    return np.where(values > 0, rows, -1), np.where(values > 0, values, 0.0)


def token_context(token_ids, offsets, row: int, decode, *, before: int = 8) -> tuple[str, str]:
    """(the token at `row` as text, up to `before` tokens of its own text before it + the token in [brackets])."""
    text = int(np.searchsorted(offsets, row, side="right")) - 1
    start = max(int(offsets[text]), row - before)
    token = decode([int(token_ids[row])])
    context = decode([int(t) for t in token_ids[start:row]]) + "[" + token + "]"
    return token, context.replace("\n", "\\n")


# ---------------------------------------------------------------------------------------------
# One layer of a token-level scan


@dataclass(frozen=True, eq=False)
class LayerSnmf:
    """A layer's fit on all its tokens, the stability checks, and each feature's top tokens (as scan rows)."""

    layer: int
    fit: SemiNMF
    split_half: Stability | None  # fits on two disjoint halves of the texts
    seed_check: Stability | None  # a second fit on all tokens from another seed
    top_rows: np.ndarray  # [k, n_top] scan rows of each feature's largest coefficients (-1: none)
    top_values: np.ndarray  # [k, n_top]
    seconds: float


def _text_of(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.searchsorted(offsets, rows, side="right") - 1


def snmf_layer(signals, rows, offsets, n_features: int, *, layer: int, keep: float | None = None,
               max_iter: int = 500, tol: float = 1e-5, seed: int = 0, split_half: bool = True,
               seed_check: bool = True, permutations: int = 20, n_top: int = 8) -> LayerSnmf:
    """Fit one layer's signals [n_scan_rows, width] on `rows` (token rows; BOS left out by the caller) and check it.

    Split-half: the texts (offsets [n_texts + 1] bound each text's rows) are split at random in two and each half
    is fitted alone; each feature of the full fit is followed into both halves. Seed: all rows again from seed + 1.
    """
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    rows, offsets = np.asarray(rows, np.int64), np.asarray(offsets, np.int64)
    A = np.asarray(signals[rows], np.float32)  # one float32 copy of the chosen tokens
    settings = {"keep": keep, "max_iter": max_iter, "tol": tol}
    # One BLAS thread, as in ICA: the products are thin (k columns) and threads spinning on a shared machine cost more
    with threadpool_limits(limits=1):
        fit = semi_nmf(A, n_features, seed=seed, **settings)
        split = seeds = None
        if split_half:
            texts = np.unique(_text_of(rows, offsets))
            if len(texts) < 4:
                raise MlxscanError(f"split-half stability needs at least 4 texts; got {len(texts)}")
            half_a = np.random.default_rng([seed, 23]).permutation(texts)[: len(texts) // 2]
            in_a = np.isin(_text_of(rows, offsets), half_a)
            halves = [semi_nmf(A[part], n_features, seed=seed, **settings) for part in (in_a, ~in_a)]
            split = loading_stability(fit.loadings, halves[0].loadings, halves[1].loadings, kind="split-half",
                                      permutations=permutations, seed=seed)
        if seed_check:
            other = semi_nmf(A, n_features, seed=seed + 1, **settings)
            seeds = loading_stability(fit.loadings, fit.loadings, other.loadings, kind="seed",
                                      permutations=permutations, seed=seed)
    top, values = top_tokens(fit.coefficients, n_top)
    return LayerSnmf(layer=layer, fit=fit, split_half=split, seed_check=seeds,
                     top_rows=np.where(top >= 0, rows[np.maximum(top, 0)], -1), top_values=values,
                     seconds=time.perf_counter() - started)
