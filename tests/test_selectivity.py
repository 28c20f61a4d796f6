"""Unit selectivity, split-half replicability and concept directions: planted answers, then the CLI.

Sections 1-3 plant known structure in synthetic arrays (no mlx): a selective unit that must be found
and must replicate, a distributed code that is decodable without any replicable unit, and a planted
direction that both direction estimates must recover. Section 4 runs `mlxscan selectivity` and
`mlxscan directions` on scans of a tiny random Llama (model_factory) over a small stimulus set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hypergeom

from mlxscan.analysis.directions import class_mean_directions, concept_directions, probe_directions
from mlxscan.analysis.selectivity import (selectivity_null, split_half_replicability, top_units, unit_selectivity,
                                          word_halves)
from mlxscan.analysis.selectivity_report import layer_selectivity
from mlxscan.errors import MlxscanError

PLANTED_UNIT, PLANTED_CLASS = 17, 2


def word_design(n_classes: int = 5, words: int = 8, frames: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Labels and words of n_classes x words x frames stimuli, every frame of a word together."""
    y = np.repeat(np.arange(n_classes), words * frames)
    groups = np.array([f"c{c}w{w}" for c in range(n_classes) for w in range(words) for _ in range(frames)])
    return y, groups


def noise_with_word_offsets(rng, groups, width: int, word_sd: float) -> np.ndarray:
    """Stimulus noise plus an offset per word: frames of one word share idiosyncrasies, as real words do."""
    names, word_of = np.unique(groups, return_inverse=True)
    return rng.normal(size=(len(groups), width)) + rng.normal(0, word_sd, (len(names), width))[word_of]


