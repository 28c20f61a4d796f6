"""The connectome: graph metrics against networkx's own functions and textbook graphs, null models,
planted communities and topography, and `mlxscan connectome` on small synthetic scans.

No model is loaded: the CLI runs in-process (CliRunner) on scan folders written here with ScanWriter,
a pooled one with planted modules and a token-level one. Graphs are kept to tens or hundreds of
nodes so the file runs in seconds; the 2,000-unit timing is measured by hand (see the lead's notes).
"""

from __future__ import annotations

import json
import random

import networkx as nx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxscan.analysis.connectome import (
    NullModelCache, build_connectome, clustering, lattice_reference, modularity, path_length, random_reference,
    rich_club, rich_club_curve, small_world, threshold_edges, topography, unit_correlation,
)
from mlxscan.cli import main
from mlxscan.errors import MlxscanError
from mlxscan.stimuli import StimulusSet
from mlxscan.store.scan_store import FORMAT, ScanWriter, open_scan

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def adjacency(graph: nx.Graph):
    return nx.to_scipy_sparse_array(graph, nodelist=sorted(graph), weight=None)


def degrees(A) -> np.ndarray:
    return np.asarray(A.sum(axis=1)).ravel()


def references(A, count: int = 3, seed: int = 0):
    return ([random_reference(A, seed=[seed, 1, r]) for r in range(count)],
            [lattice_reference(A, seed=[seed, 2, r]) for r in range(count)])


TEST_GRAPHS = {
    "watts-strogatz": nx.connected_watts_strogatz_graph(60, 6, 0.2, seed=1),
    "barabasi-albert": nx.barabasi_albert_graph(80, 3, seed=2),
    "erdos-renyi": nx.gnm_random_graph(70, 300, seed=3),
    "two pieces": nx.disjoint_union(nx.cycle_graph(12), nx.complete_graph(6)),
}


# ---------------------------------------------------------------- metrics equal networkx's


@pytest.mark.parametrize("name", TEST_GRAPHS)
def test_clustering_and_rich_club_equal_networkx(name):
    graph = TEST_GRAPHS[name]
    average, transitivity = clustering(adjacency(graph))
    assert average == pytest.approx(nx.average_clustering(graph), abs=1e-12)
    assert transitivity == pytest.approx(nx.transitivity(graph), abs=1e-12)
    expected = nx.rich_club_coefficient(graph, normalized=False)
    np.testing.assert_allclose(rich_club(adjacency(graph)), [expected[k] for k in range(len(expected))], atol=1e-12)


@pytest.mark.parametrize("name", TEST_GRAPHS)
def test_path_length_is_networkx_on_the_largest_component(name):
    graph = TEST_GRAPHS[name]
    largest = graph.subgraph(max(nx.connected_components(graph), key=len))
    length, nodes = path_length(adjacency(graph))
    assert nodes == len(largest)
    assert length == pytest.approx(nx.average_shortest_path_length(largest), abs=1e-12)


def test_sigma_and_omega_equal_networkx_given_its_reference_graphs():
    """nx.sigma/nx.omega draw their references from one random.Random(seed) in this order; drawing them
    the same way and handing them over must give networkx's numbers exactly."""
    graph = nx.connected_watts_strogatz_graph(30, 4, 0.2, seed=5)
    draw = random.Random(7)
    randoms = [nx.random_reference(graph, niter=3, seed=draw) for _ in range(2)]
    assert small_world(graph, randoms, [graph]).sigma == pytest.approx(nx.sigma(graph, niter=3, nrand=2, seed=7),
                                                                      rel=1e-12)
    draw = random.Random(7)
    randoms, lattices = [], []
    for _ in range(2):
        randoms.append(nx.random_reference(graph, niter=6, seed=draw))
        lattices.append(nx.lattice_reference(graph, niter=3, seed=draw))
    assert small_world(graph, randoms, lattices).omega == pytest.approx(nx.omega(graph, niter=3, nrand=2, seed=7),
                                                                       rel=1e-12, abs=1e-12)


