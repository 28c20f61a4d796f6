"""Sparse autoencoders: training, the published layouts, evaluation metrics, splicing and the commands.

1. Planted answers, no model: an SAE trained on sparse combinations of a random dictionary recovers the
   dictionary (topk and relu); FVU, L0, dead and dense counts; localization finds a concept held by one
   feature faster than one spread over many neurons; JS separability separates a concept unit from noise.
2. Layouts: mlxscan's own folder round-trips; SAELens (5 and 6) and Gemma Scope files load and encode as
   a NumPy reference of their published formulas says; broken files are one clear error.
3. A tiny random Llama (model_factory): an SAE that reconstructs perfectly, spliced in, leaves the loss
   unchanged; the commands train, evaluate (own SAE and both external layouts) and refuse bad input.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.analysis.sae_eval import (  # noqa: E402
    ReconstructionStats, fvu, js_separability, localization,
)
from mlxscan.errors import MlxscanError  # noqa: E402
from mlxscan.sae import SaeConfig, SparseAutoencoder, TrainSettings, load_sae, sae_files, train_sae  # noqa: E402
from mlxscan.outputs import write_outputs  # noqa: E402

D_IN, N_ATOMS, ACTIVE, N_TOKENS = 16, 32, 3, 6000


def planted_dictionary(seed: int = 0, scale: float = 7.0):
    """(X [tokens, d] = scale * (codes @ D + offset), D [atoms, d] unit rows): ACTIVE atoms per token."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((N_ATOMS, D_IN))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    codes = np.zeros((N_TOKENS, N_ATOMS))
    for row in codes:
        row[rng.choice(N_ATOMS, ACTIVE, replace=False)] = rng.uniform(0.5, 2.0, ACTIVE)
    X = codes @ D + 0.3 + 0.01 * rng.standard_normal((N_TOKENS, D_IN))
    return (scale * X).astype(np.float32), D


def recovered(sae: SparseAutoencoder, D: np.ndarray) -> np.ndarray:
    """[atoms] best cosine between each planted atom and any decoder row."""
    W = np.array(sae.W_dec)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    return (D @ W.T).max(1)


@pytest.mark.parametrize("architecture, l1", [("topk", 0.0), ("relu", 1.0)])
def test_sae_recovers_a_planted_dictionary(architecture, l1):
    X, D = planted_dictionary()
    settings = TrainSettings(architecture=architecture, d_sae=N_ATOMS, k=ACTIVE, l1_coefficient=l1, steps=700,
                             batch_size=256, learning_rate=3e-3, dead_steps=50, resample_every=100, log_every=100)
    result = train_sae(X, settings, site="resid_post", layer=1)
    cosines = recovered(result.sae, D)
    # L1 shrinks activations and blends atoms a little (measured over 3 seeds: min 0.80, median 0.94-0.96);
    # TopK has no shrinkage (min 0.985, median 0.99).
    floor, median = (0.95, 0.98) if architecture == "topk" else (0.75, 0.92)
    assert cosines.min() > floor and np.median(cosines) > median, np.sort(cosines)[:5]
    # The input scale is folded in: the saved SAE reads raw activations and reconstructs them.
    stats = ReconstructionStats(D_IN, N_ATOMS)
    for x, features, x_hat in result.sae.encode_numpy(X, batch=1000):
        stats.update(x, x_hat, features)
    report = stats.report()
    assert report.fvu < (0.1 if architecture == "topk" else 0.25) and report.dead == 0, report.to_dict()
    if architecture == "topk":
        assert report.l0 == pytest.approx(ACTIVE)
    assert list(result.history["step"]) == list(range(100, 701, 100)) and result.history["fvu"][-1] < 0.3


def test_an_sae_of_random_directions_does_not_pass_for_the_dictionary():
    _, D = planted_dictionary()
    control = SparseAutoencoder(SaeConfig(d_in=D_IN, d_sae=N_ATOMS, architecture="topk", k=ACTIVE), seed=5)
    assert np.median(recovered(control, D)) < 0.8


