"""`mlxscan probe`, `cka` and `rsa` as a user runs them, and the untrained twin they compare against.

Everything runs on a tiny random Llama (3 layers) from model_factory and a small stimulus set written
here (4 categories x 6 words x 4 frames). Commands run in real subprocesses (`python -m mlxscan`)
with a cache folder of this module's own, so the scans `probe` caches can be found and inspected.
--folds 3 and --permutations 3 keep a probe to seconds: the numbers themselves are not judged here,
only what is reported, where, and for which layers (the statistics are checked on planted data in
test_probes.py and test_geometry.py).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlxscan import open_scan  # noqa: E402
from mlxscan.capture.scan import ScanSettings, cached_scan, run_scan  # noqa: E402
from mlxscan.stimuli import StimulusSet, load_stimuli  # noqa: E402

N_LAYERS = 3  # model_factory's default depth
SUBSET_LAYERS = (1, 2)  # a scan of these layers only: positions 0, 1 along its layer axis
FAST = ["--folds", "3", "--permutations", "3"]
CATEGORY_WORDS = {
    "animals": ("cat", "dog", "horse", "tiger", "rabbit", "mouse"),
    "foods": ("bread", "apple", "cheese", "soup", "rice", "cake"),
    "tools": ("hammer", "saw", "drill", "wrench", "shovel", "chisel"),
    "colours": ("red", "blue", "green", "yellow", "purple", "orange"),
}
FRAMES = ("I saw the {} yesterday.", "The {} was near the door.", "She talked about the {} again.",
          "Nobody expected a {} here.")
N_STIMULI = len(CATEGORY_WORDS) * 6 * len(FRAMES)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINE_PLOT_SIZE, HEATMAP_SIZE = (800, 500), (600, 560)  # plots.py's defaults


# ----------------------------------------------------------------------------------------------------
# Helpers


def stimulus_records(frames=FRAMES) -> list[dict]:
    return [{"text": frame.format(word), "word": word, "category": category, "frame": f"f{n}"}
            for category, words in CATEGORY_WORDS.items() for word in words for n, frame in enumerate(frames)]


def write_stimuli(path: Path, records: list[dict]) -> Path:
    """The records as canonical JSONL (what a scan keeps as its stimuli.jsonl).

    A scan's stimuli, read back from its copy, are hashed from that copy, so the probe scans the twin
    under the copy's hash (see run_probe). Writing the file canonically makes the two hashes one, so
    the model's and the twin's cached scans differ only by the model: a twin that took the trained
    model's identity would collide with it here, not hide behind a stimulus hash.
    """
    path.write_text(StimulusSet.from_records(records).to_jsonl())
    return path


def run_cli(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXSCAN_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "mlxscan", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def printed_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, that IHDR comes first and IEND last."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path.name}: first chunk is {kind!r}"
    assert data[-12:] == struct.pack(">I", 0) + b"IEND" + struct.pack(">I", 0xAE426082), f"{path.name} is cut short"
    return struct.unpack(">II", data[16:24])


def assert_one_error_line(result: subprocess.CompletedProcess, phrase: str) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), f"stderr should be one Error: line, got {lines}"
    assert phrase in lines[0], lines[0]
    assert result.returncode == 2, f"exit status {result.returncode}, not 2"
    assert result.stdout == ""


def assert_diagonal_is_one(matrix) -> None:
    assert np.allclose(np.diag(np.asarray(matrix)), 1.0, atol=1e-6), np.diag(np.asarray(matrix))


def assert_matching_layers_are_one(matrix, layers_a, layers_b) -> None:
    """Across a scan and a subset of its own layers: the entry of each shared layer is 1."""
    matrix = np.asarray(matrix)
    for column, layer in enumerate(layers_b):
        assert matrix[layers_a.index(layer), column] == pytest.approx(1.0, abs=1e-6), (layer, matrix)


def parameters(model) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {name: np.array(value) for name, value in tree_flatten(model.module.parameters())}


# ----------------------------------------------------------------------------------------------------
# Models, stimuli and scans, made once for the module


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", num_hidden_layers=N_LAYERS)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return mlxscan.load(tiny_folder)


@pytest.fixture(scope="module")
def stimuli_file(tmp_path_factory) -> Path:
    return write_stimuli(tmp_path_factory.mktemp("stimuli") / "small.jsonl", stimulus_records())


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """MLXSCAN_CACHE of every command here: `probe`'s cached scans land in cache/scans."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def probe_run(tiny_folder, stimuli_file, cache, tmp_path_factory):
    """The first `probe --model --stimuli --json --out`: it scans the model and its twin into the cache."""
    out = tmp_path_factory.mktemp("probe") / "out"
    result = run_cli("probe", "--model", tiny_folder, "--stimuli", stimuli_file, *FAST, "--json", "--out", out,
                     cache=cache)
    return SimpleNamespace(record=printed_json(result), out=out)


