"""Functional networks (spatial ICA of MLP neurons) and inhibiting them.

1. Planted answers, NumPy only: sparse independent maps mixed into neuron signals are recovered with
   their key neurons; split-half consistency is high for planted structure and at the null for noise.
2. A tiny random Llama (model_factory): Scale(units=...), perplexity computed batch by batch equals the
   one from full logits, and zeroing a planted network whose neurons dominate the MLP output moves
   perplexity more than zeroing as many random neurons in the same layers.
3. `mlxscan ica` and `mlxscan inhibit` in process (CliRunner): --json, --out files, exit 2 on bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.analysis.ica import (  # noqa: E402
    functional_networks, key_neurons_by_layer, layer_span, match_maps, split_half_consistency, standardize_signals,
)
from mlxscan.errors import MlxscanError  # noqa: E402

N_TOKENS, N_NEURONS, N_SOURCES, SUPPORT = 1500, 2000, 4, 60
TOKENS_PER_TEXT = 50


def planted_signals(seed: int = 0, noise: float = 0.5):
    """(signals [tokens, neurons] float32, maps [k, neurons], supports): k sparse maps, Gaussian time courses."""
    rng = np.random.default_rng(seed)
    maps, supports = np.zeros((N_SOURCES, N_NEURONS)), []
    for i in range(N_SOURCES):
        support = rng.choice(N_NEURONS, SUPPORT, replace=False)
        maps[i, support] = 1 + np.abs(rng.standard_normal(SUPPORT))
        supports.append(set(support.tolist()))
    time_courses = rng.standard_normal((N_TOKENS, N_SOURCES))
    offsets = 3 * rng.standard_normal(N_NEURONS)  # neurons' own baselines: z-scoring must remove them
    signals = time_courses @ maps + noise * rng.standard_normal((N_TOKENS, N_NEURONS)) + offsets
    return signals.astype(np.float32), maps, supports


def text_offsets(n_tokens: int = N_TOKENS) -> np.ndarray:
    return np.arange(0, n_tokens + 1, TOKENS_PER_TEXT)


# ----------------------------------------------------------------------------------------------------
# 1. Planted answers


@pytest.fixture(scope="module")
def planted():
    signals, maps, supports = planted_signals()
    return signals, maps, supports, functional_networks(signals, N_SOURCES + 2, seed=0, restarts=3)


def test_planted_sources_are_recovered_with_their_key_neurons(planted):
    signals, maps, supports, result = planted
    partner, correlation = match_maps(maps, result.maps)

    assert np.all(correlation > 0.9), correlation
    for i, support in enumerate(supports):
        found = set(np.flatnonzero(result.key_mask[partner[i]]).tolist())
        assert len(found & support) >= 0.9 * SUPPORT and len(found - support) <= 3, (i, len(found), len(found & support))
        assert np.corrcoef(result.maps[partner[i]], maps[i])[0, 1] > 0.9  # signed: the heavy tail is positive
    # The planted networks explain the most variance, so they come first.
    assert sorted(partner) == list(range(N_SOURCES))
    assert result.time_courses.shape == (N_TOKENS, N_SOURCES + 2) and result.converged
    record = json.loads(json.dumps(result.to_dict()))
    assert record["key_counts"][:N_SOURCES] == result.key_counts[:N_SOURCES].tolist()


def test_split_half_consistency_is_high_for_planted_networks_and_null_for_noise(planted):
    signals, _, _, reference = planted
    found = split_half_consistency(signals, text_offsets(), N_SOURCES + 2, restarts=2, permutations=10,
                                   reference=reference)
    assert np.all(found.reference_correlation[:N_SOURCES] > 0.9), found.reference_correlation
    assert np.all(found.reference_iou[:N_SOURCES] > 0.8), found.reference_iou
    assert np.sum(found.correlation > found.null_threshold) >= N_SOURCES

    noise = np.random.default_rng(1).standard_normal((N_TOKENS, N_NEURONS)).astype(np.float32)
    null = split_half_consistency(noise, text_offsets(), N_SOURCES + 2, restarts=2, permutations=10)
    assert np.mean(null.correlation) < 2 * np.mean(null.null_correlation) + 0.02, null.correlation
    assert np.max(null.correlation) < 0.15
    assert len(null.half_a_texts) == (N_TOKENS // TOKENS_PER_TEXT) // 2


def test_standardize_handles_layers_constant_neurons_and_bad_values():
    rng = np.random.default_rng(2)
    recording = rng.standard_normal((40, 3, 5)).astype(np.float16)  # [tokens, layers, width]
    recording[:, 1, 2] = 7.0  # a neuron that never changes
    Z, live = standardize_signals(recording)
    assert Z.shape == (40, 15) and Z.dtype == np.float32
    assert not live[1 * 5 + 2] and live.sum() == 14 and np.all(Z[:, 7] == 0)
    assert np.allclose(Z[:, live].mean(0), 0, atol=1e-5) and np.allclose(Z[:, live].std(0), 1, atol=1e-4)
    rows = np.arange(0, 40, 2)
    assert np.allclose(standardize_signals(recording, rows)[0], standardize_signals(recording[rows])[0])
    recording[3, 0, 0] = np.inf
    with pytest.raises(MlxscanError, match="NaN or inf"):
        standardize_signals(recording)
    with pytest.raises(MlxscanError, match="components"):
        functional_networks(rng.standard_normal((10, 30)), 10)
    with pytest.raises(MlxscanError, match="threshold"):
        functional_networks(rng.standard_normal((50, 30)), 3, threshold=0)


def test_layer_span_and_key_neurons_by_layer():
    mask = np.zeros((2, 3 * 4), bool)  # 2 networks, 3 layers of 4 neurons
    mask[0, [1, 2, 9]] = True
    mask[1, [4]] = True
    assert layer_span(mask, 3, 4).tolist() == [[2, 0, 1], [0, 1, 0]]
    assert key_neurons_by_layer(mask[0], [5, 6, 7], 4) == {5: [1, 2], 7: [1]}
    assert key_neurons_by_layer(mask[1], [5, 6, 7], 4) == {6: [0]}
    with pytest.raises(MlxscanError):
        layer_span(mask, 4, 4)


# ----------------------------------------------------------------------------------------------------
# 2. A tiny model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return mlxscan.load(tiny_folder)


def corpus_texts() -> list[str]:
    from model_factory import CORPUS

    return list(CORPUS)


def test_scale_multiplies_only_the_chosen_units(tiny):
    from mlxscan import Scale

    clean = tiny.run("The cat sat on the mat.", ["mlp_act"], layers=[1])["mlp_act"]
    scaled = tiny.run("The cat sat on the mat.", ["mlp_act"], layers=[1],
                      interventions=[Scale("mlp_act", 1, factor=3.0, units=[2, 5])])["mlp_act"]
    others = np.setdiff1d(np.arange(tiny.d_mlp), [2, 5])
    assert np.allclose(scaled[..., [2, 5]], 3.0 * clean[..., [2, 5]], rtol=1e-5, atol=1e-6)
    assert np.array_equal(scaled[..., others], clean[..., others])
    for bad, message in (([], "empty"), ([tiny.d_mlp], "must lie in"),):
        with pytest.raises(MlxscanError, match=message):
            tiny.run("The cat", ["mlp_act"], interventions=[Scale("mlp_act", 1, factor=2.0, units=bad)])
    with pytest.raises(MlxscanError, match="not both"):
        tiny.run("The cat", interventions=[Scale("mlp_act", 1, factor=2.0, units=[1],
                                                 direction=np.ones(tiny.d_mlp))])


def test_perplexity_in_batches_equals_the_full_logits(tiny):
    from mlxscan.experiments.networks import perplexity, text_nll

    texts = corpus_texts()[:6]
    token_lists = tiny.token_lists(texts)
    nll, counts, _ = text_nll(tiny, token_lists, batch_size=4)
    expected = []
    for tokens in token_lists:
        logits = tiny.run([tokens], logits=True).logits[0].astype(np.float64)  # [seq, vocab]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        expected.append(-log_probs[np.arange(len(tokens) - 1), tokens[1:]].sum())
    assert np.allclose(nll, expected, rtol=1e-4)
    assert counts.tolist() == [len(tokens) - 1 for tokens in token_lists]
    assert perplexity(nll, counts) == pytest.approx(math.exp(sum(expected) / counts.sum()), rel=1e-4)
    assert np.allclose(text_nll(tiny, token_lists, batch_size=1)[0], nll, rtol=1e-5)  # padding changes nothing


def test_inhibiting_a_planted_network_moves_perplexity_more_than_random_neurons(tiny_folder):
    import mlx.core as mx

    from mlxscan.experiments.networks import random_counterpart, run_inhibition

    model = mlxscan.load(tiny_folder)  # its own copy: the weights are changed below
    planted = {0: [3, 17, 40, 77, 101], 2: [8, 64, 90, 120]}
    for layer, units in planted.items():  # these neurons now dominate what the MLP writes
        mlp = model.module.model.layers[layer].mlp
        weight = np.array(mlp.down_proj.weight)  # [d_model, d_mlp]
        weight[:, units] *= 10.0
        mlp.down_proj.weight = mx.array(weight)
    result = run_inhibition(model, {"planted": planted}, corpus_texts(), mode="zero", draws=4, seed=0)
    arm = result.arms[0]
    shift = abs(math.log(arm.perplexity / result.baseline_perplexity))
    random_shifts = [abs(math.log(p / result.baseline_perplexity)) for p in arm.random_perplexity]
    assert shift > 0.05 and shift > 2 * max(random_shifts), (shift, random_shifts)
    row = result.to_dict()["networks"][0]
    assert row["n_neurons"] == 9 and row["p_random"] == pytest.approx(1 / 5) and row["layers"] == [0, 2]
    for draw in arm.random_key_neurons:  # same count per layer, none of the network's own
        assert {layer: len(units) for layer, units in draw.items()} == {0: 5, 2: 4}
        assert all(not set(units) & set(planted[layer]) for layer, units in draw.items())
    assert arm.relative_change > 0 and result.arrays()["random_nll"].shape == (1, 4, len(corpus_texts()))
    rng = np.random.default_rng(0)
    assert random_counterpart({1: list(range(120))}, 128, rng)[1] != list(range(120))
    with pytest.raises(MlxscanError, match="do not exist"):
        run_inhibition(model, {"bad": {5: [1]}}, corpus_texts(), draws=2)


# ----------------------------------------------------------------------------------------------------
# 3. The commands


def invoke(*args):
    from mlxscan.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def ica_run(tiny_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ica")
    texts = root / "texts.txt"
    texts.write_text("\n".join(corpus_texts()) + "\n")
    out = root / "out"
    result = invoke("ica", "--model", tiny_folder, "--texts", texts, "--components", "4", "--threshold", "2.5",
                    "--restarts", "2", "--permutations", "5", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out, texts


def test_ica_command_reports_networks_and_saves_its_files(ica_run):
    record, out, _ = ica_run
    assert record["analysis"] == "ica" and record["layers"] == [0, 1, 2] and record["width"] == 128
    assert [row["network"] for row in record["networks"]] == ["0", "1", "2", "3"]
    assert json.loads((out / "ica.json").read_text()) == record
    keys = json.loads((out / "key_neurons.json").read_text())
    for row in record["networks"]:
        assert sum(map(len, keys[row["network"]].values())) == row["n_key"]
        assert {layer: len(units) for layer, units in keys[row["network"]].items()} == row["layers"]
        assert 0 <= row["split_half_r"] <= 1
    with np.load(out / "ica.npz") as arrays:
        assert arrays["maps"].shape == (4, 3 * 128) and arrays["time_courses"].shape == (record["n_tokens"], 4)
        assert arrays["key_per_layer"].shape == (4, 3)
    assert (out / "ica.png").read_bytes()[:4] == b"\x89PNG"
    # Position 0 of every text (the attention sink) is left out by default: one row fewer per text.
    assert record["first_token"].startswith("left out")
    with np.load(out / "ica.npz") as arrays:
        assert arrays["time_courses"].shape[0] == record["n_tokens"]


def test_ica_per_layer_on_a_scan_folder(ica_run, tmp_path):
    record, _, _ = ica_run
    result = invoke("ica", record["scan"], "--per-layer", "--layers", "1-2", "--components", "3", "--threshold", "2.5",
                    "--restarts", "1", "--no-split-half", "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    per_layer = json.loads(result.stdout)
    assert [row["network"] for row in per_layer["networks"]] == [f"L{l}.{i}" for l in (1, 2) for i in range(3)]
    keys = json.loads((tmp_path / "key_neurons.json").read_text())
    assert all(set(keys[f"L{l}.{i}"]) <= {str(l)} for l in (1, 2) for i in range(3))
    assert all(row["split_half_r"] is None for row in per_layer["networks"])
    with np.load(tmp_path / "ica.npz") as arrays:
        assert arrays["maps"].shape == (2, 3, 128) and arrays["key_per_layer"].shape == (6, 2)


def test_inhibit_command_reads_the_ica_folder(ica_run, tmp_path):
    record, out, texts = ica_run
    network = max(record["networks"], key=lambda row: row["n_key"])["network"]
    result = invoke("inhibit", out, "--heldout", texts, "--networks", network, "--random-draws", "2", "--json",
                    "--out", tmp_path / "inhibit")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "zero" and report["baseline_perplexity"] > 1
    assert [row["network"] for row in report["networks"]] == [network]
    assert len(report["networks"][0]["random_perplexity"]) == 2
    assert {"inhibit.json", "inhibit.npz", "inhibit.png"} <= {p.name for p in (tmp_path / "inhibit").iterdir()}
    table = invoke("inhibit", out, "--heldout", texts, "--networks", network, "--random-draws", "2", "--mode",
                   "scale", "--factor", "3")
    assert table.exit_code == 0 and "baseline perplexity" in table.output and "multiplied by 3.0" in table.output


@pytest.mark.parametrize("args, phrase", [
    (["ica", "SCAN", "--model", "m"], "not both"),
    (["ica", "--components", "0"], "at least 1"),
    (["inhibit", "OUT", "--networks", "99"], "no network '99'"),
    (["inhibit", "OUT", "--random-draws", "1"], "at least 2 draws"),
    (["inhibit", "MISSING"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line(ica_run, args, phrase, tmp_path):
    _, out, texts = ica_run
    args = [{"OUT": out, "SCAN": tmp_path, "MISSING": tmp_path / "nothing"}.get(arg, arg) for arg in args]
    if args[0] == "inhibit":
        args += ["--heldout", texts]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
