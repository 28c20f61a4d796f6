"""`mlxscan study run` and `study verify` on a tiny planted model: claims, the gate, resuming, tampering.

The model is test_causal's planted tiny Llama (each category is one direction added to its words'
embeddings), so "the category is decodable beyond the untrained twin" is planted true. The study runs
three cheap steps (probe, selectivity, invariance) in a real subprocess, like a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlxscan  # noqa: F401  (before mlx: the fast BLAS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlxscan.claims import claims_from_json  # noqa: E402
from mlxscan.errors import MlxscanError  # noqa: E402
from mlxscan.stimuli import StimulusSet  # noqa: E402
from mlxscan.study.spec import parse_study  # noqa: E402

STUDY = """\
name = "tiny"
stimuli = "planted.jsonl"
model = "planted"

[gate]
alpha = 0.05

[steps.probe]
command = "probe"
options = {folds = 2, permutations = 5}

[steps.selectivity]
command = "selectivity"
options = {k = 5, halvings = 30, permutations = 10}

[steps.invariance]
command = "invariance"
options = {per-category = 0, frames = 0, factors = "0.5,1,2"}
"""
COMMANDS = {"probe", "selectivity", "invariance", "scan", "cka"}


def run_cli(*args, cache: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLXSCAN_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "mlxscan", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=cwd)


def assert_one_error_line(result: subprocess.CompletedProcess, phrase: str) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    assert phrase in lines[0], lines[0]
    assert result.returncode == 2


# ----------------------------------------------------------------------------------------------------
# The study file (no model)


def write_study(folder: Path, text: str = STUDY) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "planted.jsonl").write_text('{"text": "a b", "word": "b", "category": "x"}\n')
    (folder / "study.toml").write_text(text)
    return folder / "study.toml"


def test_study_file_is_parsed_in_order(tmp_path):
    spec = parse_study(write_study(tmp_path), COMMANDS)
    assert [step.name for step in spec.steps] == ["probe", "selectivity", "invariance"]
    assert spec.steps[0].options == {"folds": 2, "permutations": 5}
    assert spec.stimuli == (tmp_path / "planted.jsonl").resolve() and spec.gate.alpha == 0.05


@pytest.mark.parametrize("text, phrase", [
    (STUDY.replace("[gate]", "[gate]\nalhpa = 0.1"), "unknown gate setting(s) alhpa"),
    (STUDY.replace('name = "tiny"', 'name = "tiny"\nseeds = 3'), "unknown key(s) seeds"),
    (STUDY.replace('command = "probe"', 'command = "probe"\noption = {}'), "[steps.probe]: unknown key(s) option"),
    (STUDY.replace('command = "probe"', 'command = "prob"'), "command 'prob' is not a study command"),
    (STUDY + '[steps.cka]\ncommand = "cka"\ninput = "scan"\n', "input 'scan' is not an earlier step"),
    (STUDY.replace("folds = 2", "out = 2"), "option 'out' is set by the study itself"),
    (STUDY.replace("planted.jsonl", "missing.jsonl"), "stimuli 'missing.jsonl' not found"),
    ("name = [", "is not valid TOML"),
])
def test_bad_study_files_are_refused(tmp_path, text, phrase):
    with pytest.raises(MlxscanError) as error:
        parse_study(write_study(tmp_path, text), COMMANDS)
    assert phrase in str(error.value)


# ----------------------------------------------------------------------------------------------------
# A real study on the planted model


@pytest.fixture(scope="module")
def planted_study(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from test_causal import N_LAYERS, plant, stimulus_records

    root = tmp_path_factory.mktemp("study")
    stimuli = StimulusSet.from_records(stimulus_records())
    (root / "planted.jsonl").write_text(stimuli.to_jsonl())
    build = (f"from model_factory import make_tiny_model; make_tiny_model('llama', {str(root / 'planted')!r}, "
             f"num_hidden_layers={N_LAYERS}, rms_norm_eps=1e-10)")
    subprocess.run([sys.executable, "-c", build], cwd=Path(__file__).parent, check=True, capture_output=True)
    os.environ.setdefault("MLXSCAN_CACHE", str(root / "cache"))
    from mlxscan.stimuli import load_stimuli

    plant(root / "planted", load_stimuli(root / "planted.jsonl"))
    (root / "study.toml").write_text(STUDY)
    return root


@pytest.fixture(scope="module")
def study_run(planted_study):
    out = planted_study / "out"
    result = run_cli("study", "run", planted_study / "study.toml", "--out", out, cache=planted_study / "cache")
    assert result.returncode == 0, result.stderr + result.stdout
    return out, result


def test_planted_category_is_supported_and_every_claim_is_listed(study_run):
    out, result = study_run
    claims = {claim.id: claim for claim in claims_from_json(out / "claims.json")}
    # Planted true: one direction per category, shared by its words and moved by scaling it.
    for name in ("invariance.concept_moves", *(f"selectivity.units_replicate.L{layer}" for layer in range(4))):
        assert claims[name].verdict == "supported", claims[name].reason
    # Planted failed control: a category's words share letters no other word uses, so even the random
    # twin decodes it; decodable beyond chance, not beyond the twin.
    probes = [claim for name, claim in claims.items() if name.startswith("probe.decodable.")]
    assert len(probes) == 4  # one per layer
    assert all(claim.verdict == "failed-control" for claim in probes), [claim.reason for claim in probes]
    assert all(claim.value > 0.9 and claim.control_value > 0.9 for claim in probes)
    assert {claim.verdict for claim in claims.values()} <= {"supported", "null", "failed-control"}
    record = json.loads((out / "claims.json").read_text())
    assert record["n_tests"] == len(claims) and record["thresholds"]["correction"] == "holm"
    for name in claims:  # nulls are printed in the same table as the rest
        assert name in result.stdout


def test_study_json_records_provenance_and_commands(study_run, planted_study):
    out, _ = study_run
    record = json.loads((out / "study.json").read_text())
    assert record["toml"] == STUDY
    assert {"mlxscan", "mlx", "mlx_lm", "numpy"} <= set(record["versions"])
    assert len(record["model"]["sha256"]) == 64 and record["stimuli"]["path"] == "inputs/planted.jsonl"
    assert set(record["machine"]) >= {"platform", "cpu", "cores", "memory_gb"}
    steps = {step["name"]: step for step in record["steps"]}
    assert all(step["status"] == "done" for step in steps.values())
    assert steps["probe"]["command"].startswith("mlxscan probe --folds 2 --permutations 5 --model ")
    assert "--stimuli inputs/planted.jsonl --out steps/probe" in steps["probe"]["command"]
    assert (out / "steps" / "probe" / "probe.txt").read_text().startswith(record["model"]["ref"])
    assert not list((out / "steps").glob(".*.partial"))


def test_a_killed_study_resumes_where_it_stopped(study_run, planted_study):
    out, _ = study_run
    record = json.loads((out / "study.json").read_text())
    record["steps"][2]["status"] = "running"  # as if killed during the last step
    (out / "study.json").write_text(json.dumps(record))
    before = {path: path.stat().st_mtime_ns for path in (out / "steps" / "probe").iterdir()}
    claims_before = (out / "claims.json").read_text()
    result = run_cli("study", "run", planted_study / "study.toml", "--out", out, cache=planted_study / "cache")
    assert result.returncode == 0, result.stderr
    assert {path: path.stat().st_mtime_ns for path in (out / "steps" / "probe").iterdir()} == before
    steps = json.loads((out / "study.json").read_text())["steps"]
    assert [step["status"] for step in steps] == ["done"] * 3 and steps[2]["finished"] != record["steps"][2]["finished"]
    assert json.loads((out / "claims.json").read_text()) == json.loads(claims_before)  # seeded: the same claims


def test_verify_passes_then_catches_tampering(study_run, planted_study, tmp_path):
    out, _ = study_run
    result = run_cli("study", "verify", out, cache=planted_study / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: ")
    tampered = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(out), str(tampered)], check=True)
    arrays_path = tampered / "steps" / "probe" / "probe_arrays.npz"
    with np.load(arrays_path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["twin_oof_probabilities"][1] = arrays["trained_oof_probabilities"][1]  # the twin now decodes layer 1
    np.savez(arrays_path, **arrays)
    result = run_cli("study", "verify", tampered, "--json", cache=planted_study / "cache")
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    assert any(p.startswith("steps/probe/probe_arrays.npz: sha256") for p in problems), problems
    assert any(p.startswith("probe.decodable.L1: control_value recorded") for p in problems), problems
    assert not any(p.startswith("probe.decodable.L2") for p in problems), problems


def test_bad_input_is_one_line_and_writes_nothing(study_run, planted_study, tmp_path):
    out, _ = study_run
    other = planted_study / "other.toml"
    other.write_text(STUDY.replace("permutations = 5}", "permutations = 6}"))
    assert_one_error_line(run_cli("study", "run", other, "--out", out, cache=planted_study / "cache"),
                          "holds a study made from another study file")
    unknown = planted_study / "unknown.toml"
    unknown.write_text(STUDY.replace("folds = 2", "fold = 2"))
    fresh = tmp_path / "fresh"
    assert_one_error_line(run_cli("study", "run", unknown, "--out", fresh, cache=planted_study / "cache"),
                          "`mlxscan probe` has no option --fold")
    assert not fresh.exists()
    assert_one_error_line(run_cli("study", "verify", tmp_path, cache=planted_study / "cache"), "has no study.json")
    assert_one_error_line(run_cli("study", "run", tmp_path / "none.toml", cache=planted_study / "cache"),
                          "not found")


# ----------------------------------------------------------------------------------------------------
# Adapters on synthetic step folders with planted answers (no model)


def synthetic_step(tmp_path: Path, name: str, files: dict, options: dict | None = None, settings=None):
    from mlxscan.outputs import write_outputs
    from mlxscan.study.adapters import StepContext
    from test_causal import stimulus_records

    (tmp_path / "inputs").mkdir(exist_ok=True)
    stimuli = tmp_path / "inputs" / "planted.jsonl"
    stimuli.write_text(StimulusSet.from_records(stimulus_records()).to_jsonl())
    write_outputs(tmp_path / "steps" / name, files)
    return StepContext(tmp_path, name, name, options or {}, settings or {}, stimuli)


def test_ablation_claims_find_the_planted_direction(tmp_path):
    """The direction arm scrambles its category's readout; top units and random arms leave it."""
    from mlxscan.study.adapters_causal import ablate_claims
    from test_causal import stimulus_records

    stimuli = StimulusSet.from_records(stimulus_records())
    y, n_classes = stimuli.labels, len(stimuli.categories)
    rng = np.random.default_rng(0)
    clean = np.eye(n_classes)[y] + 1.2 * rng.random((len(y), n_classes))  # AUC below 1: random arms vary

    def near_clean(runs):
        return np.stack([clean + 0.1 * rng.random(clean.shape) for _ in range(runs)])

    direction = near_clean(n_classes)
    for c in range(n_classes):
        direction[c][:, c] = rng.random(len(y))  # category c's own score is now noise
    ctx = synthetic_step(tmp_path, "ablate", {
        "ablation.json": {"k": 5, "layer": 2, "readout_layer": 3},
        "ablation.npz": {"labels": y, "groups": stimuli.groups, "clean_probabilities": clean,
                         "direction_probabilities": direction, "top_units_probabilities": near_clean(n_classes),
                         "random_units_probabilities": near_clean(6),
                         "random_direction_probabilities": near_clean(6), "testable": np.ones(n_classes, bool)}})
    from mlxscan.claims import judge

    verdicts = {claim.id: claim for claim in judge(ablate_claims(ctx))}
    assert verdicts["ablate.direction_vs_random"].verdict == "supported"
    assert verdicts["ablate.direction_vs_units"].verdict == "supported"
    assert verdicts["ablate.units_vs_random"].verdict == "null"
    assert verdicts["ablate.direction_vs_random"].value > 0.3


