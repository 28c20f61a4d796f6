"""The causal experiments (ablate, steer, invariance) recover structure planted in a tiny model.

The model is model_factory's tiny random Llama (4 layers, d_model 64), with two edits made to its
safetensors before loading:
  * planted categories: each category's words are spelled from letters no other word or frame uses,
    and every token found only inside one category's words gets 4 * u_c added to its embedding
    (u_c orthonormal), so a category is one direction in the residual stream;
  * quiet blocks: the projections writing into the residual (o_proj, down_proj) are scaled by 0.05,
    so the blocks perturb that direction instead of burying it (at random init they write ~20x the
    embedding's norm).
Its final norm's epsilon is 1e-10: at random init the last residual is small, and the exactness of
scaling before the norm holds only where epsilon is negligible against it (the real model: 4e-7).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.errors import MlxscanError  # noqa: E402
from mlxscan.experiments import causal  # noqa: E402
from mlxscan.stimuli import StimulusSet  # noqa: E402

CATEGORY_WORDS = {
    "cees": ("ccf", "cfc", "fcc", "ffc"),
    "jays": ("jjm", "jmj", "mjj", "mmj"),
    "peas": ("ppq", "pqp", "qpp", "qqp"),
    "vees": ("vvx", "vxv", "xvv", "xxv"),
}
FRAMES = ("I saw the {} yesterday.", "The {} was near the door.", "She talked about the {} again.")
N_STIMULI = len(CATEGORY_WORDS) * 4 * len(FRAMES)
N_LAYERS, D_MODEL = 4, 64
PLANT_STRENGTH = 4.0
QUIET = 0.05
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# The planted model


def stimulus_records() -> list[dict]:
    return [{"text": frame.format(word), "word": word, "category": category, "frame": f"f{n}"}
            for category, words in CATEGORY_WORDS.items() for word in words for n, frame in enumerate(FRAMES)]


def category_tokens(folder: Path, stimuli: StimulusSet) -> dict[int, str]:
    """Token id -> category, for tokens seen only inside one category's words (never in a frame)."""
    from mlxscan.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)  # cached: loading the model afterwards reuses it
    owners, in_frames = {}, set()
    for stimulus in stimuli:
        ids, offsets = tokenizer.encode_with_offsets(stimulus.text)
        start, end = stimulus.word_span
        for token, (a, b) in zip(ids, offsets):
            if b > a and a < end and b > start:
                owners.setdefault(token, set()).add(stimulus.category)
            else:
                in_frames.add(token)
    return {token: next(iter(cats)) for token, cats in owners.items() if len(cats) == 1 and token not in in_frames}


def plant(folder: Path, stimuli: StimulusSet) -> np.ndarray:
    """Plant categories and quiet the blocks of the model in `folder`, in place; returns u [K, d_model]."""
    from safetensors.numpy import load_file, save_file

    tokens = category_tokens(folder, stimuli)
    assert {category for category in tokens.values()} == set(CATEGORY_WORDS), tokens
    weights = load_file(folder / "model.safetensors")
    directions = np.linalg.qr(np.random.default_rng(0).standard_normal((D_MODEL, len(CATEGORY_WORDS))))[0].T
    embed = weights["model.embed_tokens.weight"].copy()
    for token, category in tokens.items():
        embed[token] += PLANT_STRENGTH * directions[stimuli.categories.index(category)]
    weights["model.embed_tokens.weight"] = embed
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * QUIET
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return directions


@pytest.fixture(scope="module")
def stimuli_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stimuli") / "planted.jsonl"
    path.write_text(StimulusSet.from_records(stimulus_records()).to_jsonl())
    return path


@pytest.fixture(scope="module")
def stimuli(stimuli_file):
    from mlxscan.stimuli import load_stimuli

    return load_stimuli(stimuli_file)


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory, stimuli):
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    planted = root / "planted"
    # Built in a child process: with torch loaded beside it, MLX's first forward pass here takes seconds.
    build = (f"from model_factory import make_tiny_model; make_tiny_model('llama', {str(planted)!r}, "
             f"num_hidden_layers={N_LAYERS}, rms_norm_eps=1e-10)")
    subprocess.run([sys.executable, "-c", build], cwd=Path(__file__).parent, check=True, capture_output=True)
    np.save(root / "planted_directions.npy", plant(planted, stimuli))
    return planted