@pytest.fixture(scope="module")
def scans(probe_run, tiny, tiny_folder, stimuli_file, cache, tmp_path_factory):
    """Scans of the small stimulus set: the model's and its twin's (cached by the probe), a subset of
    the model's layers (made by `mlxscan scan`, word-pooled like the probe's), and one of other stimuli."""
    root = tmp_path_factory.mktemp("scans")
    subset = root / "subset"
    result = run_cli("scan", "--model", tiny_folder, "--stimuli", stimuli_file, "--pool", "word",
                     "--layers", ",".join(map(str, SUBSET_LAYERS)), "--out", subset, cache=cache)
    assert result.returncode == 0, result.stderr
    other_stimuli = load_stimuli(write_stimuli(root / "other.jsonl", stimulus_records(FRAMES[:3])))
    other = run_scan(tiny, other_stimuli, root / "other", ScanSettings(pool="word")).folder
    return SimpleNamespace(trained=Path(probe_run.record["scans"]["trained"]),
                           twin=Path(probe_run.record["scans"]["twin"]), subset=subset, other=other)


# ----------------------------------------------------------------------------------------------------
# 1. probe --model --stimuli: the record, the saved files, the cache


def test_probe_reports_every_layer_against_the_twin(probe_run):
    record = probe_run.record

    assert record["target"] == "category" and record["site"] == "resid_post"
    assert record["classes"] == sorted(CATEGORY_WORDS) and record["chance"] == pytest.approx(1 / 4)
    assert (record["folds"], record["permutations"]) == (3, 3)
    assert [row["layer"] for row in record["layers"]] == list(range(N_LAYERS))
    for row in record["layers"]:
        for key in ("accuracy", "auc", "p", "twin_accuracy"):
            assert 0 <= row[key] <= 1, (row["layer"], key, row[key])
        assert len(row["ci"]) == 2 and 0 <= row["ci"][0] <= row["ci"][1] <= 1, row
    for span in (record["span_trained"], record["span_twin"]):  # a fraction of the three layers
        assert span * N_LAYERS == pytest.approx(round(span * N_LAYERS))
    depth = record["depth"]
    assert depth["layer"] in range(N_LAYERS)
    assert depth["rank"]["classes"] == record["classes"] and "mean_ratio" in depth["rank"]
    assert "mean_retention" in depth["retention"] and "gap" in depth["mlp_gap"]


def test_probe_out_holds_the_record_the_arrays_and_the_plot(probe_run, stimuli_file):
    out, record = probe_run.out, dict(probe_run.record)
    claims = record.pop("claims")  # judged from the saved files, so beside them in claims.json
    assert json.loads((out / "probe.json").read_text()) == record
    assert json.loads((out / "claims.json").read_text()) == claims
    decodable = [c for c in claims["claims"] if c["id"].startswith("probe.decodable.L")]
    assert len(decodable) == N_LAYERS and all(c["verdict"] in ("supported", "null", "failed-control")
                                              for c in decodable)

    arrays = np.load(out / "probe_arrays.npz")
    for model in ("trained", "twin"):
        probabilities = arrays[f"{model}_oof_probabilities"]
        assert probabilities.shape == (N_LAYERS, N_STIMULI, len(CATEGORY_WORDS)), model
        assert np.allclose(probabilities.sum(axis=2), 1.0), model
        assert arrays[f"{model}_null_accuracies"].shape == (N_LAYERS, 3), model
        # The reported accuracies are the saved probabilities' argmax against the saved labels.
        accuracies = (probabilities.argmax(axis=2) == arrays["labels"]).mean(axis=1)
        key = "accuracy" if model == "trained" else "twin_accuracy"
        assert accuracies.tolist() == pytest.approx([row[key] for row in record["layers"]]), model
    assert arrays["labels"].tolist() == load_stimuli(stimuli_file).labels.tolist()
    assert arrays["layers"].tolist() == list(range(N_LAYERS))

    assert png_size(out / "probe.png") == LINE_PLOT_SIZE