def test_training_refuses_bad_settings():
    X, _ = planted_dictionary()
    for settings, phrase in ((TrainSettings(architecture="jumprelu"), "architecture"),
                             (TrainSettings(d_sae=8, k=9), "--k 9"), (TrainSettings(learning_rate=0), "--lr")):
        with pytest.raises(MlxscanError, match=phrase):
            train_sae(X, settings)
    with pytest.raises(MlxscanError, match="NaN"):
        train_sae(np.full((10, 4), np.nan, np.float32), TrainSettings(d_sae=8, k=2))


# ----------------------------------------------------------------------------------------------------
# Metrics


def test_fvu_l0_dead_and_dense_on_planted_numbers():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 6))
    assert fvu(x, x) == 0.0
    assert fvu(x, np.broadcast_to(x.mean(0), x.shape)) == pytest.approx(1.0)
    assert fvu(x, x + 0.5 * rng.standard_normal(x.shape)) == pytest.approx(0.25 * 6 / np.sum(x.var(0)), rel=0.2)
    x_hat = x + 0.1 * rng.standard_normal(x.shape)
    features = np.zeros((500, 5))
    features[:, 0] = 1.0  # fires on every token: dense
    features[::10, 1] = 2.0  # on 10%: not dense at the 10% threshold (strictly more is dense)
    features[:3, 2] = 0.5  # rare; features 3 and 4 never fire: dead
    stats = ReconstructionStats(6, 5)
    for start in range(0, 500, 128):  # in batches, as the commands feed it
        stats.update(x[start:start + 128], x_hat[start:start + 128], features[start:start + 128])
    report = stats.report()
    assert report.fvu == pytest.approx(fvu(x, x_hat), rel=1e-9)
    assert report.l0 == pytest.approx(1 + 0.1 + 3 / 500)
    assert (report.dead, report.dense) == (2, 1)
    assert report.frequencies.tolist() == pytest.approx([1.0, 0.1, 0.006, 0.0, 0.0])
    with pytest.raises(MlxscanError, match="dense threshold"):
        ReconstructionStats(6, 5, dense_threshold=1.5)