def test_normalized_rich_club_equals_networkx_given_its_randomized_graph():
    graph = nx.barabasi_albert_graph(60, 8, seed=4)  # dense enough that no random club is empty (nx divides by it)
    swapped = graph.copy()
    nx.double_edge_swap(swapped, 20 * graph.number_of_edges(), max_tries=200 * graph.number_of_edges(), seed=9)
    expected = nx.rich_club_coefficient(graph, normalized=True, Q=20, seed=9)
    curve = rich_club_curve(graph, [swapped], min_club=2)
    np.testing.assert_allclose(curve.normalized, [expected[k] for k in range(len(expected))], rtol=1e-12)


def test_modularity_is_networkx_louvain_and_q():
    graph = nx.connected_caveman_graph(5, 6)
    result = modularity(graph, seed=3)
    communities = nx.community.louvain_communities(graph, weight=None, seed=3)
    assert result.q == pytest.approx(nx.community.modularity(graph, communities), abs=1e-12)
    assert {frozenset(np.flatnonzero(result.community == c)) for c in set(result.community)} == \
        {frozenset(c) for c in communities}


# ---------------------------------------------------------------- textbook graphs


def test_ring_lattice_sits_at_the_lattice_end():
    ring = adjacency(nx.watts_strogatz_graph(200, 10, 0.0, seed=0))
    randoms, lattices = references(ring)
    world = small_world(ring, randoms, lattices)
    assert world.clustering == pytest.approx(3 * (10 - 2) / (4 * (10 - 1)))  # the ring lattice's C
    assert world.omega < -0.6  # L_rand / L ≈ 0.25, C / C_latt = 1
    assert world.lattice_clustering == pytest.approx(world.clustering)


def test_random_graph_is_random_and_small_world_graph_is_small_world():
    er = adjacency(nx.gnm_random_graph(200, 1000, seed=1))
    er_world = small_world(er, *references(er))
    assert er_world.sigma == pytest.approx(1.0, abs=0.15)
    assert er_world.omega > 0.8  # Telesford's ω: random graphs at +1 (0 is the small world)
    ring = adjacency(nx.watts_strogatz_graph(200, 10, 0.0, seed=0))
    ws = adjacency(nx.connected_watts_strogatz_graph(200, 10, 0.1, seed=1))
    ws_world, ring_world = small_world(ws, *references(ws)), small_world(ring, *references(ring))
    assert ws_world.sigma > 3 and ws_world.sigma > ring_world.sigma
    assert abs(ws_world.omega) < 0.3


def test_omega_is_clipped_to_its_definition_and_the_raw_value_kept():
    """Paths shorter than the 'random' reference's push L_rand / L above 1 and ω above 1."""
    dense = adjacency(nx.complete_graph(12))
    ring = adjacency(nx.cycle_graph(12))
    world = small_world(dense, [ring], [dense])
    assert world.omega_unclipped > 1
    assert world.omega == 1.0


# ---------------------------------------------------------------- null models


@pytest.mark.parametrize("make", [lambda A, s: random_reference(A, seed=s), lambda A, s: lattice_reference(A, seed=s)],
                         ids=["random", "lattice"])
def test_references_keep_degrees_are_simple_and_repeat_with_their_seed(make):
    A = adjacency(nx.barabasi_albert_graph(150, 4, seed=6))
    first, again, other = make(A, 1), make(A, 1), make(A, 2)
    np.testing.assert_array_equal(degrees(first), degrees(A))
    assert first.diagonal().sum() == 0 and first.max() == 1 and (first != first.T).nnz == 0
    assert (first != again).nnz == 0
    assert (first != other).nnz > 0


def test_references_randomize_a_lattice_and_latticize_a_random_graph():
    ring = adjacency(nx.watts_strogatz_graph(300, 12, 0.0, seed=0))
    assert clustering(random_reference(ring, seed=0))[0] < 0.1  # ER with k=12, n=300: ≈ 0.04
    regular = adjacency(nx.random_regular_graph(12, 300, seed=0))
    assert clustering(lattice_reference(regular, seed=0))[0] == pytest.approx(3 * 10 / (4 * 11))