def test_a_second_probe_reuses_the_cached_scans_and_prints_a_table(probe_run, tiny_folder, stimuli_file, cache):
    before = snapshot(cache / "scans")
    assert len({path.split(os.sep)[0] for path in before}) == 2, "expected the model's scan and its twin's"

    result = run_cli("probe", "--model", tiny_folder, "--stimuli", stimuli_file, *FAST, cache=cache)

    assert result.returncode == 0, result.stderr
    assert snapshot(cache / "scans") == before  # no scan made, rewritten or touched
    lines = result.stdout.splitlines()
    header = lines[1].split()
    assert header[:3] == ["layer", "accuracy", "95%"] and "AUC" in header and "twin" in header, lines[1]
    layer_lines = lines[2:2 + N_LAYERS]
    for line, row in zip(layer_lines, probe_run.record["layers"]):
        assert line.split()[:2] == [str(row["layer"]), f"{row['accuracy']:.3f}"], line
    assert lines[2 + N_LAYERS].startswith("decodable layer-span") and "untrained twin" in lines[2 + N_LAYERS]
    assert lines[3 + N_LAYERS].startswith(f"at the best layer ({probe_run.record['depth']['layer']})")


# ----------------------------------------------------------------------------------------------------
# 2. probe SCAN_DIR of a subset of layers, without the twin


def test_probe_of_a_layer_subset_reports_model_layers(scans, probe_run, cache, tmp_path):
    result = run_cli("probe", scans.subset, "--no-twin", *FAST, "--json", "--out", tmp_path / "out", cache=cache)

    record = printed_json(result)
    assert [row["layer"] for row in record["layers"]] == list(SUBSET_LAYERS)  # model layers, not positions 0, 1
    assert record["span_twin"] is None and record["scans"]["twin"] is None
    assert all(row["twin_accuracy"] is None for row in record["layers"])
    assert record["depth"]["layer"] in SUBSET_LAYERS
    # Same activations, seed and folds as the full probe's layers 1 and 2: the same accuracies.
    full = {row["layer"]: row["accuracy"] for row in probe_run.record["layers"]}
    assert [row["accuracy"] for row in record["layers"]] == [full[layer] for layer in SUBSET_LAYERS]
    arrays = np.load(tmp_path / "out" / "probe_arrays.npz")
    assert arrays["layers"].tolist() == list(SUBSET_LAYERS)
    assert not any(name.startswith("twin_") for name in arrays.files), arrays.files


def test_probe_records_how_many_permutations_each_layer_ran(scans, cache, tmp_path):
    # The tiny model's layers all settle after 5 shuffles; tests/test_probes.py plants layers that stay open.
    records = {}
    for flags in ((), ("--no-early-stop",)):
        out = tmp_path / ("all" if flags else "early")
        result = run_cli("probe", scans.trained, "--no-twin", "--folds", "3", "--permutations", "7", *flags,
                         "--json", "--out", out, cache=cache)
        records[flags] = record = printed_json(result)
        null = np.load(out / "probe_arrays.npz")["trained_null_accuracies"]  # [layers, 7], NaN: not run
        for row, drawn in zip(record["layers"], null):
            assert row["permutations_run"] == int(np.isfinite(drawn).sum()), row
            assert np.isfinite(drawn[:row["permutations_run"]]).all()
            # Only a settled verdict stops a layer after the first 5 shuffles.
            assert row["permutations_run"] == (5 if row["settled_early"] else 7), row
    early, everywhere = records[()], records[("--no-early-stop",)]
    assert early["first_look"] == 5 and early["early_stop"] is True and everywhere["early_stop"] is False
    assert any(row["settled_early"] for row in early["layers"])
    assert all(row["permutations_run"] == 7 and row["settled_early"] is None for row in everywhere["layers"])
    # The real labels' fits are the same either way.
    assert [row["accuracy"] for row in early["layers"]] == [row["accuracy"] for row in everywhere["layers"]]