def test_additivity_is_an_equivalence_claim(tmp_path):
    """Spread equal to single (ratio ~1) is `additive`; spread at half of single (ratio 0.5) is not."""
    from mlxscan.claims import judge
    from mlxscan.study.adapters_causal import steer_claims
    from test_causal import stimulus_records

    stimuli = StimulusSet.from_records(stimulus_records())
    rng = np.random.default_rng(1)
    single = 1.0 + 0.2 * rng.random(len(stimuli))
    arrays = {"labels": stimuli.labels, "alphas": np.array([0.5]), "shift": single[None] * 0.5,
              "targets": (stimuli.labels + 1) % len(stimuli.categories),
              "testable": np.ones(len(stimuli.categories), bool),
              "random_shift": 0.05 * rng.standard_normal((8, len(single))),
              "additivity_spread_2": single * (1 + 0.01 * rng.standard_normal(len(single))),
              "additivity_single_2": single, "additivity_spread_3": 0.5 * single, "additivity_single_3": single}
    record = {"additivity": [{"n_layers": n} for n in (1, 2, 3)], "steer_alpha": 0.5, "layer": 1,
              "readout_layer": 3}
    ctx = synthetic_step(tmp_path, "steer", {"steering.json": record, "steering.npz": arrays},
                         options={"per-category": 0, "frames": 0})
    claims = {claim.id: claim for claim in judge(steer_claims(ctx))}
    assert claims["steer.additive.N2"].verdict == "supported", claims["steer.additive.N2"].reason
    assert claims["steer.additive.N3"].verdict == "null" and claims["steer.additive.N3"].value == pytest.approx(0.5)
    assert claims["steer.shifts"].verdict == "supported"
    other = synthetic_step(tmp_path, "steer", {"steering.json": record, "steering.npz": arrays},
                           options={"per-category": 2, "frames": 0})
    with pytest.raises(MlxscanError, match="do not match the study's subsample"):
        steer_claims(other)
    # A target category whose clean readout never beat chance: nothing to steer toward, so no test.
    blind = synthetic_step(tmp_path, "steer", {"steering.json": record, "steering.npz": {
        **arrays, "testable": np.zeros(len(stimuli.categories), bool)}}, options={"per-category": 0, "frames": 0})
    shifts = {claim.id: claim for claim in judge(steer_claims(blind))}["steer.shifts"]
    assert shifts.verdict == "untestable" and "beats chance" in shifts.reason