@pytest.fixture(scope="module")
def model(planted_folder):
    return mlxscan.load(planted_folder)


@pytest.fixture(scope="module")
def planted_directions(planted_folder) -> np.ndarray:
    return np.load(planted_folder.parent / "planted_directions.npy")


@pytest.fixture(scope="module")
def baseline(model, stimuli):
    return causal.prepare_baseline(model, stimuli, per_category=None, seed=0)


def planted_class_mean_directions(directions: np.ndarray) -> np.ndarray:
    """What the class-mean difference of orthonormal planted directions is: u_c - mean of the others."""
    K = len(directions)
    expected = directions - (directions.sum(axis=0) - directions) / (K - 1)
    return expected / np.linalg.norm(expected, axis=1, keepdims=True)


def run_cli(*args):
    """The command in this process (the tiny model loads in a blink); stdout and stderr kept apart."""
    from mlxscan.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def assert_one_error_line(result, phrase: str) -> None:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), f"stderr should be one Error: line, got {lines}"
    assert phrase in lines[0], lines[0]
    assert result.exit_code == 2, f"exit status {result.exit_code}, not 2"
    assert result.stdout == ""


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path


# ----------------------------------------------------------------------------------------------------
# 1. The engine: run_stimuli and the next-token comparisons


def test_run_stimuli_equals_a_scan_of_the_same_stimuli(model, stimuli, tmp_path):
    from mlxscan.capture.scan import ScanSettings, run_scan
    from mlxscan.experiments.runs import run_stimuli

    for pool in ("word", "last"):
        scan = run_scan(model, stimuli, tmp_path / pool, ScanSettings(pool=pool))
        # Another batch size: batches of other lengths and padding must not change a stimulus' values.
        run = run_stimuli(model, stimuli, pool=pool, batch_size=7, next_token=True)
        expected = np.asarray(scan["resid_post"])
        assert run.arrays["resid_post"].shape == expected.shape == (N_STIMULI, N_LAYERS, D_MODEL)
        scale = np.abs(expected).max()
        assert np.abs(run.arrays["resid_post"] - expected).max() <= 1e-5 * scale, pool
        assert run.layers == tuple(range(N_LAYERS))

    recording = model.run(stimuli.texts[:3], sites=["final_norm"])  # one batch, right-padded
    for row in range(3):
        last = recording.lengths[row] - 1
        np.testing.assert_allclose(run.last_final_norm[row], recording["final_norm"][row, last], rtol=0, atol=1e-5)


def test_run_stimuli_reports_what_its_interventions_changed(model, stimuli):
    from mlxscan.capture.interventions import Scale
    from mlxscan.experiments.runs import run_stimuli

    run = run_stimuli(model, stimuli, layers=(1,), interventions=[Scale("resid_post", 1, factor=3.0)])
    assert run.effects == pytest.approx({"Scale('resid_post', layer=1)": 2.0})  # ||3x - x|| / ||x||
    with pytest.raises(MlxscanError, match="pool must be"):
        run_stimuli(model, stimuli, pool="max")


def test_next_token_kl_of_identical_inputs_is_zero(model, baseline):
    from mlxscan.experiments.runs import next_token_change, next_token_kl, top1_agreement

    reference = baseline.final_norm
    assert np.all(next_token_kl(model, reference, reference) == 0)
    assert top1_agreement(model, reference, reference).all()
    shuffled = reference[::-1]
    kl, same = next_token_change(model, reference, shuffled, batch_size=5)
    assert np.all(kl >= 0) and kl.mean() > 1e-3
    np.testing.assert_allclose(kl, next_token_kl(model, reference, shuffled), rtol=1e-5, atol=1e-7)
    assert np.array_equal(same, top1_agreement(model, reference, shuffled))


# ----------------------------------------------------------------------------------------------------
# 2. The baseline finds the planted structure