def concept_data(seed: int = 0):
    """(neurons [n, 64], features [n, 32], y, groups): 4 categories x 6 words x 5 stimuli.

    Neurons: each category is a random direction across all 64 units (weak per unit, strong together).
    Features: category c is carried by feature c alone; the other features are noise.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 30)
    groups = np.repeat(np.arange(24), 5)
    directions = rng.standard_normal((4, 64)) / 8 * 3.0  # unit-ish norm x 3, about 0.37 per neuron
    neurons = directions[y] + rng.standard_normal((120, 64))
    features = np.abs(rng.standard_normal((120, 32))) * (rng.random((120, 32)) < 0.2)
    features[np.arange(120), y] += 3.0 + rng.random(120)
    return neurons, features, y, groups


def test_localization_needs_fewer_features_than_neurons_for_a_one_feature_concept():
    neurons, features, y, groups = concept_data()
    grid = (1, 2, 4, 8, 16, 32, 64)
    result = localization(neurons, features, y, groups, target=0.9, folds=3, seed=0, grid=grid)
    assert result.needed_features == [1, 1, 1, 1]
    assert all(n is None or n >= 8 for n in result.needed_neurons), result.needed_neurons
    assert result.geometric_mean_ratio is None or result.geometric_mean_ratio >= 8
    # The control: swap the roles and the ratio flips below 1.
    swapped = localization(features, neurons, y, groups, target=0.9, folds=3, seed=0, grid=grid)
    assert swapped.needed_neurons == [1, 1, 1, 1] and all(r is None or r <= 1 / 8 for r in swapped.ratios)
    record = json.loads(json.dumps(result.to_dict()))
    assert record["needed_features"] == [1, 1, 1, 1] and len(record["best_accuracy_neurons"]) == 4
    with pytest.raises(MlxscanError, match="target"):
        localization(neurons, features, y, groups, target=1.2)


def test_js_separability_scores_a_concept_unit_above_noise_units_and_the_null():
    neurons, features, y, groups = concept_data()
    result = js_separability(features, y, groups, bins=10, permutations=5, seed=0)
    concept, noise = result.scores[:4], result.scores[4:]
    assert np.all(concept > 0.8) and np.all(result.best_class[:4] == np.arange(4))
    assert concept.min() > noise.max() and concept.min() > result.null_threshold
    assert np.mean(noise > result.null_threshold) < 0.25
    constant = js_separability(np.c_[features, np.ones(120)], y, groups, bins=10, permutations=2)
    assert not constant.live[-1] and constant.scores[-1] == 0 and constant.live[:32].all()
    summary = result.to_dict()
    assert summary["n_live"] == 32 and 0 < summary["fraction_above_null"] < 0.5


# ----------------------------------------------------------------------------------------------------
# Layouts


def random_weights(d_in: int, d_sae: int, seed: int, threshold: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {"W_enc": rng.standard_normal((d_in, d_sae)), "W_dec": rng.standard_normal((d_sae, d_in)),
               "b_enc": 0.1 * rng.standard_normal(d_sae), "b_dec": 0.1 * rng.standard_normal(d_in)}
    if threshold:
        weights["threshold"] = np.abs(rng.standard_normal(d_sae))
    return {name: value.astype(np.float32) for name, value in weights.items()}


def reference_encode(weights, x, *, kind: str, k: int | None = None, subtract_b_dec: bool = True) -> np.ndarray:
    """The published formulas, in NumPy: SAELens standard / topk / jumprelu, Gemma Scope's JumpReLU."""
    pre = (x - weights["b_dec"] if subtract_b_dec else x) @ weights["W_enc"] + weights["b_enc"]
    if kind == "topk":
        keep = np.zeros_like(pre, bool)
        np.put_along_axis(keep, np.argsort(-pre, axis=1)[:, :k], True, axis=1)
        return np.maximum(pre, 0) * keep
    if kind == "jumprelu":
        return np.maximum(pre, 0) * (pre > weights["threshold"])
    return np.maximum(pre, 0)


def write_safetensors(path: Path, weights: dict) -> None:
    from mlxscan.sae.io import safetensors_bytes

    path.write_bytes(safetensors_bytes(weights))


def encoded(sae, x) -> np.ndarray:
    return next(sae.encode_numpy(x))[1]


def test_saelens_folders_of_both_versions_load_and_encode_as_published(tmp_path):
    x = np.random.default_rng(9).standard_normal((7, 12)).astype(np.float32)
    v6 = tmp_path / "v6"
    v6.mkdir()
    weights = random_weights(12, 40, 1)
    write_safetensors(v6 / "sae_weights.safetensors", weights)
    (v6 / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 12, "d_sae": 40, "k": 5,
                                             "apply_b_dec_to_input": True, "normalize_activations": "none",
                                             "meta": {"hook_name": "blocks.2.hook_resid_post"}}))
    sae = load_sae(v6)
    assert (sae.config.site, sae.config.layer, sae.config.layout, sae.config.k) == ("resid_post", 2, "saelens", 5)
    assert np.allclose(encoded(sae, x), reference_encode(weights, x, kind="topk", k=5), atol=1e-4)

    v5 = tmp_path / "v5"
    v5.mkdir()
    jump = random_weights(12, 40, 2, threshold=True)
    write_safetensors(v5 / "sae_weights.safetensors", jump)
    (v5 / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": 12, "d_sae": 40,
                                             "hook_name": "blocks.1.mlp.hook_post", "hook_layer": 1,
                                             "apply_b_dec_to_input": False}))
    sae = load_sae(v5)
    assert (sae.config.site, sae.config.layer, sae.config.architecture) == ("mlp_act", 1, "jumprelu")
    assert np.allclose(encoded(sae, x), reference_encode(jump, x, kind="jumprelu", subtract_b_dec=False), atol=1e-4)
    assert load_sae(v5, site="resid_pre", layer=0).config.site == "resid_pre"