# ----------------------------------------------------------------------------------------------------
# 3. Bad input: exit 2, one line, no --out
#
# Each case returns (arguments, a phrase the message must contain); `work` is an empty folder.


def probe_scan_and_model(work, scans, tiny_folder):
    return ["probe", scans.trained, "--model", tiny_folder], "not both"


def probe_one_fold(work, scans, tiny_folder):
    return ["probe", scans.trained, "--folds", "1"], "--folds and --permutations must be at least 2"


def probe_folder_that_is_not_a_scan(work, scans, tiny_folder):
    (work / "notes").mkdir()
    (work / "notes" / "notes.txt").write_text("not a scan")
    return ["probe", work / "notes"], "is not a scan"


def probe_site_not_scanned(work, scans, tiny_folder):
    return ["probe", scans.trained, "--site", "mlp_act"], "no site 'mlp_act'"


def probe_incomplete_scan(work, scans, tiny_folder):
    """The model's scan, copied and marked as a run killed after 40 stimuli leaves it."""
    incomplete = Path(shutil.copytree(scans.trained, work / "incomplete"))
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "status": "running", "finished": None}))
    (incomplete / "progress.json").write_text(json.dumps({"done": 40}))
    return ["probe", incomplete], f"incomplete (40 of {N_STIMULI} stimuli)"


def cka_different_stimuli(work, scans, tiny_folder):
    return ["cka", scans.trained, scans.other], "different stimuli"


def rsa_different_stimuli(work, scans, tiny_folder):
    return ["rsa", scans.trained, scans.other], "different stimuli"


def cka_site_not_scanned(work, scans, tiny_folder):
    return ["cka", scans.trained, scans.twin, "--site", "mlp_act"], "has no site 'mlp_act'"


def probe_token_level_scan(work, scans, tiny_folder):
    token_level = work / "tokens"
    run_cli("scan", "--model", tiny_folder, "--stimuli", scans.trained / "stimuli.jsonl", "--pool", "all",
            "--layers", "0", "--out", token_level, cache=work)
    return ["probe", token_level, "--no-twin"], "token-level scan"


def cka_token_level_scan(work, scans, tiny_folder):
    token_level = work / "tokens"
    run_cli("scan", "--model", tiny_folder, "--stimuli", scans.trained / "stimuli.jsonl", "--pool", "all",
            "--layers", "0", "--out", token_level, cache=work)
    return ["cka", token_level], "token-level scan"


def probe_stimuli_changed_after_the_scan(work, scans, tiny_folder):
    changed = Path(shutil.copytree(scans.trained, work / "changed"))
    lines = (changed / "stimuli.jsonl").read_text().splitlines(keepends=True)
    (changed / "stimuli.jsonl").write_text("".join(lines[1:] + lines[:1]))  # same stimuli, other order
    return ["probe", changed, "--no-twin"], "was changed after the scan"


def probe_twin_of_a_model_changed_since(work, scans, tiny_folder):
    """The twin is built from the scan's model, so that model must still be the one scanned."""
    moved = Path(shutil.copytree(tiny_folder, work / "model"))
    scan = Path(shutil.copytree(scans.trained, work / "scan"))
    manifest = json.loads((scan / "manifest.json").read_text())
    manifest["model"]["path"] = str(moved)
    (scan / "manifest.json").write_text(json.dumps(manifest))
    from safetensors.numpy import load_file, save_file

    weights = load_file(moved / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1.0}, moved / "model.safetensors", metadata={"format": "pt"})
    return ["probe", scan], "has changed since the scan"


BAD_INPUTS = [probe_token_level_scan, cka_token_level_scan, probe_stimuli_changed_after_the_scan,
              probe_twin_of_a_model_changed_since, probe_scan_and_model, probe_one_fold, probe_folder_that_is_not_a_scan, probe_site_not_scanned,
              probe_incomplete_scan, cka_different_stimuli, rsa_different_stimuli, cka_site_not_scanned]