# ----------------------------------------------------------------------------------------------------
# The negative control: a study on categories that mean nothing supports no label-dependent claim

NULL_STUDY = """\
name = "tiny-null"
stimuli = "meaningless.jsonl"
model = "planted"

[steps.probe]
command = "probe"
options = {folds = 2, permutations = 5}

[steps.selectivity]
command = "selectivity"
options = {k = 5, halvings = 10, permutations = 10}

[steps.ablate]
command = "ablate"
options = {per-category = 0, frames = 0, k = 4, draws = 4, direction-draws = 4}

[steps.steer]
command = "steer"
options = {per-category = 0, frames = 0, alphas = "0.5,1", steer-alpha = 1, random-draws = 4}

[steps.invariance]
command = "invariance"
options = {per-category = 0, frames = 0, factors = "0.5,1,2"}
"""


def test_the_negative_control_study_supports_no_label_dependent_claim(planted_study):
    from mlxscan.stimuli import load_stimuli, meaningless_labels

    root = planted_study
    meaningless = meaningless_labels(load_stimuli(root / "planted.jsonl"), seed=0)
    (root / "meaningless.jsonl").write_text(meaningless.to_jsonl())
    (root / "null.toml").write_text(NULL_STUDY)
    out = root / "null_out"
    result = run_cli("study", "run", root / "null.toml", "--out", out, cache=root / "cache")
    assert result.returncode == 0, result.stderr + result.stdout
    claims = claims_from_json(out / "claims.json")
    dependent = [claim for claim in claims if not claim.label_free]
    assert dependent and not [claim.id for claim in dependent if claim.verdict == "supported"], \
        [(claim.id, claim.reason) for claim in dependent if claim.verdict == "supported"]
    assert "per claim family" in result.stdout and "label-free" in result.stdout


def test_meaningless_labels_balance_every_real_category():
    from test_causal import CATEGORY_WORDS, stimulus_records

    from mlxscan.stimuli import meaningless_labels

    real = StimulusSet.from_records(stimulus_records())
    regrouped = meaningless_labels(real, seed=1)
    assert [s.text for s in regrouped] == [s.text for s in real]
    pairs = {}
    for a, b in zip(real, regrouped):
        pairs.setdefault(b.category, {}).setdefault(a.category, set()).add(a.word)
    assert len(pairs) == len(CATEGORY_WORDS)  # 4 words a category: 4 groups of one word of each
    assert all(len(by_real) == len(CATEGORY_WORDS) and all(len(words) == 1 for words in by_real.values())
               for by_real in pairs.values())
    unequal = StimulusSet.from_records(stimulus_records()[:-3])  # one category one word short
    with pytest.raises(MlxscanError, match="same number of words of each category"):
        meaningless_labels(unequal)
