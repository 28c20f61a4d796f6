"""Semi-nonnegative matrix factorization of MLP activations (`mlxscan snmf`).

1. Planted answers, NumPy only: data made as Y_true @ Z_true with Y_true >= 0 sparse and sparse loadings
   are recovered (|cos| > 0.95 after matching); the objective never increases under Ding's updates (dense,
   and from the frozen support on); Y stays >= 0; the error never beats the rank-k SVD; stability is high
   for planted features and at the null for noise; top tokens and contexts.
2. `mlxscan snmf` on a tiny random Llama (CliRunner): --json, --out files, exit 2 on bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxscan  # noqa: F401  (before mlx.core: MLX gets the fast BLAS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.analysis.snmf import (  # noqa: E402
    loading_stability, match_loadings, neurons_carrying, semi_nmf, snmf_layer, svd_relative_error, token_context,
    top_tokens,
)
from mlxscan.errors import MlxscanError  # noqa: E402

N_TOKENS, N_NEURONS, N_FEATURES = 1200, 160, 5
DENSITY = 0.1  # each planted feature loads on 10% of the neurons


def planted(seed: int = 0, noise: float = 0.05, active: float = 0.2):
    """(A [tokens, neurons] float64, Z_true [k, neurons], Y_true [tokens, k]): sparse non-negative codes."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((N_FEATURES, N_NEURONS)) * (rng.random((N_FEATURES, N_NEURONS)) < DENSITY)
    Y = rng.exponential(1.0, (N_TOKENS, N_FEATURES)) * (rng.random((N_TOKENS, N_FEATURES)) < active)
    return Y @ Z + noise * rng.standard_normal((N_TOKENS, N_NEURONS)), Z, Y


@pytest.fixture(scope="module")
def planted_fit():
    A, Z, Y = planted()
    return A, Z, Y, semi_nmf(A, N_FEATURES, keep=DENSITY, seed=0)


def test_planted_loadings_are_recovered(planted_fit):
    A, Z, Y, fit = planted_fit
    partner, cosine = match_loadings(Z, fit.loadings)
    assert np.all(cosine > 0.95), cosine
    # The sign is identified (Y >= 0), so the matched loadings point the same way, and so do the codes.
    for i, j in enumerate(partner):
        assert np.dot(Z[i], fit.loadings[j]) > 0
        assert np.corrcoef(Y[:, i], fit.coefficients[:, j])[0, 1] > 0.95
    assert np.all(fit.coefficients >= 0)
    assert np.allclose(np.linalg.norm(fit.loadings, axis=1), 1.0)
    assert np.all(np.count_nonzero(fit.loadings, axis=1) == int(np.ceil(DENSITY * N_NEURONS)))
    assert fit.svd_relative_error <= fit.relative_error < fit.svd_relative_error + 0.05
    assert fit.converged and fit.settled_at is not None
    assert np.all(np.diff(fit.energy) <= 0)  # strongest first
    record = json.loads(json.dumps(fit.to_dict()))
    assert record["support"] == [16] * N_FEATURES and record["n_tokens"] == N_TOKENS


def test_objective_never_increases_and_codes_stay_nonnegative(planted_fit):
    A, _, _, sparse = planted_fit
    # float64 data descend exactly; float32 data up to float32 rounding of the products (measured: 4e-6 relative)
    for fit, slack in ((sparse, 1e-12), (semi_nmf(A, N_FEATURES, seed=3), 1e-12),
                       (semi_nmf(A.astype(np.float32), 8, seed=1), 2e-5)):
        frozen = fit.objective[fit.settled_at or 0:]
        assert np.all(np.diff(frozen) <= slack * frozen[1:]), np.max(np.diff(frozen) / frozen[1:])
        assert np.all(fit.coefficients >= 0)
        residual = A - fit.coefficients.astype(np.float64) @ fit.loadings
        # the objective is tracked without forming the residual: it must agree with the residual itself
        assert np.sqrt(np.sum(residual**2) / np.sum(A**2)) == pytest.approx(fit.relative_error, rel=1e-3)
    dense = semi_nmf(A, N_FEATURES, seed=3)
    assert dense.settled_at is None and dense.relative_error < dense.svd_relative_error * 1.02
    assert np.all(np.diff(dense.objective) <= 1e-9 * dense.objective[0])


