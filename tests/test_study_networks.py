"""The connectome step's graph claims: small-worldness and modularity against independent-unit surrogates.

Planted answers: four modules of correlated units (test_connectome's synthetic scan) make a modular,
small-world graph in each layer, so both claims are supported and replicate in each half of the
stimuli; independent units are their own null, so no claim is supported. `study verify` recomputes the claims from
the saved files and catches a changed reference value.
"""

from __future__ import annotations

import json

import mlxscan  # noqa: F401  (before mlx: the fast BLAS)

import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.analysis.connectome import (  # noqa: E402
    build_connectome, lattice_reference, modularity, random_reference, small_world)
from mlxscan.analysis.graph_nulls import _adjacency  # noqa: E402
from mlxscan.claims import GateThresholds, file_record, judge  # noqa: E402
from mlxscan.cli import main  # noqa: E402
from mlxscan.outputs import write_outputs  # noqa: E402
from mlxscan.stimuli import StimulusSet  # noqa: E402
from mlxscan.study.adapters import StepContext  # noqa: E402
from mlxscan.study.adapters_networks import (  # noqa: E402
    empirical_p, graph_claims, partition_q, sigma_null)
from mlxscan.study.runner import judge_study  # noqa: E402
from mlxscan.study.verify import verify_study  # noqa: E402

REFERENCES = 20


def test_per_reference_values_are_kept_and_match_the_summaries():
    rng = np.random.default_rng(0)
    X = np.repeat(rng.normal(size=(150, 3)), 15, axis=1) + 0.8 * rng.normal(size=(150, 45))
    result = build_connectome(X, density=0.2, references=4, swaps=5, min_club=5)
    arrays = result.arrays()
    assert arrays["random_transitivity"].shape == arrays["random_path_length"].shape == arrays["random_q"].shape == (4,)
    world = result.small_world
    assert arrays["random_transitivity"].mean() == pytest.approx(world.random_transitivity)
    assert arrays["random_path_length"].mean() == pytest.approx(world.random_path_length)
    assert arrays["random_q"][0] == result.modularity.q_random
    assert len(set(arrays["random_q"].round(12).tolist())) > 1  # every reference's own Louvain, not copies
    assert "random_transitivities" not in world.to_dict()  # the JSON record keeps its fields
    assert partition_q(result.edges, result.modularity.community) == pytest.approx(result.modularity.q, abs=1e-12)


def test_sigma_null_centres_on_one_and_empirical_p_has_its_floor():
    c, length = np.array([0.10, 0.11, 0.09, 0.10]), np.array([2.0, 2.1, 1.9, 2.0])
    null = sigma_null(c, length)
    assert null.mean() == pytest.approx(1.0, abs=0.02)
    assert empirical_p(5.0, null) == pytest.approx(1 / 5)  # beyond every draw: (0 + 1) / (4 + 1)
    assert empirical_p(0.0, null) == 1.0


def graph_arrays(graph: nx.Graph, key: str, seed: int) -> dict:
    """What `mlxscan connectome` saves for one graph, made from a given graph."""
    A = _adjacency(graph)
    randoms = [random_reference(A, swaps=5, seed=[seed, 1, r]) for r in range(REFERENCES)]
    world = small_world(A, randoms, [lattice_reference(A, seed=[seed, 2])])
    found = modularity(A, seed=seed, random_refs=randoms)
    edges = np.array(sorted(tuple(sorted(e)) for e in graph.edges()), dtype=np.int64)
    return {f"{key}_units": np.stack([np.zeros(len(graph)), np.arange(len(graph))], 1).astype(np.int64),
            f"{key}_edges": edges, f"{key}_community": found.community,
            f"{key}_random_transitivity": np.array(world.random_transitivities),
            f"{key}_random_path_length": np.array(world.random_path_lengths), f"{key}_random_q": found.random_qs}


def step_context(folder, record: dict, arrays: dict, name: str = "connectome") -> StepContext:
    write_outputs(folder / "steps" / name, {"connectome.json": record, "connectome.npz": arrays})
    return StepContext(folder, name, "connectome", {}, {}, folder / "inputs" / "none.jsonl")


def data_arrays(X: np.ndarray, key: str, seed: int, density: float = 0.1, surrogates: int = 10) -> dict:
    """What `mlxscan connectome` saves for one graph of activations X [observations, units]."""
    from mlxscan.analysis.connectome import surrogate_nulls

    result = build_connectome(X, density=density, references=2, swaps=2, seed=seed)
    nulls = surrogate_nulls(X, density=density, surrogates=surrogates, seed=seed)
    return {**{f"{key}_{name}": value for name, value in result.arrays().items()},
            **{f"{key}_{name}": value for name, value in nulls.items()}}


def latent_modules(rng, observations: int = 120, modules: int = 4, size: int = 15, loading: float = 1.0):
    """Units in `modules` groups, each group driven by its own latent factor (plus unit noise)."""
    factors = rng.standard_normal((observations, modules))
    return np.repeat(factors, size, axis=1) * loading + rng.standard_normal((observations, modules * size))