def test_null_models_are_made_once_and_found_on_disk(tmp_path):
    A = adjacency(nx.gnm_random_graph(60, 200, seed=0))
    cache = NullModelCache(tmp_path)
    first = cache.get("random", A, seed=(0, 1, 0), swaps=5)
    assert (cache.get("random", A, seed=(0, 1, 0), swaps=5) != first).nnz == 0 and cache.made == 1
    reread = NullModelCache(tmp_path)
    assert (reread.get("random", A, seed=(0, 1, 0), swaps=5) != first).nnz == 0 and reread.made == 0
    cache.get("random", A, seed=(0, 1, 1), swaps=5)
    cache.get("lattice", A, seed=(0, 2, 0))
    assert cache.made == 3 and len(list(tmp_path.glob("*.npy"))) == 3


# ---------------------------------------------------------------- modularity and rich club, planted


def test_planted_communities_are_found_and_random_graphs_have_low_q():
    sizes = [30, 30, 30, 30]
    planted = nx.stochastic_block_model(sizes, [[0.4 if i == j else 0.02 for j in range(4)] for i in range(4)], seed=1)
    result = modularity(planted, seed=0, random_ref=random_reference(adjacency(planted), seed=0))
    truth = np.repeat(np.arange(4), 30)
    assert len(set(result.community)) == 4
    assert all(len(set(result.community[truth == block])) == 1 for block in range(4))
    assert result.q > 0.6 and result.q_random < 0.3
    assert modularity(planted, seed=0).community.tolist() == result.community.tolist()  # seeded: repeats
    assert modularity(nx.gnm_random_graph(120, 1000, seed=2), seed=0).q < 0.25


def test_a_planted_rich_club_is_found():
    graph = nx.gnm_random_graph(200, 800, seed=0)
    hubs = list(range(25))
    graph.add_edges_from((a, b) for a in hubs for b in hubs if a < b)
    graph.add_edges_from((hub, 25 + (7 * hub + i) % 175) for hub in hubs for i in range(15))
    A = adjacency(graph)
    curve = rich_club_curve(A, [random_reference(A, seed=s) for s in range(3)], min_club=15)
    assert curve.max_normalized > 1.5
    assert curve.club_size[curve.k_at_max] <= 40


# ---------------------------------------------------------------- topography


def smooth_map(units: int = 300, classes: int = 6, seed: int = 0) -> np.ndarray:
    """[classes, units] d' whose preferred class drifts slowly along the unit index."""
    rng = np.random.default_rng(seed)
    preferred = (np.arange(units) * classes / units)  # [units] continuous position
    distance = np.abs(np.arange(classes)[:, None] - preferred[None, :])
    return np.exp(-distance ** 2) + 0.2 * rng.normal(size=(classes, units))


def test_topography_finds_a_planted_map_and_not_a_shuffled_one():
    planted = topography(smooth_map(), permutations=200, seed=0)
    assert planted.z > 5 and planted.p_value == pytest.approx(1 / 201)
    shuffled = topography(smooth_map()[:, np.random.default_rng(1).permutation(300)], permutations=200, seed=0)
    assert abs(shuffled.z) < 3 and shuffled.p_value > 0.01
    again = topography(smooth_map(), permutations=200, seed=0)
    np.testing.assert_array_equal(again.null, planted.null)


def test_topography_leaves_constant_units_out():
    d = smooth_map(60)
    d[:, 10] = 0.0
    assert topography(d, permutations=10).n_units == 59


# ---------------------------------------------------------------- correlation, threshold, whole graph


def test_correlation_and_threshold():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 12)) + 1e4  # a large mean must not cost precision
    np.testing.assert_allclose(unit_correlation(X), np.corrcoef(X.T), atol=1e-10)
    r = unit_correlation(X)
    edges, cutoff = threshold_edges(r, 0.25, "abs")
    assert len(edges) == round(0.25 * 66) and (edges[:, 0] < edges[:, 1]).all()
    assert np.abs(r[edges[:, 0], edges[:, 1]]).min() == pytest.approx(cutoff)
    positive, _ = threshold_edges(r, 0.9, "positive")
    assert len(positive) == int(((r > 0).sum() - 12) / 2)  # fewer positive pairs than asked: all of them
    for density in (0, 1, 1.5):
        with pytest.raises(MlxscanError, match="density"):
            threshold_edges(r, density)


