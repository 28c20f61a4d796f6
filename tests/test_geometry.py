"""CKA and RSA on synthetic data with planted answers (no mlx)."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from mlxscan.analysis import geometry
from mlxscan.analysis.geometry import (cka_matrix, condition_rdm, linear_cka, rdm, rdm_similarity_test,
                                       rsa_matrix)
from mlxscan.errors import MlxscanError


def random_rotation(size: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(size, size)))
    return q * np.sign(np.diag(r))  # sign fix: a uniformly random orthogonal matrix


def reference_cka(X, Y, debiased):
    """Straight from the papers, with explicit n × n matrices: Kornblith et al. 2019, Song et al. 2012."""
    n = len(X)
    if not debiased:
        H = np.eye(n) - 1.0 / n
        K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
        return np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))

    def hsic(K, L):
        K, L, one = K - np.diag(np.diag(K)), L - np.diag(np.diag(L)), np.ones(n)
        return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ K @ L @ one)) / (n * (n - 3))

    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


# ---------------------------------------------------------------- CKA


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n, p", [(50, 8), (20, 40)])  # the feature-space route and the Gram route
def test_identical_representations_have_cka_one(n, p, debiased):
    X = np.random.default_rng(n + p).normal(size=(n, p))
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_ignores_rotation_isotropic_scaling_and_translation(seed, debiased):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 12))
    Y = 3.7 * X @ random_rotation(12, rng) + rng.normal(size=12) * 5
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(1.0, abs=1e-10)
    # An anisotropic rescaling is a different representation: CKA must notice.
    assert linear_cka(X, X * np.linspace(0.1, 10, 12), debiased=debiased) < 0.9


def test_cka_of_a_hand_computed_example():
    # Centered x = (-1.5, -0.5, 0.5, 1.5), y = (-1.5, 0.5, -0.5, 1.5): yᵀx = 4, xᵀx = yᵀy = 5,
    # so CKA = 4² / (5 · 5) = 0.64, the squared Pearson correlation (0.8²) as it must be in one dimension.
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y = np.array([[1.0], [3.0], [2.0], [4.0]])
    assert linear_cka(x, y) == pytest.approx(0.64, abs=1e-15)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n, p, q", [(30, 5, 7), (30, 50, 7), (12, 40, 60), (25, 3, 3)])
def test_cka_matches_the_explicit_gram_formulas(n, p, q, debiased):
    rng = np.random.default_rng(n * p * q)
    X = rng.normal(size=(n, p)) + 2.0
    Y = rng.normal(size=(n, q))
    Y[:, :3] += X[:, :3]  # partly related, so the value is not near a boundary
    assert linear_cka(X, Y, debiased=debiased) == pytest.approx(reference_cka(X, Y, debiased), abs=1e-10)


def test_debiasing_removes_the_small_sample_bias():
    rng = np.random.default_rng(0)
    biased, debiased = [], []
    for _ in range(10):
        X, Y = rng.normal(size=(20, 200)), rng.normal(size=(20, 200))  # unrelated; few stimuli, wide layers
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
    assert np.mean(biased) > 0.8  # measured 0.91: biased CKA says "similar" about independent noise
    assert abs(np.mean(debiased)) < 0.05  # measured −0.004 (per draw sd 0.08)
    # With many stimuli and narrow layers both estimators see independence.
    X, Y = rng.normal(size=(2000, 5)), rng.normal(size=(2000, 5))
    assert linear_cka(X, Y) < 0.02
    assert abs(linear_cka(X, Y, debiased=True)) < 0.02


def planted_blocks(rng, n=120, width=16):
    """A [n, 6, width] scan: layers 0–2 share one representation, layers 3–5 another."""
    first, second = rng.normal(size=(n, width)), rng.normal(size=(n, width))
    layers = [(first if layer < 3 else second) @ random_rotation(width, rng) * (layer + 1)
              + 0.3 * rng.normal(size=(n, width)) for layer in range(6)]
    return np.stack(layers, axis=1).astype(np.float32)


@pytest.mark.parametrize("gram_budget", [0, geometry.GRAM_BUDGET_BYTES])  # features route, Gram route
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_shows_planted_blocks(gram_budget, debiased, monkeypatch):
    monkeypatch.setattr(geometry, "GRAM_BUDGET_BYTES", gram_budget)
    A = planted_blocks(np.random.default_rng(1))
    M = cka_matrix(A, debiased=debiased)
    assert M.shape == (6, 6)
    np.testing.assert_array_equal(M, M.T)
    np.testing.assert_array_equal(np.diag(M), 1.0)
    same = np.array([[(i < 3) == (j < 3) and i != j for j in range(6)] for i in range(6)])
    different = np.array([[(i < 3) != (j < 3) for j in range(6)] for i in range(6)])
    assert M[same].min() > 0.85  # measured 0.90
    # Biased CKA keeps a floor of about width/n for unrelated layers (measured 0.11); debiased, about 0.
    assert np.abs(M[different]).max() < (0.03 if debiased else 0.2)
    for i in range(6):
        for j in range(6):
            if i != j:
                assert M[i, j] == pytest.approx(linear_cka(A[:, i], A[:, j], debiased=debiased), abs=1e-10)


@pytest.mark.parametrize("gram_budget", [0, geometry.GRAM_BUDGET_BYTES])
def test_cka_matrix_across_two_scans_of_different_widths(gram_budget, monkeypatch, tmp_path):
    monkeypatch.setattr(geometry, "GRAM_BUDGET_BYTES", gram_budget)
    rng = np.random.default_rng(2)
    A = rng.normal(size=(30, 3, 8))  # width < n
    B = np.concatenate([A @ rng.normal(size=(8, 50)), rng.normal(size=(30, 1, 50))], axis=1)  # width > n
    np.save(tmp_path / "b.npy", B)
    B_map = np.load(tmp_path / "b.npy", mmap_mode="r")  # scans arrive as read-only memory maps
    calls = []
    M = cka_matrix(A, B_map, progress=lambda done, total: calls.append((done, total)))
    assert M.shape == (3, 4)
    expected = [[linear_cka(A[:, i], B[:, j]) for j in range(4)] for i in range(3)]
    np.testing.assert_allclose(M, expected, atol=1e-10)
    assert calls[-1] == (12, 12)


def test_cka_of_a_constant_layer_is_nan():
    A = np.random.default_rng(3).normal(size=(10, 3, 4))
    A[:, 1] = 7.0
    M = cka_matrix(A)
    assert np.isnan(M[1]).all() and np.isnan(M[:, 1]).all()
    assert M[0, 2] == pytest.approx(linear_cka(A[:, 0], A[:, 2]))


def test_cka_rejects_bad_input():
    rng = np.random.default_rng(4)
    with pytest.raises(MlxscanError, match="different numbers of stimuli"):
        cka_matrix(rng.normal(size=(10, 2, 3)), rng.normal(size=(11, 2, 3)))
    with pytest.raises(MlxscanError, match="at least 3"):
        linear_cka(rng.normal(size=(2, 3)), rng.normal(size=(2, 3)))
    with pytest.raises(MlxscanError, match="at least 4"):
        linear_cka(rng.normal(size=(3, 3)), rng.normal(size=(3, 3)), debiased=True)
    scan = rng.normal(size=(10, 2, 3))
    scan[4, 1, 0] = np.nan
    with pytest.raises(MlxscanError, match="A layer 1 contains NaN"):
        cka_matrix(scan)
    with pytest.raises(MlxscanError, match=r"\[n_stimuli, n_layers, width\]"):
        cka_matrix(rng.normal(size=(10, 3)))


# ---------------------------------------------------------------- RSA


def categories(rng, n_per=12, k=4, width=30, noise=1.0):
    """Stimuli from k categories: a shared category pattern plus noise. Returns (X, labels)."""
    labels = np.repeat(np.arange(k), n_per)
    centers = rng.normal(size=(k, width)) * 2
    return centers[labels] + noise * rng.normal(size=(len(labels), width)), labels


def category_model_rdm(labels):
    return (labels[:, None] != labels[None, :]).astype(float)  # 0 within a category, 1 between


def test_rdm_matches_its_definitions():
    X = np.random.default_rng(5).normal(size=(9, 6))
    np.testing.assert_allclose(rdm(X), 1 - np.corrcoef(X), atol=1e-12)
    direct = np.linalg.norm(X[:, None] - X[None, :], axis=2)
    np.testing.assert_allclose(rdm(X, "euclidean"), direct, atol=1e-12)
    for metric in ("correlation", "euclidean"):
        D = rdm(X, metric)
        np.testing.assert_array_equal(D, D.T)
        np.testing.assert_array_equal(np.diag(D), 0.0)


def test_condition_rdm_of_a_hand_computed_example():
    # Condition means (0, 0), (3, 0), (0, 4): distances 3, 4 and 5. Stimuli straddle their means.
    X = np.array([[-1, 0], [1, 0], [3, -1], [3, 1], [0, 3], [0, 5], [0, 4]], dtype=float)
    labels = np.array(["a", "a", "b", "b", "c", "c", "c"])
    expected = np.array([[0, 3, 4], [3, 0, 5], [4, 5, 0]], dtype=float)
    np.testing.assert_allclose(condition_rdm(X, labels, metric="euclidean"), expected, atol=1e-12)


def test_rsa_of_identical_data_is_one():
    A = np.random.default_rng(6).normal(size=(15, 4, 10))
    within = rsa_matrix(A)
    np.testing.assert_allclose(np.diag(within), 1.0)
    np.testing.assert_allclose(within, within.T)
    across = rsa_matrix(A, A.copy(), metric="euclidean")
    np.testing.assert_allclose(np.diag(across), 1.0, atol=1e-12)


def test_planted_categories_show_in_rsa_and_the_mantel_test():
    rng = np.random.default_rng(7)
    X, labels = categories(rng)
    model = category_model_rdm(labels)
    data = rdm(X)
    rho, p = rdm_similarity_test(data, model, permutations=199)
    expected_rho = spearmanr(data[np.triu_indices(48, 1)], model[np.triu_indices(48, 1)]).statistic
    assert rho == pytest.approx(expected_rho, abs=1e-12)
    assert rho > 0.5
    assert p == pytest.approx(1 / 200)  # no relabelling of stimuli comes close
    result = rdm_similarity_test(data, model, permutations=199)
    assert (result.rho, result.p_value) == (rho, p)  # deterministic for a seed


def test_mantel_p_is_large_for_unrelated_rdms():
    rng = np.random.default_rng(8)
    labels = np.repeat(np.arange(4), 12)
    p_values = [rdm_similarity_test(rdm(rng.normal(size=(48, 30))), category_model_rdm(labels),
                                    permutations=199, seed=seed).p_value for seed in range(8)]
    # Under the null p is uniform: with 8 draws, a median near 0.5 and none tiny (measured values vary).
    assert np.median(p_values) > 0.2
    assert min(p_values) > 0.01


def test_rsa_matrix_with_labels_finds_the_layers_that_share_category_structure():
    related, unrelated = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        X, labels = categories(rng, n_per=6, k=8)
        A = np.stack([X @ random_rotation(30, rng), 2 * X + rng.normal(size=X.shape) * 0.5,
                      rng.normal(size=X.shape)], axis=1)  # layers 0 and 1 carry the categories, 2 does not
        M = rsa_matrix(A, labels=labels)
        assert M.shape == (3, 3)
        related.append(M[0, 1])
        unrelated += [M[0, 2], M[1, 2]]
        single = rsa_matrix(A)  # stimulus-level RDMs see the same structure
        assert single[0, 1] > 0.8 and abs(single[0, 2]) < 0.2
    # 8 conditions give only 28 dissimilarities, so an unrelated layer's rho scatters (measured up to 0.35).
    assert min(related) > 0.8
    assert np.median(np.abs(unrelated)) < 0.2


def test_rsa_rejects_bad_input():
    rng = np.random.default_rng(10)
    with pytest.raises(MlxscanError, match="different numbers of stimuli"):
        rsa_matrix(rng.normal(size=(10, 2, 3)), rng.normal(size=(12, 2, 3)))
    with pytest.raises(MlxscanError, match="unknown RDM metric"):
        rdm(rng.normal(size=(5, 3)), metric="cosine")
    with pytest.raises(MlxscanError, match="same value in every feature"):
        rdm(np.array([[1.0, 2, 3], [4, 4, 4], [0, 1, 0]]))
    with pytest.raises(MlxscanError, match="conditions"):
        condition_rdm(rng.normal(size=(6, 3)), [0, 0, 0, 1, 1, 1])
    with pytest.raises(MlxscanError, match="not symmetric"):
        rdm_similarity_test(rng.normal(size=(5, 5)), rdm(rng.normal(size=(5, 3))))
    with pytest.raises(MlxscanError, match="different numbers"):
        rdm_similarity_test(rdm(rng.normal(size=(5, 3))), rdm(rng.normal(size=(6, 3))))
    with pytest.raises(MlxscanError, match="NaN"):
        rdm(np.array([[1.0, np.nan], [0, 1], [1, 1]]))