@pytest.mark.parametrize("prepare", BAD_INPUTS, ids=lambda prepare: prepare.__name__)
def test_bad_input_is_one_error_line_and_exit_2(prepare, scans, tiny_folder, cache, tmp_path):
    args, phrase = prepare(tmp_path, scans, tiny_folder)

    result = run_cli(*args, "--out", tmp_path / "out", cache=cache)

    assert_one_error_line(result, phrase)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# 4. cka


def test_cka_within_one_scan(scans, cache):
    record = printed_json(run_cli("cka", scans.trained, "--json", cache=cache))

    assert record["scan_b"] is None and record["layers_a"] == record["layers_b"] == list(range(N_LAYERS))
    assert record["n_stimuli"] == N_STIMULI
    for key in ("cka", "cka_debiased"):
        matrix = np.asarray(record[key])
        assert matrix.shape == (N_LAYERS, N_LAYERS), key
        assert np.allclose(matrix, matrix.T), key
    assert_diagonal_is_one(record["cka"])


def test_cka_of_the_model_against_its_twin_saves_json_arrays_and_heatmap(scans, cache, tmp_path):
    out = tmp_path / "out"
    record = printed_json(run_cli("cka", scans.trained, scans.twin, "--json", "--out", out, cache=cache))

    assert record["scan_b"] == str(scans.twin)
    assert np.asarray(record["cka"]).shape == np.asarray(record["cka_debiased"]).shape == (N_LAYERS, N_LAYERS)
    assert json.loads((out / "cka.json").read_text()) == record
    arrays = np.load(out / "cka.npz")
    for key in ("cka", "cka_debiased"):
        assert np.allclose(arrays[key], record[key], equal_nan=True), key
    assert png_size(out / "cka.png") == HEATMAP_SIZE


def test_cka_against_a_subset_of_layers_lines_up_model_layers(scans, cache):
    record = printed_json(run_cli("cka", scans.trained, scans.subset, "--json", cache=cache))

    assert record["layers_b"] == list(SUBSET_LAYERS)
    for key in ("cka", "cka_debiased"):
        assert np.asarray(record[key]).shape == (N_LAYERS, len(SUBSET_LAYERS)), key
    assert_matching_layers_are_one(record["cka"], record["layers_a"], record["layers_b"])


# ----------------------------------------------------------------------------------------------------
# 5. rsa


def test_rsa_within_one_scan_over_category_means(scans, cache):
    record = printed_json(run_cli("rsa", scans.trained, "--json", cache=cache))

    assert record["over"] == "category means" and record["conditions"] == sorted(CATEGORY_WORDS)
    matrix = np.asarray(record["spearman"])
    assert matrix.shape == (N_LAYERS, N_LAYERS) and np.allclose(matrix, matrix.T)
    assert_diagonal_is_one(matrix)


def test_rsa_per_stimulus_against_a_subset_of_layers_saves_outputs(scans, cache, tmp_path):
    out = tmp_path / "out"
    record = printed_json(run_cli("rsa", scans.trained, scans.subset, "--per-stimulus", "--json", "--out", out,
                                  cache=cache))

    assert record["over"] == "stimuli" and record["conditions"] is None
    assert np.asarray(record["spearman"]).shape == (N_LAYERS, len(SUBSET_LAYERS))
    assert_matching_layers_are_one(record["spearman"], record["layers_a"], record["layers_b"])
    assert json.loads((out / "rsa.json").read_text()) == record
    arrays = np.load(out / "rsa.npz")
    assert np.allclose(arrays["spearman"], record["spearman"])
    assert arrays["rdms_a"].shape == (N_LAYERS, N_STIMULI, N_STIMULI)
    assert png_size(out / "rsa.png") == HEATMAP_SIZE


# ----------------------------------------------------------------------------------------------------
# 6. The untrained twin