def test_the_baseline_recovers_the_planted_directions(baseline, planted_directions):
    assert baseline.rerun_error <= 1e-6  # the in-memory rerun is the scan
    assert (baseline.layer, baseline.readout_layer) == (N_LAYERS // 2, N_LAYERS - 1)
    expected = planted_class_mean_directions(planted_directions)
    cosines = np.einsum("kd,kd->k", baseline.directions, expected)
    assert np.all(cosines > 0.8), cosines
    assert np.allclose(baseline.clean_probabilities.argmax(axis=1), baseline.y)
    assert np.all(baseline.separation > 0)
    # A stimulus already at its category's readout position has moved 0 toward it.
    assert np.allclose(baseline.concept_shift(baseline.at_readout, baseline.y), 0)


# ----------------------------------------------------------------------------------------------------
# 3. The experiments on the planted model


@pytest.fixture(scope="module")
def ablation(model, baseline):
    from mlxscan.experiments.ablation import run_ablation

    # k = 4 of 64 dimensions: a planted direction spread over all of them keeps most of its length.
    return run_ablation(model, baseline, k=4, draws=4, direction_draws=1)


def test_projecting_the_planted_direction_collapses_its_readout_and_random_units_do_not(ablation):
    assert ablation.clean_auc == pytest.approx((1.0,) * len(CATEGORY_WORDS))
    direction, random_units = ablation.arm("direction"), ablation.arm("random_units")
    assert direction.mean_delta_auc > 0.3 and direction.mean_delta_auc_ci[0] > 0.2, direction
    assert all(delta > 0.15 for delta in direction.delta_auc), direction.delta_auc
    assert abs(random_units.mean_delta_auc) < 0.05 and random_units.runs == 4, random_units
    assert abs(ablation.arm("random_direction").mean_delta_auc) < 0.05
    assert 0 < ablation.random_units_p <= 1
    for arm in ablation.arms:
        assert 0 <= arm.top1_agreement <= 1 and arm.kl >= 0
        assert arm.mean_delta_auc_ci[0] <= arm.mean_delta_auc <= arm.mean_delta_auc_ci[1], arm.name


def test_the_ablation_record_holds_the_arrays_its_numbers_came_from(ablation, baseline):
    from mlxscan.experiments.causal import ovr_auc

    record, arrays = ablation.to_dict(), ablation.arrays()
    json.dumps(record, allow_nan=False)
    assert [arm["name"] for arm in record["arms"]] == ["top_units", "random_units", "direction", "random_direction"]
    assert record["mode"] == "mean" and record["k"] == 4 and "control" in record
    assert arrays["top_units"].shape == (len(CATEGORY_WORDS), 4)
    assert arrays["direction_probabilities"].shape == (len(CATEGORY_WORDS), N_STIMULI, len(CATEGORY_WORDS))
    # The reported ΔAUC of each category's direction arm is recomputed from the saved probabilities.
    for c in range(len(CATEGORY_WORDS)):
        auc = ovr_auc(arrays["labels"], arrays["direction_probabilities"][c])[0, c]
        assert ablation.arm("direction").delta_auc[c] == pytest.approx(arrays["clean_auc"][c] - auc)


def test_zero_ablation_differs_from_mean_ablation(model, baseline):
    from mlxscan.experiments.ablation import _direction_ablation, _unit_ablation

    mean_units, zero_units = _unit_ablation(baseline, [0, 1], "mean"), _unit_ablation(baseline, [0, 1], "zero")
    assert np.allclose(mean_units[0].mean, baseline.at_layer.mean(axis=0)[[0, 1]]) and zero_units[0].mode == "zero"
    assert len(_direction_ablation(baseline, baseline.directions[0], "mean")) == 2  # project, then the mean back
    assert len(_direction_ablation(baseline, baseline.directions[0], "zero")) == 1


@pytest.fixture(scope="module")
def steering(model, baseline):
    from mlxscan.experiments.steering import run_steering

    return run_steering(model, baseline, alphas=(0.25, 0.5, 1.0, 2.0), additivity_alpha=0.25, steer_alpha=0.5)


def test_steering_along_the_planted_direction_raises_the_readout_monotonically(steering):
    shifts = [row.shift for row in steering.doses]
    changes = [row.probability_change for row in steering.doses]
    assert steering.monotonic and np.all(np.diff([0.0] + shifts) > 0), shifts
    assert np.all(np.diff(changes) >= -1e-9) and changes[-1] > 0.5, changes
    assert shifts[-1] > 1.0  # at α = 2 the steered stimuli pass the target category's own mean


def test_additivity_ratio_is_finite_and_reported(steering):
    # Layers L..R: N stops at R - L + 1 = 2 on the 4-layer model.
    assert [row.n_layers for row in steering.additivity] == [1, 2]
    assert steering.additivity[0].ratio == 1.0  # N = 1: both arms are the same run
    row = steering.additivity[1]
    assert np.isfinite(row.ratio) and 0.5 < row.ratio < 1.5, row
    assert row.ratio_ci[0] <= row.ratio <= row.ratio_ci[1]
    record = steering.to_dict()
    json.dumps(record, allow_nan=False)
    assert set(record["steerability"]) == set(CATEGORY_WORDS)
    assert record["correlation"]["n"] == len(CATEGORY_WORDS)


def test_scaling_before_the_final_norm_changes_nothing(model, baseline):
    from mlxscan.experiments.invariance import run_invariance

    result = run_invariance(model, baseline)
    assert result.ok and max(result.exact.max_relative_logit_change) <= 1e-5, result.exact
    assert result.exact.layer == N_LAYERS - 1 and max(result.exact.max_kl) <= 1e-8
    rows = {row.factor: row for row in result.rows}
    assert rows[1.0].whole.kl == 0 and rows[1.0].concept.shift == 0
    # Scaling only the concept component moves the readout with the factor; the whole residual at L
    # is not invisible in a pre-norm model (later blocks add to a residual of another length).
    assert result.concept_monotonic
    assert rows[0.25].concept.shift < 0 < rows[4.0].concept.shift
    assert rows[4.0].whole.kl > 1e-4
    json.dumps(result.to_dict(), allow_nan=False)


def test_generation_is_greedy_and_steering_changes_it(model, baseline):
    import mlx.core as mx

    from mlxscan.experiments.steering import generate_steered

    result = generate_steered(model, "I saw the", baseline.directions[1], layer=baseline.layer,
                              typical_norm=baseline.typical_norm, alphas=(4.0, 16.0), max_tokens=4)
    plain = result.continuations[0]
    assert [c.alpha for c in result.continuations] == [0.0, 4.0, 16.0]
    tokens = model.tokenize("I saw the")
    for token in plain.tokens:  # greedy: each token is the argmax after the ones before it
        final = model.run([tokens], sites=["final_norm"])["final_norm"][:, -1]
        assert token == int(np.argmax(np.array(model.lm_head(mx.array(final)))))
        tokens.append(token)
    assert result.continuations[-1].tokens != plain.tokens
    assert all(np.isfinite(c.plain_nll) for c in result.continuations if c.tokens)


# ----------------------------------------------------------------------------------------------------
# 4. The pure statistics, on synthetic arrays


def test_participation_ratio_counts_the_dimensions_points_spread_over():
    rng = np.random.default_rng(0)
    line = rng.standard_normal((200, 1)) * rng.standard_normal(50)  # rank 1
    assert causal.participation_ratio(line + 1e-6 * rng.standard_normal((200, 50))) == pytest.approx(1.0, abs=1e-3)
    isotropic = rng.standard_normal((20000, 8))
    assert causal.participation_ratio(isotropic) == pytest.approx(8.0, rel=0.02)
    two = np.c_[rng.standard_normal(5000), rng.standard_normal(5000), np.zeros((5000, 6))]
    assert causal.participation_ratio(two) == pytest.approx(2.0, rel=0.05)
    assert causal.participation_ratio(np.ones((5, 3))) == 0.0
    with pytest.raises(MlxscanError):
        causal.participation_ratio(np.ones(5))


def test_encoding_dimensionality_ignores_one_loud_dimension():
    from mlxscan.experiments.steering import encoding_dimensionality

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 400)
    X = rng.standard_normal((800, 10))
    X[y == 0, :3] *= 0.01  # class 0 spreads over 7 dimensions, class 1 over 10
    X[:, 9] *= 1000  # a rogue dimension, loud for everyone
    low, high = encoding_dimensionality(X, y, 2)
    assert low < high and low == pytest.approx(7, rel=0.15) and high == pytest.approx(10, rel=0.15)


