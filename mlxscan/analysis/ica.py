"""Functional networks by spatial ICA, as fMRI finds brain networks: which neurons rise and fall together.

Input is a token-level recording `signals` [n_tokens, n_neurons] (a scan's `mlp_act` [n_tokens,
n_layers, d_mlp] is reshaped to all layers side by side). The recipe, after Liu et al. ("Brain-inspired
exploration of functional networks and key neurons in LLMs"), which follows CanICA from fMRI:
  1. z-score every neuron over tokens (in float32, in place: 6k tokens x 46k neurons is 1.1 GB);
  2. keep the top `n_components` spatial principal components (randomized SVD, never a full one);
  3. FastICA over neurons (neurons are the samples, so the maps are what is independent), from several
     seeds, keeping the sparsest solution (smallest mean |map|: every map has unit variance);
  4. each map is signed so its heavy tail is positive, z-scored over neurons, and the neurons with
     |z| > threshold are the network's key neurons (3.6 in the paper's code).
Time courses [n_tokens, k] are the least-squares fit of the z-scored signals onto the maps.

Consistency (`split_half_consistency`) refits on two halves of the texts and matches maps one to one
by absolute spatial correlation (Hungarian); the null matches the same maps after shuffling which
neuron is which in one half, which keeps each map's sparsity and only breaks the correspondence.

NumPy, SciPy and scikit-learn only.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import MlxscanError
from ._json import jsonable as _jsonable

__all__ = ["FunctionalNetworks", "Consistency", "functional_networks", "split_half_consistency",
           "standardize_signals", "match_maps", "gaussian_surrogate", "token_rows", "layer_span", "key_neurons_by_layer", "KEY_THRESHOLD"]

KEY_THRESHOLD = 3.6  # |z| of a spatial map above which a neuron is a key neuron (the paper's code)
ROW_CHUNK = 512  # tokens per chunk when copying a memory-mapped recording into float32
MAX_ITER = 400




@dataclass(frozen=True, eq=False)
class FunctionalNetworks:
    """k networks found by spatial ICA, ordered by the variance each explains (largest first)."""

    maps: np.ndarray  # [k, n_neurons] unit-variance spatial maps, heavy tail positive
    z_maps: np.ndarray  # [k, n_neurons] each map z-scored over neurons
    key_mask: np.ndarray  # [k, n_neurons] bool: |z| > threshold
    time_courses: np.ndarray  # [n_tokens, k] least-squares loadings of each token on each map
    variance_explained: np.ndarray  # [k] ||time course||^2 ||map||^2 / ||Z||^2 (maps overlap: not additive)
    pca_variance: float  # fraction of the z-scored signals' variance the k principal components keep
    threshold: float
    restart_sparsity: np.ndarray  # [restarts] mean |map| of each FastICA restart (lower: sparser)
    chosen_restart: int
    converged: bool  # the chosen restart converged within MAX_ITER iterations
    n_live: int  # neurons that vary over tokens (constant ones are left out of every map: z = 0)
    seed: int

    @property
    def n_components(self) -> int:
        return int(self.maps.shape[0])

    @property
    def key_counts(self) -> np.ndarray:
        return self.key_mask.sum(axis=1)

    def to_dict(self) -> dict:
        return _jsonable({
            "n_components": self.n_components, "n_neurons": int(self.maps.shape[1]), "n_live": self.n_live,
            "threshold": self.threshold, "key_counts": self.key_counts, "variance_explained": self.variance_explained,
            "pca_variance": self.pca_variance, "restart_sparsity": self.restart_sparsity,
            "chosen_restart": self.chosen_restart, "converged": self.converged, "seed": self.seed,
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return {"maps": self.maps, "z_maps": self.z_maps, "key_mask": self.key_mask,
                "time_courses": self.time_courses, "variance_explained": self.variance_explained}


def _as_matrix(signals) -> np.ndarray:
    """[n_tokens, n_neurons] view: a [n_tokens, n_layers, width] recording has its layers side by side."""
    if not hasattr(signals, "ndim") or signals.ndim not in (2, 3):
        raise MlxscanError(f"signals must be [n_tokens, n_neurons] or [n_tokens, n_layers, width]; got "
                           f"shape {getattr(signals, 'shape', None)}")
    return signals.reshape(signals.shape[0], -1) if signals.ndim == 3 else signals


def standardize_signals(signals, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """(Z [n_rows, n_neurons] float32, live [n_neurons] bool): each neuron z-scored over the chosen tokens.

    Copied chunk by chunk (a memory-mapped float16 recording is never expanded twice); neurons that do not
    vary are set to 0 and marked not live. Non-finite values are an error.
    """
    matrix = _as_matrix(signals)
    rows = np.arange(matrix.shape[0]) if rows is None else np.asarray(rows, np.int64)
    Z = np.empty((len(rows), matrix.shape[1]), np.float32)
    for start in range(0, len(rows), ROW_CHUNK):
        Z[start:start + ROW_CHUNK] = matrix[rows[start:start + ROW_CHUNK]]
    if not np.isfinite(Z).all():
        raise MlxscanError("the signals contain NaN or inf; rescan in float32 (float16 can overflow)")
    mean = Z.mean(axis=0, dtype=np.float64)
    Z -= mean.astype(np.float32)
    std = np.sqrt(np.einsum("ij,ij->j", Z, Z, dtype=np.float64) / len(Z))
    live = (std > 0) & (std > 1e-6 * np.abs(mean))  # below float32 rounding of the mean: constant
    Z *= np.where(live, 1.0 / np.where(live, std, 1.0), 0.0).astype(np.float32)
    return Z, live


def _check(shape: tuple[int, int], n_components: int, threshold: float, restarts: int) -> None:
    if n_components < 1:
        raise MlxscanError(f"--components {n_components}: ask for at least one component")
    if n_components >= min(shape):
        raise MlxscanError(f"--components {n_components} needs more tokens and neurons than components; the "
                           f"signals are {shape[0]} tokens x {shape[1]} neurons")
    if not threshold > 0:
        raise MlxscanError(f"--threshold {threshold}: give a positive |z| threshold (the paper uses 3.6)")
    if restarts < 1:
        raise MlxscanError("restarts must be at least 1")


def _sparsest_ica(spatial_pcs: np.ndarray, restarts: int, seed: int) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """FastICA on [n_neurons, k] from `restarts` seeds; (sources [n_neurons, k], sparsity per restart, chosen, converged)."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    seeds = np.random.default_rng([seed, 17]).integers(0, 2**31 - 1, size=restarts)
    solutions, sparsity, converged = [], [], []
    for restart_seed in seeds:
        ica = FastICA(n_components=spatial_pcs.shape[1], whiten="unit-variance", max_iter=MAX_ITER, tol=1e-4,
                      random_state=int(restart_seed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the result instead
            sources = ica.fit_transform(spatial_pcs)  # [n_neurons, k]
        solutions.append(sources)
        sparsity.append(float(np.mean(np.abs(sources))))
        converged.append(ica.n_iter_ < MAX_ITER)
    chosen = int(np.argmin(sparsity))
    return solutions[chosen], np.array(sparsity), chosen, bool(converged[chosen])


def _fit_standardized(Z: np.ndarray, live: np.ndarray, n_components: int, threshold: float, restarts: int,
                      seed: int) -> FunctionalNetworks:
    from sklearn.utils.extmath import randomized_svd

    total = float(np.einsum("ij,ij->", Z, Z, dtype=np.float64))
    if total == 0:
        raise MlxscanError("every neuron is constant over these tokens; there is nothing to decompose")
    _, singular, Vt = randomized_svd(Z, n_components, n_oversamples=10, n_iter=4, random_state=seed)
    sources, sparsity, chosen, converged = _sparsest_ica(Vt.T.astype(np.float64), restarts, seed)
    maps = sources.T  # [k, n_neurons]
    skew = np.mean(maps**3, axis=1)
    maps = maps * np.where(skew < 0, -1.0, 1.0)[:, None]  # heavy tail positive: the sign ICA leaves free
    # Least squares Z ~ T @ maps, solved through the k x k Gram matrix (maps are full rank).
    time_courses = np.linalg.solve(maps @ maps.T, maps.astype(np.float32) @ Z.T).T  # [n_tokens, k]
    explained = np.sum(time_courses**2, axis=0) * np.sum(maps**2, axis=1) / total
    order = np.argsort(-explained, kind="stable")
    maps, time_courses, explained = maps[order], time_courses[:, order], explained[order]
    z_maps = (maps - maps.mean(axis=1, keepdims=True)) / maps.std(axis=1, keepdims=True)
    return FunctionalNetworks(
        maps=maps.astype(np.float32), z_maps=z_maps.astype(np.float32), key_mask=np.abs(z_maps) > threshold,
        time_courses=time_courses.astype(np.float32), variance_explained=explained,
        pca_variance=float(np.sum(singular**2) / total), threshold=float(threshold), restart_sparsity=sparsity,
        chosen_restart=chosen, converged=converged, n_live=int(live.sum()), seed=seed)


def functional_networks(signals, n_components: int = 20, *, threshold: float = KEY_THRESHOLD, restarts: int = 5,
                        seed: int = 0, rows=None) -> FunctionalNetworks:
    """Spatial ICA of signals [n_tokens, n_neurons] (or [n_tokens, n_layers, width]); `rows` picks tokens.

    See the module docstring for the recipe; memory is one float32 copy of the chosen rows.
    """
    from threadpoolctl import threadpool_limits

    matrix = _as_matrix(signals)
    _check((matrix.shape[0] if rows is None else len(rows), matrix.shape[1]), n_components, threshold, restarts)
    Z, live = standardize_signals(matrix, rows)
    # One BLAS thread: the products are thin (k ~ 20 columns), and on a busy machine threads spinning for
    # each other were 2-3.5x slower (measured with 2 cores shared: randomized SVD 6.0 s vs 3.1 s, three
    # FastICA restarts 31.6 s vs 9.0 s); idle, two threads saved under a second.
    with threadpool_limits(limits=1):
        return _fit_standardized(Z, live, n_components, threshold, restarts, seed)


# ---------------------------------------------------------------------------------------------
# Matching and consistency


def _correlations(maps_a: np.ndarray, maps_b: np.ndarray) -> np.ndarray:
    """[k_a, k_b] Pearson correlation of every pair of maps over neurons."""
    def unit(maps):
        centred = np.asarray(maps, np.float64) - np.mean(maps, axis=1, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        return centred / np.where(norms > 0, norms, 1.0)
    return unit(maps_a) @ unit(maps_b).T


def match_maps(maps_a, maps_b) -> tuple[np.ndarray, np.ndarray]:
    """(partner [k_a] index into maps_b or -1, |r| [k_a]): the one-to-one pairing with the largest total |r|."""
    from scipy.optimize import linear_sum_assignment

    strength = np.abs(_correlations(maps_a, maps_b))
    rows, cols = linear_sum_assignment(strength, maximize=True)
    partner, matched = np.full(len(strength), -1), np.full(len(strength), np.nan)
    partner[rows], matched[rows] = cols, strength[rows, cols]
    return partner, matched


def _iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    union = np.logical_or(mask_a, mask_b).sum()
    return float(np.logical_and(mask_a, mask_b).sum() / union) if union else math.nan


@dataclass(frozen=True, eq=False)
class Consistency:
    """Do the networks come back when the model reads other texts? Two fits on disjoint halves of the texts."""

    half_a_texts: np.ndarray  # [n_a] text indices of half A (the rest are half B)
    correlation: np.ndarray  # [k] |r| of each half-A map with its half-B partner (Hungarian over |r|)
    key_iou: np.ndarray  # [k] |A ∩ B| / |A ∪ B| of the partners' key neurons
    null_correlation: np.ndarray  # [permutations, k] the same after shuffling neurons in half B
    null_iou: np.ndarray  # [permutations, k]
    reference_correlation: np.ndarray | None  # [k_ref] per network of a reference fit: |r| of its A and B partners
    reference_iou: np.ndarray | None  # [k_ref]
    surrogate_correlation: np.ndarray | None = None  # [surrogates, k] the same split and matching on Gaussian surrogates
    second_correlation: np.ndarray | None = None  # [k] a second, independent split of the real texts
    second_surrogate_correlation: np.ndarray | None = None  # [surrogates, k] its surrogates
    skip_first: bool = True  # each text's position 0 left out

    @property
    def null_threshold(self) -> float:
        """95th percentile over permutations of the best matched |r|: above it a pair beats the shuffle."""
        return float(np.percentile(self.null_correlation.max(axis=1), 95))

    def to_dict(self) -> dict:
        null_iou = self.null_iou[np.isfinite(self.null_iou)]  # NaN: neither map had key neurons
        return _jsonable({
            "correlation": self.correlation, "key_iou": self.key_iou,
            "null_correlation_mean": float(self.null_correlation.mean()),
            "null_correlation_95_of_max": self.null_threshold,
            "null_iou_mean": float(null_iou.mean()) if null_iou.size else None,
            "n_above_null": int(np.sum(self.correlation > self.null_threshold)),
            "reference_correlation": self.reference_correlation, "reference_iou": self.reference_iou,
            "n_half_a_texts": len(self.half_a_texts), "first_token_left_out": self.skip_first,
            "surrogates": 0 if self.surrogate_correlation is None else len(self.surrogate_correlation),
            "surrogate_correlation_mean": None if self.surrogate_correlation is None
            else float(self.surrogate_correlation.mean()),
            "second_split_correlation_mean": None if self.second_correlation is None
            else float(self.second_correlation.mean()),
        })

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"half_a_texts": self.half_a_texts, "split_correlation": self.correlation,
               "split_key_iou": self.key_iou, "null_correlation": self.null_correlation, "null_iou": self.null_iou}
        if self.reference_correlation is not None:
            out.update(reference_correlation=self.reference_correlation, reference_iou=self.reference_iou)
        for key in ("surrogate_correlation", "second_correlation", "second_surrogate_correlation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _rows_of(offsets: np.ndarray, texts: np.ndarray, skip_first: bool = False) -> np.ndarray:
    """Token rows of the given texts; with skip_first, without each text's position 0 (the attention sink,
    whose activations dwarf the rest and would make a network of their own)."""
    start = int(skip_first)
    return np.concatenate([np.arange(offsets[i] + start, offsets[i + 1]) for i in np.sort(texts)])


def token_rows(offsets, skip_first: bool = True) -> np.ndarray | None:
    """Rows of every text (None: all rows), less each text's first token when skip_first."""
    offsets = np.asarray(offsets, np.int64)
    return _rows_of(offsets, np.arange(len(offsets) - 1), True) if skip_first else None


def gaussian_surrogate(signals, rows, rank: int, seed: int) -> np.ndarray:
    """[len(rows), n_neurons] float32 Gaussian rows with the z-scored signals' covariance: exact in its top
    `rank` principal directions, the rest per neuron (diagonal), so every neuron keeps unit variance.
    Same shape as the real signals; nothing in it is independent or sparse, so ICA finds no networks there."""
    from sklearn.utils.extmath import randomized_svd

    Z, _ = standardize_signals(signals, rows)
    n = len(Z)
    rank = max(1, min(rank, min(Z.shape) - 1))
    _, singular, Vt = randomized_svd(Z, rank, n_oversamples=10, n_iter=4, random_state=seed % (2**31))
    rng = np.random.default_rng([seed, 31])
    scale = (singular / math.sqrt(n)).astype(np.float32)
    out = (rng.standard_normal((n, rank), dtype=np.float32) * scale) @ Vt.astype(np.float32)
    variance = np.einsum("ij,ij->j", Z, Z, dtype=np.float64) / n
    kept = np.einsum("k,kj->j", scale.astype(np.float64) ** 2, Vt.astype(np.float64) ** 2)
    residual = np.sqrt(np.clip(variance - kept, 0, None)).astype(np.float32)
    del Z
    out += rng.standard_normal(out.shape, dtype=np.float32) * residual
    return out


def _split_fit(signals, offsets, halves, n_components, threshold, restarts, seed, skip_first):
    fits = [functional_networks(signals, n_components, threshold=threshold, restarts=restarts, seed=seed,
                                rows=_rows_of(offsets, half, skip_first)) for half in halves]
    return fits, match_maps(fits[0].maps, fits[1].maps)


def _surrogate_split(signals, offsets, halves, n_components, threshold, restarts, seed, skip_first, surrogates):
    """[surrogates, k]: the same split and matching run on covariance-matched Gaussian surrogates."""
    rows = _rows_of(offsets, np.arange(len(offsets) - 1), skip_first)
    new_offsets = np.concatenate([[0], np.cumsum(np.diff(offsets) - (1 if skip_first else 0))])
    out = np.zeros((surrogates, n_components))
    for s in range(surrogates):
        fake = gaussian_surrogate(signals, rows, max(2 * n_components, 50), seed=seed * 1000 + 101 + s)
        _, (_, out[s]) = _split_fit(fake, new_offsets, halves, n_components, threshold, restarts, seed, False)
        del fake
    return out


def split_half_consistency(signals, offsets, n_components: int = 20, *, threshold: float = KEY_THRESHOLD,
                           restarts: int = 5, seed: int = 0, permutations: int = 20,
                           reference: FunctionalNetworks | None = None, skip_first: bool = False,
                           surrogates: int = 0, second_split: bool = False) -> Consistency:
    """Fit on two random halves of the texts (offsets [n_texts + 1] bound each text's tokens) and match.

    With a `reference` fit (usually on all texts), each reference network is also followed into both
    halves: its half-A and half-B partners' |r| and key-neuron IoU are its consistency. `surrogates`
    reruns the same split and matching on that many covariance-matched Gaussian surrogates (the null a
    claim can fail: any low-rank Gaussian beats the neuron shuffle); `second_split` repeats all of it on a
    second, independent split of the texts (the replication). skip_first leaves out each text's position 0.
    """
    offsets = np.asarray(offsets, np.int64)
    n_texts = len(offsets) - 1
    if n_texts < 4:
        raise MlxscanError(f"split-half consistency needs at least 4 texts; got {n_texts}")
    if permutations < 1:
        raise MlxscanError("permutations must be at least 1")
    if surrogates < 0:
        raise MlxscanError("surrogates must be at least 0")
    if skip_first and np.any(np.diff(offsets) < 2):
        raise MlxscanError("a text has a single token, so leaving out position 0 leaves it empty; keep the first token")
    rng = np.random.default_rng([seed, 23])
    order = rng.permutation(n_texts)
    halves = order[: n_texts // 2], order[n_texts // 2:]
    (a, b), (partner, correlation) = _split_fit(signals, offsets, halves, n_components, threshold, restarts, seed,
                                                skip_first)
    iou = np.array([_iou(a.key_mask[i], b.key_mask[j]) for i, j in enumerate(partner)])
    null_r, null_iou = np.zeros((permutations, a.n_components)), np.zeros((permutations, a.n_components))
    for p in range(permutations):
        shuffle = rng.permutation(b.maps.shape[1])
        null_partner, null_r[p] = match_maps(a.maps, b.maps[:, shuffle])
        null_iou[p] = [_iou(a.key_mask[i], b.key_mask[j][shuffle]) for i, j in enumerate(null_partner)]
    reference_r = reference_iou = None
    if reference is not None:
        to_a, _ = match_maps(reference.maps, a.maps)
        to_b, _ = match_maps(reference.maps, b.maps)
        reference_r = np.abs(np.array([_correlations(a.maps[[i]], b.maps[[j]])[0, 0] for i, j in zip(to_a, to_b)]))
        reference_iou = np.array([_iou(a.key_mask[i], b.key_mask[j]) for i, j in zip(to_a, to_b)])
    surrogate_r = second_r = second_surrogate_r = None
    args = (n_components, threshold, restarts, seed, skip_first)
    if surrogates:
        surrogate_r = _surrogate_split(signals, offsets, halves, *args, surrogates)
    if second_split:
        order2 = np.random.default_rng([seed, 29]).permutation(n_texts)
        halves2 = order2[: n_texts // 2], order2[n_texts // 2:]
        _, (_, second_r) = _split_fit(signals, offsets, halves2, *args)
        if surrogates:
            second_surrogate_r = _surrogate_split(signals, offsets, halves2, *args, surrogates)
    return Consistency(half_a_texts=np.sort(halves[0]), correlation=correlation, key_iou=iou,
                       null_correlation=null_r, null_iou=null_iou, reference_correlation=reference_r,
                       reference_iou=reference_iou, surrogate_correlation=surrogate_r, second_correlation=second_r,
                       second_surrogate_correlation=second_surrogate_r, skip_first=skip_first)


# ---------------------------------------------------------------------------------------------
# Where the networks live


def layer_span(key_mask, n_layers: int, width: int) -> np.ndarray:
    """[k, n_layers] key neurons of each network in each layer (neurons ordered layer by layer)."""
    key_mask = np.asarray(key_mask, bool)
    if key_mask.ndim != 2 or key_mask.shape[1] != n_layers * width:
        raise MlxscanError(f"key_mask must be [k, {n_layers} * {width}]; got shape {key_mask.shape}")
    return key_mask.reshape(len(key_mask), n_layers, width).sum(axis=2)


def key_neurons_by_layer(mask_row, layers, width: int) -> dict[int, list[int]]:
    """{model layer: [units]} of one network's key neurons; `layers` names the recorded layers in order."""
    mask_row = np.asarray(mask_row, bool).reshape(len(layers), width)
    return {int(layer): np.flatnonzero(row).tolist() for layer, row in zip(layers, mask_row) if row.any()}