def test_build_connectome_drops_constant_units_and_recovers_modules():
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(200, 3))
    X = np.repeat(factors, 20, axis=1) + 0.7 * rng.normal(size=(200, 60))
    X[:, 5] = 2.0
    result = build_connectome(X, density=0.2, references=2, swaps=5, min_club=5)
    assert len(result.units) == 59 and result.dropped_units.tolist() == [[0, 5]]
    assert result.modularity.to_dict()["n_communities"] == 3 and result.modularity.q > 0.4
    assert result.small_world.sigma > 1
    graph = result.graph()
    assert graph.number_of_edges() == len(result.edges) == round(0.2 * 59 * 58 / 2)
    assert nx.average_clustering(graph) == pytest.approx(result.small_world.clustering)


# ---------------------------------------------------------------- the command


CATEGORIES = ("animals", "foods", "tools", "colours")
WORDS, FRAMES, LAYERS, WIDTH = 5, 4, (3, 7), 48


def _records() -> list[dict]:
    return [{"text": f"Frame {f} about w{c}{w} here.", "word": f"w{c}{w}", "category": category, "frame": f"f{f}"}
            for c, category in enumerate(CATEGORIES) for w in range(WORDS) for f in range(FRAMES)]


def _write_scan(folder, values: np.ndarray, pool: str, offsets=None):
    stimuli = StimulusSet.from_records(_records())
    manifest = {"format": FORMAT, "status": "running", "identity": {}, "model": {"ref": "synthetic", "sha256": "0"},
                "stimuli": {"path": None, "sha256": stimuli.sha256, "n": len(stimuli), "kind": stimuli.kind,
                            "categories": list(stimuli.categories)},
                "sites": ["mlp_act"], "layers": list(LAYERS), "pool": pool, "store_dtype": "float32",
                "tokenizer": {"adds_bos": True}}
    folder.mkdir()
    writer = ScanWriter(folder, manifest, stimuli, {"mlp_act": WIDTH}, n_rows=len(values))
    if offsets is not None:
        np.save(folder / "offsets.npy", offsets)
    writer.write({"mlp_act": [(0, values.astype(np.float32))]}, done=len(stimuli))
    writer.finish()
    return open_scan(folder)