def test_correlation_interval_covers_a_planted_correlation():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(200)
    result = causal.correlation_with_ci(x, -0.8 * x + 0.6 * rng.standard_normal(200), seed=0, resamples=300)
    assert result["pearson"] == pytest.approx(-0.8, abs=0.06)
    assert result["pearson_ci"][0] < result["pearson"] < result["pearson_ci"][1] < -0.6
    assert causal.correlation_with_ci([1, 2], [3, 4], seed=0)["pearson"] is None  # too few points


def test_word_bootstrap_moves_words_whole():
    groups = np.repeat(["a", "b", "c", "d"], 3)
    weights = causal.word_resample_weights(groups, seed=0, resamples=50)
    assert weights.shape == (50, 12) and np.all(weights.sum(axis=1) == 12)
    assert np.all(weights.reshape(50, 4, 3) == weights.reshape(50, 4, 3)[:, :, :1])
    values = np.arange(12.0)
    mean, (low, high) = causal.mean_with_ci(values, weights)
    assert mean == 5.5 and low <= mean <= high


def test_subsampling_keeps_whole_words_and_the_same_frames(stimuli):
    subset = causal.subsample_words(stimuli, 2, seed=3, frames=2)
    assert len(subset) == len(CATEGORY_WORDS) * 2 * 2
    for category in CATEGORY_WORDS:
        assert len({s.group for s in subset if s.category == category}) == 2
    assert len({s.frame for s in subset}) == 2
    assert [s.text for s in causal.subsample_words(stimuli, 2, seed=3, frames=2)] == [s.text for s in subset]
    assert causal.subsample_words(stimuli, None, seed=0) is stimuli
    with pytest.raises(MlxscanError, match="--per-category 5"):
        causal.subsample_words(stimuli, 5, seed=0)