def planted_unit_data(seed: int = 0, width: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y, groups = word_design()
    X = noise_with_word_offsets(rng, groups, width, word_sd=0.5)
    X[:, PLANTED_UNIT] += 2.0 * (y == PLANTED_CLASS)
    return X, y, groups


def distributed_data(seed: int = 1, width: int = 1000, strength: float = 3.0):
    """Each class shifts the activations along its own random direction (norm 3 over 1000 units, ~0.1 a
    unit): a code every unit carries a little of and none carries alone."""
    rng = np.random.default_rng(seed)
    y, groups = word_design(words=16, frames=4)
    directions = rng.normal(size=(5, width))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return noise_with_word_offsets(rng, groups, width, word_sd=0.3) + strength * directions[y], y, groups


def held_out_word_accuracy(X, y, groups, folds: int = 4) -> float:
    """Nearest class-mean decoding, trained and tested on disjoint words (a linear read-out)."""
    names, word_of = np.unique(groups, return_inverse=True)
    fold_of_word = np.random.default_rng(0).permutation(len(names)) % folds
    correct = 0
    for fold in range(folds):
        test = fold_of_word[word_of] == fold
        means = np.stack([X[~test & (y == c)].mean(0) for c in np.unique(y)])
        distances = ((X[test][:, None, :] - means[None]) ** 2).sum(-1)
        correct += int((distances.argmin(1) == y[test]).sum())
    return correct / len(y)


def cosine(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


# ----------------------------------------------------------------------------------------------------
# 1. Selectivity and its null


def test_word_sums_give_the_same_dprime_as_unit_selectivity():
    X, y, groups = planted_unit_data()
    report = layer_selectivity(X[:, None, :], y, groups, k=3, halvings=2, permutations=2)
    expected, classes = unit_selectivity(X, y)
    assert np.allclose(report.layers[0].selectivity, expected, atol=1e-10)
    assert np.array_equal(report.layers[0].top_units, top_units(expected, 3))


def test_a_planted_selective_unit_is_found_beats_the_null_and_replicates():
    X, y, groups = planted_unit_data()
    noise = noise_with_word_offsets(np.random.default_rng(9), groups, X.shape[1], word_sd=0.5)
    permutations = 200
    report = layer_selectivity(np.stack([noise, X], axis=1), y, groups, k=1, halvings=50,
                               permutations=permutations)
    floor = 1 / (permutations + 1)  # the smallest p a permutation test can give
    planted = report.layers[1]

    assert planted.top_units[PLANTED_CLASS, 0] == PLANTED_UNIT
    assert planted.top_p[PLANTED_CLASS, 0] == floor and planted.null.p_best[PLANTED_CLASS] == floor
    overlaps = planted.replicability.overlaps  # [halvings, classes]
    assert overlaps[:, PLANTED_CLASS].mean() >= 0.95  # k = 1: the same unit wins in both halves
    assert np.delete(overlaps, PLANTED_CLASS, axis=1).mean() < 0.1  # the other classes have no such unit
    assert planted.replicability.shuffled_overlaps.mean() < 0.1  # random word sets do not find it
    assert report.selective_layers().tolist() == [False, True]
    assert report.layers[0].null.p_layer > 0.05
    assert report.to_dict()["layers"][1]["best"] == {"class": PLANTED_CLASS, "unit": PLANTED_UNIT,
                                                     "dprime": pytest.approx(planted.top_dprime[PLANTED_CLASS, 0]),
                                                     "p": floor}


def test_the_null_is_calibrated_on_word_structured_noise():
    """Words shared by frames make some units look selective; shuffling whole words accounts for it."""
    y, groups = word_design()
    p_values = []
    for seed in range(60):
        X = noise_with_word_offsets(np.random.default_rng(seed), groups, 60, word_sd=0.7)
        p_values.append(selectivity_null(X, y, groups, k=5, permutations=100, seed=seed).p_best)
    rejected = (np.array(p_values) < 0.05).mean()  # 300 tests at level 0.05
    assert 0.01 < rejected < 0.10, rejected


# ----------------------------------------------------------------------------------------------------
# 2. Replicability and its chance level


def test_a_distributed_code_is_decodable_but_its_top_units_do_not_replicate():
    X, y, groups = distributed_data()
    replicability = split_half_replicability(X, y, groups, k=20, halvings=50)

    assert held_out_word_accuracy(X, y, groups) > 0.5  # chance 0.2
    assert replicability.chance == 20 / 1000
    assert replicability.mean < replicability.chance_q95
    assert replicability.fraction_above_chance < 0.15
    assert replicability.shuffled_overlaps.mean() < replicability.chance_q95


def test_a_stronger_distributed_code_replicates_above_chance_without_any_selective_unit():
    """Overlap measures whether the ranking of units is reproducible, not whether single units carry
    the category: with enough signal, a random direction's larger loadings win in both halves too."""
    X, y, groups = distributed_data(strength=5.0)
    replicability = split_half_replicability(X, y, groups, k=20, halvings=50)
    assert replicability.mean > 3 * replicability.chance
    assert replicability.shuffled_overlaps.mean() < replicability.chance_q95


@pytest.mark.parametrize("n_units, k", [(200, 1), (200, 20), (576, 20), (1536, 50)])
def test_chance_overlap_is_k_over_n_and_matches_random_k_sets(n_units, k):
    X = np.random.default_rng(0).normal(size=(80, n_units))
    y, groups = word_design(n_classes=2, words=4, frames=10)
    replicability = split_half_replicability(X, y, groups, k=k, halvings=2)
    rng = np.random.default_rng(1)
    overlaps = np.array([len(np.intersect1d(rng.choice(n_units, k, replace=False),
                                            rng.choice(n_units, k, replace=False))) / k for _ in range(20000)])

    assert replicability.chance == pytest.approx(k / n_units) == pytest.approx(hypergeom(n_units, k, k).mean() / k)
    assert abs(overlaps.mean() - replicability.chance) < 4 * overlaps.std() / np.sqrt(len(overlaps)) + 1e-12
    assert np.mean(overlaps > replicability.chance_q95) <= 0.05
    assert np.mean(overlaps >= replicability.chance_q95) >= 0.05


def test_chance_counts_only_units_that_vary():
    X, y, groups = planted_unit_data()
    X[:, :50] = 3.0  # dead units can never rank first, so random top-k sets are drawn from the rest
    replicability = split_half_replicability(X, y, groups, k=5, halvings=3)
    assert replicability.n_units == 150 and replicability.chance == 5 / 150


def test_halvings_keep_each_word_on_one_side_and_every_category_on_both():
    y, groups = word_design(n_classes=4, words=5, frames=3)  # odd word counts: halves of 2 and 3 words
    halves = word_halves(y, groups, halvings=40, seed=3)

    assert halves.shape == (40, len(y))
    for in_a in halves:
        for word in np.unique(groups):
            assert len(set(in_a[groups == word])) == 1, word
        for c in range(4):
            words_a = len(np.unique(groups[in_a & (y == c)]))
            assert words_a in (2, 3)
    assert len({row.tobytes() for row in halves}) > 30  # the halvings differ
    assert np.array_equal(halves, word_halves(y, groups, halvings=40, seed=3))


BAD_ARRAYS = {
    "k larger than the width": (dict(k=201), "k must lie in 1..200"),
    "one word in a category": (dict(one_word=True), "needs at least 2 words per category"),
    "a word in two categories": (dict(mixed=True), "has stimuli of two categories"),
    "no halvings": (dict(halvings=0), "must be at least 1"),
}


@pytest.mark.parametrize("case", BAD_ARRAYS, ids=list(BAD_ARRAYS))
def test_bad_arrays_are_refused_with_one_clear_line(case):
    options, phrase = BAD_ARRAYS[case]
    X, y, groups = planted_unit_data()
    y = y.copy()
    if options.pop("one_word", False):
        groups = np.where(y == 0, "only", groups)
    if options.pop("mixed", False):
        y[0] = 1  # the first frame of word c0w0 now belongs to class 1
    with pytest.raises(MlxscanError, match=phrase) as error:
        layer_selectivity(X[:, None, :], y, groups, **{"k": 5, "halvings": 2, "permutations": 2, **options})
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------------
# 3. Concept directions


def planted_direction_data(seed: int = 0, width: int = 20):
    """Class 0 shifted along v in isotropic coordinates Z, the units then scaled unequally (X = Z * scales).

    A probe on standardized X undoes the scales, so in raw coordinates its weight is v / scales; the
    class-mean difference is where the class moves X, v * scales.
    """
    rng = np.random.default_rng(seed)
    y, groups = word_design(n_classes=4, words=16, frames=10)  # 640 stimuli: probe weights need many per unit
    v = rng.normal(size=width)
    v /= np.linalg.norm(v)
    Z = rng.normal(size=(len(y), width)) + 2.5 * np.outer(y == 0, v)
    scales = rng.uniform(0.5, 3.0, size=width)
    return Z * scales, y, groups, v, scales


def test_probe_directions_recover_a_planted_direction_in_raw_coordinates():
    X, y, groups, v, scales = planted_direction_data()
    directions, classes = probe_directions(X, y)

    assert directions.shape == (4, X.shape[1]) and directions.dtype == np.float32
    assert np.allclose(np.linalg.norm(directions, axis=1), 1, atol=1e-5)
    assert cosine(directions[0], v / scales) > 0.9
    assert cosine(directions[0], v * scales) < cosine(directions[0], v / scales)  # the std mapping matters


def test_class_mean_directions_recover_a_planted_direction():
    X, y, groups, v, scales = planted_direction_data()
    directions, classes = class_mean_directions(X, y)
    assert cosine(directions[0], v * scales) > 0.9


def test_concept_directions_stack_both_kinds_per_layer_with_a_split_half_control():
    X, y, groups, v, scales = planted_direction_data()
    noise = np.random.default_rng(5).normal(size=X.shape)
    result = concept_directions(np.stack([noise, X], axis=1), y, groups, halvings=10)

    assert result.mean.shape == result.probe.shape == (2, 4, X.shape[1])
    assert np.allclose(result.mean[1], class_mean_directions(X, y)[0])
    assert np.allclose(result.probe[1], probe_directions(X, y)[0], atol=1e-6)
    assert result.reliability.shape == result.reliability_shuffled.shape == (2, 10, 4)
    assert result.reliability[1, :, 0].mean() > 0.9  # the planted class: the same direction in both halves
    assert abs(result.reliability_shuffled[1].mean()) < 0.3  # shuffled words: no shared direction
    assert abs(result.reliability[0].mean()) < 0.3  # noise layer
    assert len(result.to_dict()["layers"]) == 2


# ----------------------------------------------------------------------------------------------------
# 4. The commands, on scans of a tiny random model
#
# The numbers of a random model mean nothing; these tests check what is reported and saved, for which
# layers, and how bad input is refused. Few shuffles and halvings keep each command to a second or two.

CATEGORY_WORDS = {
    "animals": ("cat", "dog", "horse", "tiger"),
    "foods": ("bread", "apple", "cheese", "soup"),
    "tools": ("hammer", "saw", "drill", "wrench"),
    "colours": ("red", "blue", "green", "yellow"),
}
FRAMES = ("I saw the {} yesterday.", "The {} was near the door.", "Nobody expected a {} here.")
N_STIMULI = 4 * 4 * len(FRAMES)
D_MODEL, D_MLP = 64, 128  # model_factory's tiny Llama
FAST = ["--k", "3", "--halvings", "6", "--permutations", "20"]


def stimulus_records(words=CATEGORY_WORDS) -> list[dict]:
    return [{"text": frame.format(word), "word": word, "category": category, "frame": f"f{n}"}
            for category, names in words.items() for word in names for n, frame in enumerate(FRAMES)]


def run_cli(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXSCAN_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "mlxscan", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def printed_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def stimuli_file(tmp_path_factory) -> Path:
    from mlxscan.stimuli import StimulusSet

    path = tmp_path_factory.mktemp("stimuli") / "small.jsonl"
    path.write_text(StimulusSet.from_records(stimulus_records()).to_jsonl())
    return path


@pytest.fixture(scope="module")
def scans(tiny_folder, stimuli_file, tmp_path_factory) -> dict[str, Path]:
    """Word-pooled (resid_post and mlp_act), token-level, and a scan whose category "foods" has one word."""
    import mlxscan
    from mlxscan.capture.scan import ScanSettings, run_scan
    from mlxscan.stimuli import StimulusSet, load_stimuli

    model = mlxscan.load(tiny_folder)
    root = tmp_path_factory.mktemp("scans")
    one_word = StimulusSet.from_records(stimulus_records({**CATEGORY_WORDS, "foods": ("bread",)}))
    for name, stimuli, settings in [
        ("word", load_stimuli(stimuli_file), ScanSettings(sites=("resid_post", "mlp_act"), pool="word")),
        ("tokens", load_stimuli(stimuli_file), ScanSettings(pool="all")),
        ("one_word", one_word, ScanSettings(pool="word")),
    ]:
        run_scan(model, stimuli, root / name, settings)
    return {name: root / name for name in ("word", "tokens", "one_word")}


def test_selectivity_json_and_out_of_mlp_neurons(scans, cache, tmp_path):
    from mlxscan import open_scan

    out = tmp_path / "out"
    record = printed_json(run_cli("selectivity", scans["word"], "--site", "mlp_act", *FAST, "--json", "--out", out,
                                  cache=cache))

    assert record["site"] == "mlp_act" and record["width"] == D_MLP and record["k"] == 3
    assert record["classes"] == sorted(CATEGORY_WORDS) and record["stimuli"]["n_words"] == 16
    assert [row["layer"] for row in record["layers"]] == [0, 1]
    for row in record["layers"]:
        assert row["best"]["class"] in CATEGORY_WORDS and 0 <= row["best"]["unit"] < D_MLP
        assert row["overlap"]["chance"] == pytest.approx(3 / row["overlap"]["n_units"])
        assert [item["class"] for item in row["classes"]] == sorted(CATEGORY_WORDS)
        assert all(len(item["top_units"]) == len(item["top_p"]) == 3 for item in row["classes"])
    assert "shuffled across words" in record["control"]
    assert json.loads((out / "selectivity.json").read_text()) == record

    arrays = np.load(out / "selectivity.npz")
    assert arrays["selectivity"].shape == (2, 4, D_MLP) and arrays["top_units"].shape == (2, 4, 3)
    assert arrays["overlaps"].shape == arrays["shuffled_overlaps"].shape == (2, 6, 4)
    assert arrays["null_best"].shape == (2, 20, 4)
    assert arrays["in_half_a"].shape == (6, N_STIMULI) and arrays["layers"].tolist() == [0, 1]
    scan = open_scan(scans["word"])
    expected, _ = unit_selectivity(scan.layer("mlp_act", 1), scan.labels)
    assert np.allclose(arrays["selectivity"][1], expected, atol=1e-4)
    assert (out / "selectivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_selectivity_scans_first_and_prints_a_table(tiny_folder, stimuli_file, cache):
    result = run_cli("selectivity", "--model", tiny_folder, "--stimuli", stimuli_file, "--layers", "1", *FAST,
                     cache=cache)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tiny_folder}  site resid_post ({D_MODEL} units)  4 categories, 16 words"), lines[0]
    assert lines[2].split()[:3] == ["layer", "best", "unit"]
    assert lines[3].split()[0] == "1" and len(lines[3].split()) >= 8, lines[3]
    assert lines[4].startswith("layers whose best unit beats the null")
    assert len(list((cache / "scans").iterdir())) == 1  # the scan it made is cached for the next command


def test_directions_saves_both_kinds_with_provenance(scans, cache, tmp_path):
    from mlxscan import open_scan

    out = tmp_path / "out"
    result = run_cli("directions", scans["word"], "--layers", "1", "--out", out, cache=cache)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "layer" and result.stdout.splitlines()[2].split()[0] == "1"
    record = json.loads((out / "directions.json").read_text())
    manifest = open_scan(scans["word"]).manifest
    assert record["scan"] == str(scans["word"]) and record["site"] == "resid_post" and record["layers"] == [1]
    assert record["model"]["sha256"] == manifest["model"]["sha256"]
    assert record["stimuli"]["sha256"] == manifest["stimuli"]["sha256"]
    assert record["classes"] == sorted(CATEGORY_WORDS) and set(record["method"]) == {"mean", "probe"}
    assert record["created"] and record["shape"] == [1, 4, D_MODEL]
    for name in ("directions_mean.npy", "directions_probe.npy"):
        directions = np.load(out / name)
        assert directions.shape == (1, 4, D_MODEL) and directions.dtype == np.float32, name
        assert np.allclose(np.linalg.norm(directions, axis=2), 1, atol=1e-5), name
    control = np.load(out / "directions_control.npz")
    assert control["reliability"].shape == control["reliability_shuffled"].shape == (1, 20, 4)


BAD_COMMANDS = {
    "token-level scan": (["selectivity", "{tokens}"], "token-level scan"),
    "unknown site": (["selectivity", "{word}", "--site", "resid"], "unknown site 'resid'"),
    "site not scanned": (["directions", "{word}", "--site", "attn_out"], "no site 'attn_out'"),
    "k above the width": (["selectivity", "{word}", "--k", "65"], "larger than the width of resid_post (64"),
    "one word in a category": (["selectivity", "{one_word}", *FAST], "at least 2 words per category"),
    "layer not recorded": (["directions", "{word}", "--layers", "5"], "were not recorded"),
    "scan and model": (["selectivity", "{word}", "--model", "{word}"], "not both"),
}


@pytest.mark.parametrize("case", BAD_COMMANDS, ids=list(BAD_COMMANDS))
def test_bad_input_is_one_error_line_exit_2_and_no_out(case, scans, cache, tmp_path):
    args, phrase = BAD_COMMANDS[case]
    result = run_cli(*[arg.format(**scans) for arg in args], "--out", tmp_path / "out", cache=cache)

    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and phrase in lines[0], lines
    assert result.returncode == 2 and result.stdout == ""
    assert not (tmp_path / "out").exists()