def _planted(n_rows: int, rng) -> np.ndarray:
    """[n, 2 layers, WIDTH]: four modules of 12 neighbouring units, each driven by its own factor."""
    factors = rng.normal(size=(n_rows, 4))
    layer = np.repeat(factors, WIDTH // 4, axis=1)
    return np.stack([layer, layer], axis=1) + 0.8 * rng.normal(size=(n_rows, 2, WIDTH))


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("connectome")
    n = len(CATEGORIES) * WORDS * FRAMES
    pooled = _planted(n, rng)
    labels = np.repeat(np.arange(len(CATEGORIES)), WORDS * FRAMES)
    pooled[:, 0, :] += 2.0 * (labels[:, None] == np.arange(WIDTH)[None, :] * len(CATEGORIES) // WIDTH)  # a map
    lengths = rng.integers(3, 6, size=n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = _planted(int(offsets[-1]), rng)
    tokens[offsets[:-1]] = 500.0  # BOS: must not enter any correlation
    return {"pooled": _write_scan(root / "pooled", pooled, "word").folder,
            "tokens": _write_scan(root / "tokens", tokens, "all", offsets).folder, "n_tokens": int(offsets[-1]), "n": n}


FAST = ["--references", "2", "--swaps", "5", "--permutations", "50", "--density", "0.15"]


def invoke(*args):
    return CliRunner().invoke(main, ["connectome", *map(str, args)])


def test_json_reports_every_metric(scans):
    result = invoke(scans["pooled"], *FAST, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["over"] == "stimuli" and record["n_observations"] == scans["n"]
    (graph,) = record["graphs"]
    assert graph["graph"] == "joint" and graph["nodes"] == 2 * WIDTH and graph["layers"] == list(LAYERS)
    assert graph["density"] == pytest.approx(0.15, abs=1e-3)
    for key in ("sigma", "omega", "omega_unclipped", "transitivity", "clustering", "path_length", "component_nodes",
                "random_path_length", "lattice_clustering"):
        assert key in graph["small_world"]
    assert -1 <= graph["small_world"]["omega"] <= 1
    assert graph["modularity"]["q"] > graph["modularity"]["q_random"]
    assert set(graph["rich_club"]) >= {"max_normalized", "k_at_max", "club_size_at_max"}
    first, second = record["topography"]
    assert first["layer"] == LAYERS[0] and first["z"] > second["z"]  # the map is planted in the first layer
    again = json.loads(invoke(scans["pooled"], *FAST, "--json").output)
    for row in (*record["graphs"], *again["graphs"]):
        row.pop("seconds")
    for run in (record, again):  # connectome.json's sha256 differs with its timings; nothing else may
        for claim in run["claims"]["claims"]:
            claim.pop("data_files")
    assert again == record  # every random step is seeded
    assert {claim["id"] for claim in record["claims"]["claims"]} >= {"connectome.small_world.joint",
                                                                     "connectome.modular.joint"}


def test_independent_units_support_no_claim(scans):
    # Issue 21: the negative control. The planted modules permuted unit by unit are independent units.
    result = invoke(scans["pooled"], *FAST, "--permute-units", "--json")
    assert result.exit_code == 0, result.output
    claims = json.loads(result.output)["claims"]["claims"]
    graph = [c for c in claims if not c["id"].startswith("connectome.topography")]
    assert graph and all(c["verdict"] != "supported" for c in graph), [(c["id"], c["reason"]) for c in graph]


@pytest.mark.parametrize("args, phrase", [(["--surrogates", "1"], "at least 2 surrogate")])
def test_bad_surrogate_options_exit_2(scans, tmp_path, args, phrase):
    result = invoke(scans["pooled"], *FAST, *args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and phrase in result.output and not (tmp_path / "out").exists()


def test_out_saves_graph_partition_arrays_and_figure(scans, tmp_path):
    out = tmp_path / "out"
    result = invoke(scans["pooled"], *FAST, "--per-layer", "--units", "40", "--out", out)
    assert result.exit_code == 0, result.output
    assert "graph" in result.output and "topography" in result.output
    record = json.loads((out / "connectome.json").read_text())
    assert [row["graph"] for row in record["graphs"]] == [f"layer{layer}" for layer in LAYERS]
    arrays = np.load(out / "connectome.npz")
    for row in record["graphs"]:
        key = row["graph"]
        assert (out / f"connectome_{key}.png").read_bytes().startswith(PNG_SIGNATURE)
        graph = nx.read_graphml(out / f"connectome_{key}.graphml", node_type=int)
        partition = json.loads((out / f"connectome_{key}_partition.json").read_text())
        assert graph.number_of_nodes() == row["nodes"] == 40 and graph.number_of_edges() == row["edges"]
        communities = [set(np.flatnonzero(np.array(partition["community"]) == c).tolist())
                       for c in set(partition["community"])]
        assert nx.community.modularity(graph, communities, weight=None) == pytest.approx(row["modularity"]["q"])
        assert nx.average_clustering(graph) == pytest.approx(row["small_world"]["clustering"])
        assert nx.transitivity(graph) == pytest.approx(row["small_world"]["transitivity"])
        assert arrays[f"{key}_correlation"].shape == (40, 40)
        np.testing.assert_array_equal(arrays[f"{key}_units"][:, 1], partition["unit"])
    assert arrays[f"topography_layer{LAYERS[0]}_null"].shape == (50,)


def test_token_level_scan_correlates_over_tokens_without_bos(scans, tmp_path):
    result = invoke(scans["tokens"], *FAST, "--layers", str(LAYERS[1]), "--json", "--out", tmp_path)
    record = json.loads(result.output)
    assert record["over"] == "tokens" and record["n_observations"] == scans["n_tokens"] - scans["n"]
    # BOS rows (500 in every unit) would have correlated every unit with every other: one community
    community = np.load(tmp_path / "connectome.npz")["joint_community"]
    module = np.arange(WIDTH) // (WIDTH // 4)
    assert all(len(set(module[community == c])) == 1 for c in set(community.tolist()))


@pytest.mark.parametrize("args, message", [
    (["--density", "0"], "--density"), (["--density", "1.5"], "--density"), (["--units", "5"], "--units"),
    (["--site", "resid_pre"], "no site"), (["--layers", "5"], "not recorded"), (["--references", "0"], "at least 1"),
])
def test_bad_input_exits_2_with_one_line(scans, args, message):
    result = invoke(scans["pooled"], *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