def test_independent_units_are_neither_small_world_nor_modular(tmp_path):
    # Issue 21: against degree-preserving swaps these graphs were "small-world" (σ 1.6-2.7).
    arrays = {}
    for seed in (1, 2):
        X = np.random.default_rng(seed).standard_normal((120, 60))
        arrays.update(data_arrays(X, f"iid{seed}", seed))
    ctx = step_context(tmp_path, {"graphs": [{"graph": "iid1"}, {"graph": "iid2"}], "topography": None}, arrays)
    claims = {claim.id: claim for claim in judge(graph_claims(ctx))}
    assert set(claims) == {f"connectome.{kind}.iid{seed}" for kind in ("small_world", "modular") for seed in (1, 2)}
    for claim in claims.values():
        assert claim.verdict in ("null", "untestable"), (claim.id, claim.reason)


def test_latent_modules_are_modular_and_replicate_in_each_half(tmp_path):
    X = latent_modules(np.random.default_rng(0))
    ctx = step_context(tmp_path, {"graphs": [{"graph": "joint"}], "topography": None}, data_arrays(X, "joint", 0))
    claims = {claim.id: claim for claim in judge(graph_claims(ctx))}
    modular = claims["connectome.modular.joint"]
    assert modular.verdict == "supported" and modular.replication["passed"], modular.reason
    assert "half A" in modular.replication["effects"]


def test_files_without_surrogate_nulls_give_untestable_graph_claims(tmp_path):
    ctx = step_context(tmp_path, {"graphs": [{"graph": "joint"}], "topography": []},
                       {"joint_edges": np.zeros((2, 2), np.int64)})
    claims = judge(graph_claims(ctx))
    assert [claim.verdict for claim in claims] == ["untestable", "untestable"]
    assert "surrogate" in claims[0].reason


# ---------------------------------------------------------------- through the command and `study verify`


@pytest.fixture(scope="module")
def planted_step(tmp_path_factory):
    """A study folder whose connectome step ran `mlxscan connectome --per-layer` on planted modules."""
    from test_connectome import _planted, _records, _write_scan, CATEGORIES, FRAMES, WORDS

    root = tmp_path_factory.mktemp("networks")
    scan = _write_scan(root / "scan", _planted(len(CATEGORIES) * WORDS * FRAMES, np.random.default_rng(3)), "word")
    folder = root / "study"
    (folder / "inputs").mkdir(parents=True)
    stimuli = folder / "inputs" / "stimuli.jsonl"
    stimuli.write_text(StimulusSet.from_records(_records()).to_jsonl())
    options = ["--per-layer", "--density", "0.15", "--references", str(REFERENCES), "--swaps", "5",
               "--permutations", "50"]
    result = CliRunner().invoke(main, ["connectome", str(scan.folder), *options,
                                       "--out", str(folder / "steps" / "connectome")])
    assert result.exit_code == 0, result.output
    record = {"stimuli": file_record(stimuli, folder) | {"path": "inputs/stimuli.jsonl"},
              "steps": [{"name": "connectome", "analysis": "connectome", "status": "done", "claims_params": {},
                         "params": {"per-layer": True, "density": 0.15, "references": REFERENCES}}]}
    (folder / "study.json").write_text(json.dumps(record))
    claims = judge_study(folder, record, GateThresholds())
    return folder, {claim.id: claim for claim in claims}


def test_planted_modules_are_modular_and_small_world_in_both_layers(planted_step):
    from test_connectome import LAYERS

    folder, claims = planted_step
    saved = json.loads((folder / "steps" / "connectome" / "connectome.json").read_text())
    for row, layer in zip(saved["graphs"], LAYERS):
        modular, world = claims[f"connectome.modular.layer{layer}"], claims[f"connectome.small_world.layer{layer}"]
        for claim in (modular, world):
            assert claim.verdict == "supported", (claim.id, claim.reason)
            assert claim.replication["passed"] and claim.ci[0] > 0
            assert [record["path"] for record in claim.data_files] == ["steps/connectome/connectome.json",
                                                                      "steps/connectome/connectome.npz"]
        assert modular.value == pytest.approx(row["modularity"]["q"], abs=1e-12)  # recomputed from the partition
        assert "empirical p (r+1)/(n+1) = 0.0909" in modular.test  # beyond all 10 surrogates: 1/11
    assert {claim.id.split(".")[1] for claim in claims.values()} == {"modular", "small_world", "topography"}


def test_verify_recomputes_the_claims_and_catches_a_changed_reference(planted_step, tmp_path):
    folder, _ = planted_step
    report = verify_study(folder)
    assert report.ok, report.problems
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(folder, copy)
    path = copy / "steps" / "connectome" / "connectome.npz"
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    key = next(key for key in arrays if key.endswith("_whole_surrogate_q"))
    arrays[key] = arrays[key] + 0.05  # the surrogates' Q, changed after the fact
    np.savez(path, **arrays)
    problems = verify_study(copy).problems
    assert any(p.startswith("steps/connectome/connectome.npz: sha256") for p in problems), problems
    layer = key.removesuffix("_whole_surrogate_q")
    assert any(p.startswith(f"connectome.modular.{layer}: control_value recorded") for p in problems), problems