def test_twin_is_reproducible_per_seed_and_has_its_own_identity(tiny):
    from mlxscan.models.twin import make_twin

    first, again, other_seed = make_twin(tiny, seed=0), make_twin(tiny, seed=0), make_twin(tiny, seed=1)
    weights, trained = parameters(first), parameters(tiny)

    assert {name: value.shape for name, value in weights.items()} == {name: v.shape for name, v in trained.items()}
    assert first.dtype == tiny.dtype and first.tokenizer is tiny.tokenizer
    assert all(np.array_equal(weights[name], value) for name, value in parameters(again).items())
    assert any(not np.array_equal(weights[name], value) for name, value in parameters(other_seed).items())

    assert first.weights_sha256() == first.weights_sha256() == again.weights_sha256()
    assert len({tiny.weights_sha256(), first.weights_sha256(), other_seed.weights_sha256()}) == 3


def tiny_model_with_initializer_range(family: str, folder: Path, initializer_range: float | None):
    """A 2-layer tiny model whose config.json states `initializer_range`, or (None) does not mention it."""
    from model_factory import make_tiny_model

    if initializer_range is not None:
        return mlxscan.load(make_tiny_model(family, folder, num_hidden_layers=2, initializer_range=initializer_range))
    make_tiny_model(family, folder, num_hidden_layers=2)
    config = json.loads((folder / "config.json").read_text())
    del config["initializer_range"]
    (folder / "config.json").write_text(json.dumps(config))
    return mlxscan.load(folder)


@pytest.mark.parametrize("family, initializer_range, norm_identity, std", [
    ("llama", None, 1.0, 0.02),  # RMSNorm applies w: identity 1; a config without initializer_range: 0.02
    ("gemma2", 0.05, 0.0, 0.05),  # Gemma applies (1 + w): identity 0
    ("qwen2", 0.03, 1.0, 0.03),  # the family with biases (q, k, v)
])
def test_twin_initialises_like_the_architecture(family, initializer_range, norm_identity, std, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mlxscan.models.twin import make_twin

    model = tiny_model_with_initializer_range(family, tmp_path / family, initializer_range)
    assert model.config.get("initializer_range") == initializer_range
    weights = parameters(make_twin(model, seed=0))

    norms = [name for name in weights if "norm" in name]
    biases = [name for name in weights if name.endswith(".bias")]
    matrices = [name for name in weights if name not in norms and name not in biases]
    assert len(norms) == (4 if family == "gemma2" else 2) * model.n_layers + 1, norms  # + the final norm
    assert len(biases) == (3 * model.n_layers if family == "qwen2" else 0), biases
    for name in norms:
        assert np.all(weights[name] == norm_identity), name
    for name in biases:
        assert np.all(weights[name] == 0), name
    for name in matrices:  # embedding and every linear layer: N(0, std)
        values = weights[name]
        assert values.ndim == 2 and values.size >= 2048, name
        assert abs(values.std() / std - 1) < 0.1, (name, values.std())
        assert abs(values.mean()) < 0.1 * std, (name, values.mean())


def test_probe_scans_the_seed_0_twin_into_a_cache_entry_of_its_own(probe_run, scans, tiny, cache, monkeypatch):
    from mlxscan.models.twin import make_twin

    twin = make_twin(tiny, seed=0)
    trained_scan, twin_scan = open_scan(scans.trained), open_scan(scans.twin)

    assert scans.trained != scans.twin and {scans.trained.parent, scans.twin.parent} == {cache / "scans"}
    assert trained_scan.manifest["model"]["sha256"] == tiny.weights_sha256() != twin.weights_sha256()
    assert twin_scan.manifest["model"]["sha256"] == twin.weights_sha256()
    assert trained_scan.manifest["stimuli"]["sha256"] == twin_scan.manifest["stimuli"]["sha256"]
    assert twin_scan.manifest["model"]["ref"] == f"twin({probe_run.record['model']}, seed=0)"
    assert not np.allclose(trained_scan["resid_post"], twin_scan["resid_post"])

    # The call run_probe makes for the twin (the trained scan's stimuli, layers and pool) finds the same
    # entry, and reads it without rewriting it.
    monkeypatch.setenv("MLXSCAN_CACHE", str(cache))
    before = snapshot(scans.twin)
    settings = ScanSettings(layers=tuple(trained_scan.layers), pool=trained_scan.pool)
    again = cached_scan(twin, trained_scan.stimuli, settings)
    assert again.folder == scans.twin and snapshot(scans.twin) == before
