"""The wiring-cost experiment: penalty, training, checkpoints, statistics and `mlxscan wiring`.

1. NumPy only, planted answers: local weight mass, Q of planted modular weight and activity graphs
   against unstructured ones, the paired t-test against scipy, the exact sign-flip p, the sweet spot,
   and claims through the gate (a consistent ΔQ is supported, a noisy one is not).
2. MLX on a tiny model trained on stimuli/corpus.txt: the penalty's gradient against finite
   differences and against its closed form, weight mass turning local under a large λ, bit-for-bit
   reproducible training from a seed, and the checkpoint loading through mlxscan.load with the same logits.
3. `mlxscan wiring --quick` in process: --json, --out files (claims citing the arrays' sha256), exit 2.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.analysis.wiring import (  # noqa: E402
    functional_graph_q, local_mass_fraction, paired_effect, sweet_spot, weight_graph_q, weight_mass, wiring_claims,
)
from mlxscan.claims import claims_from_json, judge, sha256_of  # noqa: E402
from mlxscan.errors import MlxscanError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------
# 1. Planted answers, NumPy only


def random_weights(n_layers=2, d_mlp=40, d_model=20, seed=0):
    rng = np.random.default_rng(seed)
    return [{"gate": rng.normal(size=(d_mlp, d_model)), "up": rng.normal(size=(d_mlp, d_model)),
             "down": rng.normal(size=(d_model, d_mlp))} for _ in range(n_layers)]


def line_distances(n_layers=2, d_mlp=40, d_model=20):
    neurons, dims = (np.arange(d_mlp) + 0.5) / d_mlp, (np.arange(d_model) + 0.5) / d_model
    return np.broadcast_to(np.abs(neurons[:, None] - dims[None, :]), (n_layers, d_mlp, d_model)).copy()


def test_local_mass_is_the_local_share_of_pairs_when_place_does_not_matter_and_one_when_it_does():
    distances, weights = line_distances(), random_weights()
    uniform = [{key: np.ones_like(value) for key, value in block.items()} for block in weights]
    mass, pairs = local_mass_fraction(uniform, distances)
    assert mass == pytest.approx(pairs) and 0.08 < pairs < 0.2
    assert weight_mass(uniform) == pytest.approx(2 * 3 * 40 * 20)  # two layers of three 40 x 20 matrices of ones
    near = distances <= np.quantile(distances[0], 0.1)
    local_only = [{"gate": w["gate"] * near[i], "up": w["up"] * near[i], "down": (w["down"].T * near[i]).T}
                  for i, w in enumerate(weights)]
    assert local_mass_fraction(local_only, distances)[0] == pytest.approx(1.0)
    with pytest.raises(MlxscanError, match="do not match"):
        local_mass_fraction(weights, distances[:, :10])


def test_weight_graph_q_is_high_for_planted_modules_and_low_for_random_weights():
    blocks, d_mlp, d_model = 4, 40, 20
    weights = random_weights(d_mlp=d_mlp, d_model=d_model)
    module = (np.arange(d_mlp)[:, None] * blocks // d_mlp) == (np.arange(d_model)[None, :] * blocks // d_model)
    planted = [{"gate": 0.1 * w["gate"] + 5 * module, "up": 0.1 * w["up"], "down": 0.1 * w["down"]} for w in weights]
    modular, unstructured = weight_graph_q(planted, density=0.15), weight_graph_q(weights, density=0.15)
    assert modular.q > 0.6 and modular.n_communities >= blocks, modular
    assert unstructured.q < modular.q - 0.25 and modular.q > modular.q_random + 0.25
    assert modular.n_nodes == d_model + 2 * d_mlp


def test_functional_graph_q_finds_planted_groups_of_correlated_units():
    rng = np.random.default_rng(1)
    sources = rng.normal(size=(600, 5))  # five latent drives, one per group of 20 units
    X = np.repeat(sources, 20, axis=1) + 0.8 * rng.normal(size=(600, 100))
    grouped, noise = functional_graph_q(X, density=0.1), functional_graph_q(rng.normal(size=(600, 100)), density=0.1)
    assert grouped.q > 0.6 and grouped.q > grouped.q_random + 0.3
    assert noise.q < grouped.q - 0.3
    X[:, 3] = 1.0  # a constant unit is left out, not an error
    assert functional_graph_q(X, density=0.1).n_nodes == 99


def test_paired_effect_matches_scipy_and_the_exact_sign_flip():
    from scipy import stats

    rng = np.random.default_rng(2)
    control = rng.normal(size=6)
    treatment = control + 0.3 + 0.2 * rng.normal(size=6)
    effect = paired_effect(treatment, control)
    reference = stats.ttest_rel(treatment, control, alternative="greater")
    interval = stats.t.interval(0.95, 5, loc=np.mean(treatment - control), scale=stats.sem(treatment - control))
    assert effect.p_t == pytest.approx(reference.pvalue, rel=1e-9)
    assert effect.ci == pytest.approx(interval, rel=1e-9)
    # Four positive differences: only the observed sign pattern (of 16) reaches the observed mean.
    assert paired_effect([1.0, 1.2, 1.1, 1.3], [0, 0, 0, 0]).p_sign_flip == pytest.approx(1 / 16)
    assert paired_effect([1.0, -1.2, 1.1, -1.3], [0, 0, 0, 0]).p_sign_flip > 0.5
    flat = paired_effect([0.5, 0.5], [0.2, 0.2])
    assert flat.p_t == 0.0 and flat.ci == pytest.approx((0.3, 0.3))
    with pytest.raises(MlxscanError, match="at least 2 seeds"):
        paired_effect([1.0], [0.0])


def test_sweet_spot_tells_an_interior_peak_from_a_rising_curve():
    assert sweet_spot([1e-4, 1e-3, 1e-2], [0.05, 0.2, 0.01]) == {
        "lambda": 1e-3, "mean_effect": 0.2, "positive": True, "interior": True, "largest_lambda_effect": 0.01}
    assert not sweet_spot([1e-4, 1e-3, 1e-2], [0.05, 0.1, 0.2])["interior"]
    assert not sweet_spot([1e-4, 1e-3], [-0.05, -0.2])["positive"]  # a least-bad λ is no sweet spot


def test_claims_through_the_gate_support_a_consistent_rise_and_not_a_noisy_one():
    rng = np.random.default_rng(3)
    base = 0.4 + 0.02 * rng.normal(size=4)
    q = {"weight": np.stack([base, base + 0.2 + 0.01 * rng.normal(size=4)]),  # every seed rises by ~0.2
         "functional": np.stack([base, base + 0.1 * rng.normal(size=4)])}  # seeds scatter around no change
    chance = {kind: np.full_like(values, 0.1) for kind, values in q.items()}
    judged = {c.id: c for c in judge(wiring_claims([0.0, 1e-3], q, chance, [{"path": "wiring.npz", "sha256": "0"}]))}
    assert set(judged) == {"wiring.weight_q.lambda=0.001", "wiring.functional_q.lambda=0.001"}
    rise, noise = judged["wiring.weight_q.lambda=0.001"], judged["wiring.functional_q.lambda=0.001"]
    assert rise.verdict == "supported" and rise.correction == "holm over 2 tests" and rise.ci[0] > 0
    assert noise.verdict == "failed-control"  # beats the random rewiring's Q, not λ = 0
    assert rise.effect == pytest.approx(np.mean(q["weight"][1] - q["weight"][0]))
    # Q that rises only as much as its rewiring's Q does (hubs, not modules) is no rise in excess modularity.
    hubs = {"weight": q["weight"], "functional": q["weight"]}
    rewired = {kind: values - 0.3 + 0.01 * rng.normal(size=values.shape) for kind, values in hubs.items()}
    assert {c.verdict for c in judge(wiring_claims([0.0, 1e-3], hubs, rewired, []))} == {"failed-control"}
    with pytest.raises(MlxscanError, match="must be 0"):
        wiring_claims([1e-3, 0.0], q, chance, [])


# ----------------------------------------------------------------------------------------------------
# 2. Training a tiny model


TINY = dict(n_layers=2, d_model=32, d_mlp=64, n_heads=2)


@pytest.fixture(scope="module")
def data():
    from mlxscan.stimuli import read_texts
    from mlxscan.training.corpus import make_token_data

    return make_token_data(read_texts(ROOT / "stimuli/corpus.txt"), read_texts(ROOT / "stimuli/corpus_heldout.txt"),
                           vocab_size=300, seq_len=32)


@pytest.fixture(scope="module")
def config(data):
    from mlxscan.training.tiny_model import TinyConfig

    return TinyConfig(vocab_size=data.vocab_size, **TINY)


def settings(**changes):
    from mlxscan.training.train import TrainSettings

    return replace(TrainSettings(steps=30, batch_size=8, seq_len=32, warmup_steps=5), **changes)


def test_penalty_gradient_matches_finite_differences_and_its_closed_form(data, config):
    import mlx.core as mx
    import mlx.nn as nn

    from mlxscan.training.tiny_model import build_model
    from mlxscan.training.train import language_model_loss
    from mlxscan.training.wiring_cost import unit_layout, wiring_cost

    model = build_model(config, seed=0)
    distances = unit_layout(config.n_layers, config.d_model, config.d_mlp, seed=0).distances()  # [L, d_mlp, d_model]
    D = mx.array(distances)
    inputs, targets = mx.array(data.train[:64].reshape(2, 32)), mx.array(data.train[1:65].reshape(2, 32))
    lam = 0.5
    _, with_cost = nn.value_and_grad(model, lambda: language_model_loss(model, inputs, targets)
                                     + lam * wiring_cost(model, D))()
    _, without = nn.value_and_grad(model, lambda: language_model_loss(model, inputs, targets))()
    layer = model.model.layers[1].mlp
    for name, d in (("gate_proj", distances[1]), ("down_proj", distances[1].T)):
        weight = np.array(getattr(layer, name).weight)
        extra = np.array(with_cost["model"]["layers"][1]["mlp"][name]["weight"]) - \
            np.array(without["model"]["layers"][1]["mlp"][name]["weight"])
        np.testing.assert_allclose(extra, lam * np.sign(weight) * d, atol=1e-5)  # d/dw λ|w|d = λ sign(w) d
        # Central differences of the penalty itself, at entries far enough from 0 that |w| stays smooth.
        rng = np.random.default_rng(0)
        for flat in rng.choice(np.flatnonzero(np.abs(weight) > 0.01), 8, replace=False):
            row, col = np.unravel_index(flat, weight.shape)
            values = []
            for step in (+2e-3, -2e-3):
                moved = weight.copy()
                moved[row, col] += step
                getattr(layer, name).weight = mx.array(moved)
                values.append(float(wiring_cost(model, D)))
            getattr(layer, name).weight = mx.array(weight)
            numeric = (values[0] - values[1]) / 4e-3
            assert numeric == pytest.approx(np.sign(weight[row, col]) * d[row, col], abs=2e-2), (name, row, col)
    # The value itself, against a float64 sum written out here.
    expected = sum(np.sum((np.abs(np.array(b.mlp.gate_proj.weight, np.float64)) + np.abs(np.array(b.mlp.up_proj.weight)))
                          * distances[i]) + np.sum(np.abs(np.array(b.mlp.down_proj.weight, np.float64)) * distances[i].T)
                   for i, b in enumerate(model.model.layers))
    assert float(wiring_cost(model, D)) == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def runs(data, config):
    """Three short runs: seed 0 twice (λ = 0), seed 1 (λ = 0), and seed 0 with a large λ."""
    from mlxscan.training.train import train

    return {"a": train(data, config, settings()), "again": train(data, config, settings()),
            "seed1": train(data, config, settings(seed=1)),
            "large": train(data, config, settings(wiring_lambda=3e-3))}


def test_training_is_bit_reproducible_from_its_seed(runs):
    from mlx.utils import tree_flatten

    first, again = dict(tree_flatten(runs["a"].model.parameters())), dict(tree_flatten(runs["again"].model.parameters()))
    assert all(np.array_equal(np.array(first[name]), np.array(again[name])) for name in first)
    np.testing.assert_array_equal(runs["a"].train_loss, runs["again"].train_loss)
    assert runs["a"].validation_loss == runs["again"].validation_loss
    other = dict(tree_flatten(runs["seed1"].model.parameters()))
    assert not np.array_equal(np.array(first["model.layers.0.mlp.up_proj.weight"]),
                              np.array(other["model.layers.0.mlp.up_proj.weight"]))
    assert runs["a"].train_loss[-1] < np.log(runs["a"].config.vocab_size) - 1  # it learns: below a uniform guess


def test_a_large_lambda_makes_the_weight_mass_local(runs):
    from mlxscan.training.tiny_model import mlp_weights

    plain = local_mass_fraction(mlp_weights(runs["a"].model), runs["a"].layout.distances())
    wired = local_mass_fraction(mlp_weights(runs["large"].model), runs["large"].layout.distances())
    assert abs(plain[0] - plain[1]) < 0.05, plain  # λ = 0: mass on local pairs ≈ their share of pairs (≈ 0.1)
    assert wired[0] > 0.4, wired
    assert np.isfinite(runs["large"].validation_loss)


def test_the_checkpoint_loads_through_mlxscan_load_with_the_same_logits(runs, data, config, tmp_path):
    import mlx.core as mx

    from mlxscan.training.tiny_model import save_checkpoint

    run = runs["a"]
    folder = save_checkpoint(tmp_path / "model", run.model, config, data.tokenizer, {"seed": 0})
    loaded = mlxscan.load(folder)
    assert (loaded.n_layers, loaded.d_model, loaded.d_mlp, loaded.vocab_size) == (2, 32, 64, data.vocab_size)
    text = "The kettle clicked off just as the phone started ringing."
    ids = loaded.tokenize(text)
    assert ids == data.tokenizer.encode(text).ids
    expected = np.array(run.model(mx.array([ids])))[0]
    np.testing.assert_allclose(loaded.run(text, logits=True).logits[0], expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# 3. The command


def invoke(*args):
    from mlxscan.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("wiring") / "out"
    result = invoke("wiring", "--quick", "--steps", 12, "--json", "--out", out)
    assert result.exit_code == 0, result.output
    return json.loads(result.output), out


def test_quick_sweep_reports_every_run_and_judged_claims(quick_run):
    record, out = quick_run
    assert record["settings"]["lambdas"] == [0.0, 0.003] and record["settings"]["seeds"] == 2
    assert [(run["wiring_lambda"], run["seed"]) for run in record["runs"]] == [(0.0, 0), (0.0, 1), (0.003, 0), (0.003, 1)]
    assert {claim["verdict"] for claim in record["claims"]} <= {"supported", "null", "failed-control"}
    assert [claim["correction"] for claim in record["claims"]] == ["holm over 2 tests"] * 2
    row = record["by_lambda"][1]
    assert row["effects"]["weight_q"]["mean"] == pytest.approx(row["weight_q"]["mean"] - record["by_lambda"][0]["weight_q"]["mean"])
    assert record["verdict"]["wiring cost raises modularity"] in ("supported", "null")
    assert record["by_lambda"][0]["mlp_weight_mass"]["ratio_to_control"] == 1.0


def test_quick_sweep_saves_arrays_claims_plots_and_loadable_checkpoints(quick_run):
    record, out = quick_run
    assert {p.name for p in out.iterdir()} == {"wiring.json", "wiring.npz", "claims.json", "wiring.png",
                                               "wiring_loss.png", "runs"}
    arrays = np.load(out / "wiring.npz")
    assert arrays["weight_q"].shape == (2, 2)
    assert arrays["weight_q"][1, 0] == pytest.approx(record["runs"][2]["weight_q"]["q"])
    claims = claims_from_json(out / "claims.json")
    assert claims[0].data_files == [{"path": "wiring.npz", "sha256": sha256_of(out / "wiring.npz")}]
    checkpoint = out / record["runs"][3]["checkpoint"]
    assert (checkpoint / "model.safetensors").exists() and (checkpoint / "tokenizer.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".wiring-")]  # the staging folder is gone


@pytest.mark.parametrize("args, phrase", [
    (["--lambdas", "1e-3,0"], "start with 0"),
    (["--lambdas", "0,abc"], "not a list of numbers"),
    (["--seeds", "1"], "at least 2 seeds"),
    (["--density", "1.5"], "strictly between 0 and 1"),
    (["--texts", "missing.txt"], "does not exist"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, phrase, tmp_path):
    result = invoke("wiring", "--quick", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert phrase in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