def test_gemma_scope_files_load_and_encode_as_published(tmp_path):
    x = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
    weights = random_weights(12, 30, 4, threshold=True)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **weights)
    sae = load_sae(folder)
    assert (sae.config.site, sae.config.layer, sae.config.layout) == ("resid_post", 3, "gemma-scope")
    expected = reference_encode(weights, x, kind="jumprelu", subtract_b_dec=False)
    assert np.allclose(encoded(sae, x), expected, atol=1e-4) and (expected > 0).any() and (expected == 0).any()
    assert np.allclose(next(sae.encode_numpy(x))[2], expected @ weights["W_dec"] + weights["b_dec"], atol=1e-3)
    loose = tmp_path / "loose.safetensors"  # the same tensors as safetensors, no cfg.json, no telling path
    write_safetensors(loose, weights)
    sae = load_sae(loose, site="mlp_out", layer=1)
    assert (sae.config.site, sae.config.layer) == ("mlp_out", 1)
    assert np.allclose(encoded(sae, x), expected, atol=1e-4)


def test_own_folder_round_trips(tmp_path):
    config = SaeConfig(d_in=12, d_sae=20, architecture="topk", k=3, site="resid_mid", layer=2,
                       model={"ref": "m", "sha256": "abc"})
    sae = SparseAutoencoder(config, random_weights(12, 20, 7))
    write_outputs(tmp_path, sae_files(sae, {"training": {"steps": 3}}))
    again = load_sae(tmp_path)
    assert again.config.layout == "mlxscan" and again.config.model == {"ref": "m", "sha256": "abc"}
    assert (again.config.site, again.config.layer, again.config.k) == ("resid_mid", 2, 3)
    assert again.config.extra == {"training": {"steps": 3}}
    assert all(np.array_equal(again.weights()[name], value) for name, value in sae.weights().items())
    assert json.loads((tmp_path / "cfg.json").read_text())["meta"]["hook_name"] == "blocks.2.hook_resid_mid"