def test_svd_error_and_neuron_counts_by_hand():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((30, 12))
    s = np.linalg.svd(A, compute_uv=False)
    assert svd_relative_error(A, 3) == pytest.approx(np.sqrt(np.sum(s[3:] ** 2) / np.sum(s**2)))
    assert svd_relative_error(A.T, 3) == pytest.approx(svd_relative_error(A, 3))
    loadings = np.array([[3.0, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert neurons_carrying(loadings, 0.9).tolist() == [1, 4, 0]  # 9/10 of the energy sits in one neuron
    assert neurons_carrying(loadings, 0.5).tolist() == [1, 2, 0]


def test_stability_is_high_for_planted_features_and_at_the_null_for_noise(planted_fit):
    A, Z, _, fit = planted_fit
    offsets = np.arange(0, N_TOKENS + 1, 40)  # 30 texts of 40 tokens
    layer = snmf_layer(A, np.arange(N_TOKENS), offsets, N_FEATURES, layer=7, keep=DENSITY, permutations=10, n_top=4)
    for check in (layer.split_half, layer.seed_check):
        # a fit from another start can land in a local optimum for one feature (seen: |cos| 0.85 for seed 1)
        assert np.sum(check.cosine > 0.95) >= N_FEATURES - 1 and check.null_threshold < 0.6, check.cosine
        assert check.to_dict()["n_above_null"] == N_FEATURES
    assert np.allclose(match_loadings(fit.loadings, layer.fit.loadings)[1], 1.0, atol=1e-3)  # same data, same seed
    noise = np.random.default_rng(1).standard_normal((N_TOKENS, N_NEURONS))
    half = N_TOKENS // 2
    fits = [semi_nmf(part, N_FEATURES, keep=DENSITY, seed=0) for part in (noise, noise[:half], noise[half:])]
    null = loading_stability(*(f.loadings for f in fits), kind="split-half", permutations=10)
    assert np.median(null.cosine) < 0.5 and np.median(null.cosine) < null.null_threshold + 0.2, null.cosine
    with pytest.raises(MlxscanError, match="4 texts"):
        snmf_layer(A, np.arange(N_TOKENS), [0, 600, N_TOKENS], N_FEATURES, layer=0)


def test_top_tokens_and_their_context():
    Y = np.array([[0.0, 2.0], [5.0, 0.0], [1.0, 0.0], [5.0, 1.0]])
    rows, values = top_tokens(Y, 3)
    assert rows.tolist() == [[1, 3, 2], [0, 3, -1]]  # ties by row; a zero coefficient is never listed
    assert values.tolist() == [[5.0, 5.0, 1.0], [2.0, 1.0, 0.0]]
    token_ids, offsets = np.arange(10, 20), np.array([0, 4, 10])

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    assert token_context(token_ids, offsets, 6, decode, before=8) == ("<16>", "<14><15>[<16>]")  # its own text only
    assert token_context(token_ids, offsets, 3, decode, before=1) == ("<13>", "<12>[<13>]")


def test_bad_arguments_are_errors():
    A = np.random.default_rng(0).standard_normal((50, 20))
    for kwargs, message in (({"n_features": 0}, "at least one"), ({"n_features": 20}, "more tokens and neurons"),
                            ({"n_features": 3, "keep": 0}, "fraction"), ({"n_features": 3, "max_iter": 0}, "iterations")):
        with pytest.raises(MlxscanError, match=message):
            semi_nmf(A, **kwargs)
    with pytest.raises(MlxscanError, match="NaN"):
        semi_nmf(np.full((50, 20), np.nan), 3)
    with pytest.raises(MlxscanError, match="zero"):
        semi_nmf(np.zeros((50, 20)), 3)


# ----------------------------------------------------------------------------------------------------
# 2. The command on a tiny model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import CORPUS, make_tiny_model

    root = tmp_path_factory.mktemp("snmf")
    (root / "texts.txt").write_text("\n".join(CORPUS) + "\n")
    return make_tiny_model("llama", root / "llama")


def invoke(*args):
    from mlxscan.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def snmf_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("snmf-out") / "out"
    result = invoke("snmf", "--model", tiny_folder, "--texts", tiny_folder.parent / "texts.txt", "--layers", "1-2",
                    "--features", "4", "--keep", "0.1", "--permutations", "5", "--top", "3", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_snmf_command_reports_and_saves(snmf_run):
    record, out = snmf_run
    assert record["analysis"] == "snmf" and record["width"] == 128 and [row["layer"] for row in record["layers"]] == [1, 2]
    for row in record["layers"]:
        assert row["svd_relative_error"] <= row["relative_error"] <= 1.0
        assert len(row["features"]) == 4 and 0 <= row["split_half"]["median_cosine"] <= 1
        for feature in row["features"]:
            assert feature["support"] == 13 and len(feature["top_tokens"]) == 3
            assert all(token["context"].endswith("[" + token["token"] + "]") for token in feature["top_tokens"])
            assert feature["top_tokens"][0]["value"] >= feature["top_tokens"][-1]["value"] > 0
    assert json.loads((out / "snmf.json").read_text()) == record
    with np.load(out / "snmf.npz") as arrays:
        assert arrays["loadings"].shape == (2, 4, 128) and arrays["top_rows"].shape == (2, 4, 3)
        assert arrays["coefficients"].shape == (2, record["n_tokens"], 4) and np.all(arrays["coefficients"] >= 0)
        assert arrays["split_half_null_cosine_layer1"].shape == (5, 4)
    assert (out / "snmf.png").read_bytes()[:4] == b"\x89PNG"


def test_snmf_table_on_the_scan_folder(snmf_run):
    record, _ = snmf_run
    result = invoke("snmf", record["scan"], "--features", "3", "--keep", "1", "--no-split-half", "--no-seed-check")
    assert result.exit_code == 0, result.output
    assert "every neuron (dense)" in result.output and "layer 1, strongest features" in result.output  # middle of 0-2


@pytest.mark.parametrize("args, phrase", [
    (["snmf", "SCAN", "--model", "m"], "not both"),
    (["snmf", "--features", "0"], "at least 1"),
    (["snmf", "--keep", "1.5"], "(0, 1]"),
    (["snmf", "SCAN", "--layers", "7"], "not recorded"),
    (["snmf", "SCAN", "--features", "500"], "must be below"),
    (["snmf", "MISSING"], "not a scan"),
])
def test_bad_input_exits_2_with_one_line(snmf_run, args, phrase, tmp_path):
    record, _ = snmf_run
    args = [{"SCAN": record["scan"], "MISSING": tmp_path / "nothing"}.get(arg, arg) for arg in args]
    result = invoke(*args, "--out", tmp_path / "never")
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