def test_steering_targets_are_other_categories_balanced_by_word(stimuli):
    from mlxscan.experiments.steering import steering_targets

    targets = steering_targets(stimuli.labels, stimuli.groups, len(CATEGORY_WORDS), seed=0)
    assert np.all(targets != stimuli.labels)
    assert np.bincount(targets).tolist() == [N_STIMULI // len(CATEGORY_WORDS)] * len(CATEGORY_WORDS)
    for word in set(stimuli.groups):  # one target per word
        assert len(set(targets[stimuli.groups == word])) == 1


# ----------------------------------------------------------------------------------------------------
# 5. Claims that can fail: planted categories against categories that mean nothing


def meaningless_records() -> list[dict]:
    """The planted stimuli regrouped: group g holds word g of every real category, so a group label
    carries no meaning (every group has one word of each planted category)."""
    groups = {}
    for category, words in CATEGORY_WORDS.items():
        for g, word in enumerate(words):
            groups.setdefault(f"group{g}", []).append(word)
    return [{"text": frame.format(word), "word": word, "category": group, "frame": f"f{n}"}
            for group, words in groups.items() for word in words for n, frame in enumerate(FRAMES)]


@pytest.fixture(scope="module")
def meaningless_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("meaningless") / "meaningless.jsonl"
    path.write_text(StimulusSet.from_records(meaningless_records()).to_jsonl())
    return path


def causal_claims(command: str, planted: Path, folder: Path, stimuli_path: Path, *extra) -> dict:
    out = folder / command
    result = run_cli(command, "--model", planted, "--stimuli", stimuli_path, "--per-category", 0,
                     "--frames", 0, *extra, "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    return {c["id"]: c for c in json.loads(result.stdout)["claims"]["claims"]}


LABEL_FREE_OPTIONS = {"ablate": ("--k", 4, "--draws", 4, "--direction-draws", 4),
                      "steer": ("--alphas", "0.5,1", "--steer-alpha", "1", "--random-draws", 4),
                      "invariance": ("--factors", "0.5,1,2")}


@pytest.mark.parametrize("command", sorted(LABEL_FREE_OPTIONS))
def test_categories_that_mean_nothing_support_no_label_dependent_claim(command, planted_folder, meaningless_file,
                                                                       tmp_path):
    # Issue 21: before cross-fitting and random controls, ablation and steering were "supported" here.
    claims = causal_claims(command, planted_folder, tmp_path, meaningless_file, *LABEL_FREE_OPTIONS[command])
    dependent = {key: c for key, c in claims.items() if not c["label_free"]}
    assert dependent, claims
    for key, c in dependent.items():
        assert c["verdict"] != "supported", (key, c["reason"])
    # The held-out clean readout of a meaningless group does not beat chance: there is nothing to remove.
    assert all(c["verdict"] == "untestable" for c in dependent.values()), {k: c["reason"] for k, c in dependent.items()}


def test_planted_categories_support_their_causal_claims(planted_folder, stimuli_file, tmp_path):
    claims = causal_claims("ablate", planted_folder, tmp_path, stimuli_file, "--k", 4, "--draws", 4,
                           "--direction-draws", 9)
    direction = claims["ablate.direction_vs_random"]
    assert direction["effect"] > 0.2 and direction["ci"][0] > 0.1, direction
    # Random directions leave the planted readout at AUC 1 in every draw: no spread, so the p is the rank
    # among 9 draws, 0.1, honestly short of significance rather than a fitted 1e-16.
    assert direction["p"] == pytest.approx(0.1) and "empirical rank" in direction["test"], direction
    assert direction["verdict"] == "null"
    steer = causal_claims("steer", planted_folder, tmp_path, stimuli_file, *LABEL_FREE_OPTIONS["steer"])
    assert steer["steer.shifts"]["verdict"] == "supported", steer["steer.shifts"]["reason"]


def test_arms_are_cross_fitted_from_training_words_only(baseline):
    from mlxscan.analysis.directions import class_mean_directions

    for fold in range(len(baseline.fold_directions)):
        train = baseline.fold_of != fold
        expected, _ = class_mean_directions(baseline.at_layer[train], baseline.y[train])
        assert np.allclose(baseline.fold_directions[fold], expected, atol=1e-6)
        # Moving a held-out stimulus leaves every other fold's estimate unchanged, by construction of the folds.
    assert baseline.testable.all() and (baseline.clean_auc_ci[:, 0] > 0.5).all()


# ----------------------------------------------------------------------------------------------------
# 6. The commands


def test_ablate_json_and_out(planted_folder, stimuli_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("ablate", "--model", planted_folder, "--stimuli", stimuli_file, "--per-category", 3,
                     "--frames", 0, "--k", 4, "--draws", 2, "--direction-draws", 0, "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    claims = record.pop("claims")  # judged from the saved files, so not inside them
    assert json.loads((out / "ablation.json").read_text()) == record
    assert json.loads((out / "claims.json").read_text()) == claims
    assert [c["id"] for c in claims["claims"]] == ["ablate.units_vs_random", "ablate.direction_vs_units"]  # no random direction asked for
    assert claims["claims"][0]["verdict"] in ("supported", "null", "failed-control", "untestable")
    assert record["n_stimuli"] == len(CATEGORY_WORDS) * 3 * len(FRAMES) and record["n_words"] == 12
    assert [arm["name"] for arm in record["arms"]] == ["top_units", "random_units", "direction"]
    assert record["arms"][2]["mean_delta_auc"] > 0.2
    arrays = np.load(out / "ablation.npz")
    assert arrays["random_units"].shape == (2, 4) and arrays["direction_kl"].shape == (4, record["n_stimuli"])
    assert_png(out / "ablation.png")


def test_ablate_prints_a_table(planted_folder, stimuli_file):
    result = run_cli("ablate", "--model", planted_folder, "--stimuli", stimuli_file, "--frames", 1, "--k", 2,
                     "--draws", 1, "--direction-draws", 1, "--ablate-mode", "zero")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ablation (zero ablation)") and "layer 2" in lines[0]
    assert lines[2].split()[:2] == ["arm", "ΔAUC"]
    assert any(line.startswith("direction (own)") for line in lines)
    assert any(line.startswith("control:") for line in lines)
    assert any(line.startswith("claims (default gate") for line in lines)


def test_steer_json_and_out(planted_folder, stimuli_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("steer", "--model", planted_folder, "--stimuli", stimuli_file, "--per-category", 0,
                     "--frames", 0, "--alphas", "0.5,1", "--steer-alpha", "1", "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    claims = record.pop("claims")
    assert json.loads((out / "steering.json").read_text()) == record
    by_id = {c["id"]: c for c in claims["claims"]}
    assert by_id["steer.shifts"]["verdict"] == "supported", by_id["steer.shifts"]["reason"]
    assert by_id["steer.additive.N2"]["label_free"]
    assert [row["alpha"] for row in record["dose_response"]] == [0.5, 1.0] and record["monotonic"]
    assert len(record["additivity"]) == 2 and record["steer_alpha"] == 1.0
    assert np.load(out / "steering.npz")["shift"].shape == (2, N_STIMULI)
    assert_png(out / "steering.png"), assert_png(out / "steering_additivity.png")


def test_steer_generate_prints_continuations_side_by_side(planted_folder, stimuli_file, tmp_path):
    result = run_cli("steer", "--model", planted_folder, "--stimuli", stimuli_file, "--generate", "I saw the",
                     "--category", "peas", "--alphas", "2,8", "--max-tokens", 3, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'peas'" in lines[0] and lines[1] == "prompt: I saw the"
    assert [line.split()[0] for line in lines[3:6]] == ["plain", "2", "8"]
    record = json.loads((tmp_path / "out" / "steering_generation.json").read_text())
    assert [row["alpha"] for row in record["continuations"]] == [0.0, 2.0, 8.0]


def test_invariance_table_and_out(planted_folder, stimuli_file, tmp_path):
    out = tmp_path / "out"
    result = run_cli("invariance", "--model", planted_folder, "--stimuli", stimuli_file, "--factors", "0.5,1,2",
                     "--out", out)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines if line[:6].strip() in ("0.5", "1", "2")] == ["0.5", "1", "2"]
    exact = next(line for line in lines if line.startswith("exact check"))
    assert exact.endswith("OK (tolerance 1e-05)"), exact
    record = json.loads((out / "invariance.json").read_text())
    assert record["ok"] and [row["factor"] for row in record["rows"]] == [0.5, 1.0, 2.0]
    assert np.load(out / "invariance.npz")["concept_shift"].shape == (3, record["n_stimuli"])
    assert_png(out / "invariance.png"), assert_png(out / "invariance_shift.png")


def test_invariance_exits_1_when_the_exact_check_fails(planted_folder, stimuli_file, tmp_path, monkeypatch):
    from mlxscan.experiments import invariance

    def broken(model, baseline, factors, tolerance):  # as if the scale landed after the final norm
        return invariance.ExactCheck(layer=N_LAYERS - 1, factors=(2.0,), max_relative_logit_change=(1.0,),
                                     max_kl=(0.3,), tolerance=tolerance, n_stimuli=4)

    monkeypatch.setattr(invariance, "exact_check", broken)
    result = run_cli("invariance", "--model", planted_folder, "--stimuli", stimuli_file, "--frames", 1,
                     "--factors", "2", "--json", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ok"] is False
    assert result.stderr.startswith("Error: exact check FAILED") and len(result.stderr.splitlines()) == 1
    assert (tmp_path / "out" / "invariance.json").exists()  # the numbers are kept for inspection


BAD_INPUTS = [
    (["steer", "--generate", "I saw", "--category", "owls"], "category 'owls' is not in the stimuli"),
    (["steer", "--category", "peas"], "--category chooses the direction of --generate"),
    (["ablate", "--layer", "9"], "--layer 9 does not exist"),
    (["ablate", "--layer", "3", "--readout-layer", "1"], "comes before --layer 3"),
    (["ablate", "--k", "65"], "--k 65: choose 1..64"),
    (["ablate", "--per-category", "5"], "--per-category 5: choose 2..4"),
    (["steer", "--alphas", "0.5,nan"], "--alphas must be finite numbers"),
    (["steer", "--alphas", "0.5,big"], "--alphas must be comma-separated numbers"),
    (["steer", "--additivity-alpha", "inf"], "--additivity-alpha must be finite"),
    (["invariance", "--factors", "1,-2"], "--factors must be finite positive numbers"),
]


@pytest.mark.parametrize("args, phrase", BAD_INPUTS, ids=lambda value: "_".join(value) if isinstance(value, list) else "")
def test_bad_input_is_one_error_line_and_exit_2(args, phrase, planted_folder, stimuli_file, tmp_path):
    result = run_cli(*args, "--model", planted_folder, "--stimuli", stimuli_file, "--out", tmp_path / "out")

    assert_one_error_line(result, phrase)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["ablate", "steer", "invariance"])
def test_help(command):
    result = run_cli(command, "--help")
    assert result.exit_code == 0 and "--json" in result.stdout and "--out" in result.stdout