@pytest.mark.parametrize("damage, phrase", [
    (lambda w: w.pop("b_dec"), "b_dec missing"),
    (lambda w: w.update(W_dec=w["W_dec"][:, :5]), "W_dec has shape"),
    (lambda w: w.update(extra_tensor=np.zeros(3, np.float32)), "extra_tensor"),
    (lambda w: w.update(b_enc=np.full(20, np.nan, np.float32)), "NaN"),
])
def test_broken_sae_files_are_one_clear_error(tmp_path, damage, phrase):
    weights = random_weights(12, 20, 8)
    damage(weights)
    np.savez(tmp_path / "params.npz", **weights)
    with pytest.raises(MlxscanError, match=phrase):
        load_sae(tmp_path)
    with pytest.raises(MlxscanError, match="does not exist"):
        load_sae(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------
# A tiny model


CATEGORY_WORDS = {"cees": ("ccf", "cfc", "fcc"), "jays": ("jjm", "jmj", "mjj"), "peas": ("ppq", "pqp", "qpp")}
FRAMES = ("I saw the {} yesterday.", "The {} was near the door.", "She talked about the {} again.")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return mlxscan.load(tiny_folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from model_factory import CORPUS

    from mlxscan.stimuli import StimulusSet

    root = tmp_path_factory.mktemp("sae-inputs")
    (root / "train.txt").write_text("\n".join(CORPUS[:28]) + "\n")
    (root / "heldout.txt").write_text("\n".join(CORPUS[28:]) + "\n")
    records = [{"text": frame.format(word), "word": word, "category": category, "frame": f"f{n}"}
               for category, words in CATEGORY_WORDS.items() for word in words for n, frame in enumerate(FRAMES)]
    (root / "stimuli.jsonl").write_text(StimulusSet.from_records(records).to_jsonl())
    return {"train": root / "train.txt", "heldout": root / "heldout.txt", "stimuli": root / "stimuli.jsonl"}


def identity_sae(width: int, site: str, layer: int) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x: a ReLU SAE with features [x+, x-] that reconstructs anything exactly."""
    eye = np.eye(width, dtype=np.float32)
    weights = {"W_enc": np.c_[eye, -eye], "W_dec": np.r_[eye, -eye], "b_enc": np.zeros(2 * width, np.float32),
               "b_dec": np.zeros(width, np.float32)}
    return SparseAutoencoder(SaeConfig(d_in=width, d_sae=2 * width, architecture="relu", site=site, layer=layer),
                             weights)


def test_a_perfect_reconstruction_spliced_in_leaves_the_loss_unchanged(tiny, files):
    from mlxscan.sae.experiment import splice_losses
    from mlxscan.stimuli import read_texts

    texts = read_texts(files["heldout"])
    exact = identity_sae(tiny.d_model, "resid_post", 1)
    record, arrays = splice_losses(tiny, exact, texts, batch_size=4)
    assert np.allclose(arrays["nll_spliced"], arrays["nll_clean"], rtol=1e-5, atol=1e-5)
    every_token = SparseAutoencoder(replace(exact.config, skip_first=0), exact.weights())
    assert np.allclose(splice_losses(tiny, every_token, texts)[1]["nll_spliced"], arrays["nll_clean"], rtol=1e-5)
    assert record["delta_loss"] == pytest.approx(0, abs=1e-5)
    # Zeroing the site does move the loss (of a random model, in either direction: "recovered" needs a loss rise).
    loss = record["loss_per_token"]
    assert abs(loss["zero"] - loss["clean"]) > 0.01
    assert record["loss_recovered"] == (pytest.approx(1.0, abs=1e-4) if loss["zero"] > loss["clean"] else None)
    assert record["relative_change_at_site"] < 1e-6
    # A poor SAE (half the features) is seen: its splice moves the loss and the site.
    half = identity_sae(tiny.d_mlp, "mlp_act", 0)
    weights = half.weights()
    weights["W_dec"][tiny.d_mlp:] = 0  # negative parts dropped
    poor = SparseAutoencoder(half.config, weights)
    record, _ = splice_losses(tiny, poor, texts, batch_size=4)
    assert abs(record["delta_loss"]) > 1e-3 and record["relative_change_at_site"] > 0.1


def invoke(*args):
    from mlxscan.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def trained(tiny_folder, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "topk"
    result = invoke("sae", "train", "--model", tiny_folder, "--texts", files["train"], "--layer", "1",
                    "--features", "128", "--k", "8", "--steps", "150", "--batch-size", "64", "--json", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_sae_train_command_saves_a_loadable_sae(trained, files):
    record, out = trained
    assert record["analysis"] == "sae-train" and (record["site"], record["layer"]) == ("resid_post", 1)
    assert (record["d_in"], record["d_sae"]) == (64, 128) and record["settings"]["k"] == 8
    assert record["training_tokens"]["l0"] == pytest.approx(8) and record["training_tokens"]["fvu"] < 0.5
    # Every token but each text's first (the attention sink, left out by default).
    tokens = sum(len(ids) for ids in mlxscan.load(record["model"]["path"]).token_lists(
        files["train"].read_text().splitlines()))
    assert record["training_tokens"]["n_tokens"] == tokens - 28
    assert json.loads((out / "train.json").read_text()) == record
    with np.load(out / "train.npz") as arrays:
        assert arrays["history_step"][-1] == 150 and arrays["feature_frequency"].shape == (128,)
    assert (out / "train.png").read_bytes()[:4] == b"\x89PNG"
    sae = load_sae(out)
    assert sae.config.layout == "mlxscan" and sae.config.model["ref"] == record["model"]["ref"]
    assert sae.config.extra["training"]["settings"]["steps"] == 150 and sae.config.skip_first == 1


def test_sae_eval_command_on_its_own_sae(trained, files, tmp_path):
    _, out = trained
    result = invoke("sae", "eval", out, "--heldout", files["heldout"], "--stimuli", files["stimuli"], "--folds", "3",
                    "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    rec, down = record["reconstruction"], record["downstream"]
    assert rec["l0"] == pytest.approx(8) and 0 < rec["fvu"] < 1 and rec["d_sae"] == 128
    assert down["loss_per_token"]["zero"] != down["loss_per_token"]["clean"] and down["n_texts"] == 8
    assert record["localization"]["classes"] == list(CATEGORY_WORDS)
    assert set(record["separability"]) == {"neurons", "features"}
    assert record["separability"]["features"]["n_units"] == 128
    assert {"eval.json", "eval.npz", "eval.png"} <= {p.name for p in tmp_path.iterdir()}
    with np.load(tmp_path / "eval.npz") as arrays:
        assert arrays["js_features"].shape == (128,) and arrays["localization_accuracy_neurons"].shape[0] == 3
    table = invoke("sae", "eval", out, "--heldout", files["heldout"], "--no-concepts")
    assert table.exit_code == 0, table.output
    assert "held-out reconstruction" in table.output and "loss recovered" in table.output


def test_sae_eval_runs_external_saes_of_both_layouts(tiny_folder, files, tmp_path):
    saelens = tmp_path / "saelens"
    saelens.mkdir()
    write_safetensors(saelens / "sae_weights.safetensors", random_weights(64, 96, 11))
    (saelens / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 64, "d_sae": 96,
                                                  "meta": {"hook_name": "blocks.2.hook_resid_pre"}}))
    gemma = tmp_path / "gemma-scope-tiny-pt-mlp" / "layer_0"
    gemma.mkdir(parents=True)
    np.savez(gemma / "params.npz", **random_weights(64, 80, 12, threshold=True))
    for folder, place, layout in ((saelens, "resid_pre layer 2", "saelens"), (gemma, "mlp_out layer 0", "gemma-scope")):
        result = invoke("sae", "eval", folder, "--model", tiny_folder, "--heldout", files["heldout"], "--no-concepts")
        assert result.exit_code == 0, result.output
        assert f"{layout} " in result.output and place in result.output and "FVU" in result.output


@pytest.mark.parametrize("args, phrase", [
    (["sae", "eval", "MISSING"], "does not exist"),
    (["sae", "eval", "SAE", "--site", "mlp_act"], "wide"),
    (["sae", "eval", "SAE", "--layer", "7"], "has layers 0..2"),
    (["sae", "eval", "SAE", "--target-accuracy", "1.5"], "--target-accuracy"),
    (["sae", "train", "--k", "0", "--out", "OUT"], "at least 1"),
    (["sae", "train", "SAE", "--model", "m", "--out", "OUT"], "not both"),
    (["sae", "train", "--features", "4", "--k", "8", "--out", "OUT"], "more than the 4 features"),
])
def test_bad_input_exits_2_with_one_line(trained, tiny_folder, args, phrase, tmp_path):
    _, out = trained
    args = [{"SAE": out, "MISSING": tmp_path / "nothing", "OUT": tmp_path / "out"}.get(arg, arg) for arg in args]
    if args[1] == "train" and "--model" not in args:
        args += ["--model", tiny_folder]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_of_each_sae_command(command):
    result = invoke("sae", command, "--help")
    assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output
    assert "--json" in result.output and "--out" in result.output


def test_sae_train_reads_a_token_level_scan_folder(trained, tmp_path):
    record, _ = trained
    result = invoke("sae", "train", record["scan"], "--architecture", "relu", "--features", "32", "--steps", "20",
                    "--batch-size", "32", "--json", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["scan"] == record["scan"] and again["layer"] == 1 and again["settings"]["architecture"] == "relu"
    assert load_sae(tmp_path).config.architecture == "relu"
    pooled = invoke("sae", "train", record["scan"], "--layer", "2", "--out", tmp_path / "x")
    assert pooled.exit_code == 2 and "was not recorded" in pooled.stderr
