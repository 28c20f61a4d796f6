"""`mlxscan connectome`: functional connectivity between units of a scan, as a graph, and its metrics.

The scan glue lives here (which units, which rows); the arithmetic is mlxscan.analysis.connectome.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from .cli import _BadInput, _layers_option, _progress, main

MAX_NODES = 2000  # the default sample: about a minute of null models and metrics on two CPU cores
SAMPLE_STREAM, TOPOGRAPHY_STREAM = 0, 4  # seed streams, apart from the graph's (seed, 1|2, r)
PLOT_CELLS = 400  # the adjacency figure averages blocks of units down to at most this many rows


def _null_cache_folder() -> Path:
    return Path(os.environ.get("MLXSCAN_CACHE") or Path.home() / ".cache" / "mlxscan") / "null_graphs"


def _rows(scan) -> "np.ndarray | slice":  # noqa: F821
    """Observations to correlate over: every stimulus, or every token but BOS (an attention sink whose
    outsized activations would dominate every correlation)."""
    import numpy as np

    if scan.pool != "all":
        return slice(None)
    keep = np.ones(int(scan.offsets[-1]), dtype=bool)
    if scan.manifest.get("tokenizer", {}).get("adds_bos"):
        keep[scan.offsets[:-1]] = False
    return np.flatnonzero(keep)


def _sample_units(scan, site: str, layers: list[int], n_units: int, seed: int):
    """[n, 2] (layer, index): all units of the layers, or a seeded random sample of n_units of them."""
    import numpy as np

    width = scan[site].shape[2]
    every = np.array([(layer, unit) for layer in layers for unit in range(width)], dtype=np.int64)
    if len(every) <= n_units:
        return every, len(every)
    chosen = np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(len(every), n_units, replace=False))
    return every[chosen], len(every)


def _gather(scan, site: str, units, rows):
    """[n_rows, n_units] float32 activations of those units, read one layer at a time."""
    import numpy as np

    array = scan[site]
    columns = []
    for layer in dict.fromkeys(units[:, 0].tolist()):
        block = np.asarray(array[:, scan.layers.index(layer), :])[rows]  # [n_rows, width]
        columns.append(block[:, units[units[:, 0] == layer, 1]].astype(np.float32))
    return np.concatenate(columns, axis=1)


def _per_stimulus(scan, site: str, layer: int, rows):
    """[n_stimuli, width]: the layer's vectors, token-level scans averaged over each stimulus' tokens."""
    import numpy as np

    block = np.asarray(scan[site][:, scan.layers.index(layer), :], np.float64)
    if scan.pool != "all":
        return block
    owner = np.repeat(np.arange(len(scan)), np.diff(scan.offsets))[rows]  # [n_rows] stimulus of each row
    sums = np.zeros((len(scan), block.shape[1]))
    np.add.at(sums, owner, block[rows])
    return sums / np.maximum(np.bincount(owner, minlength=len(scan)), 1)[:, None]


def _topography(scan, site: str, layers: list[int], rows, permutations: int, seed: int, say):
    """Per layer: topography of the category selectivity of all its units (None for a corpus scan)."""
    from .analysis.connectome import topography
    from .analysis.selectivity import unit_selectivity

    if scan.stimuli.kind == "texts":
        return None, {}
    results, arrays = [], {}
    for layer in layers:
        say(f"topography of layer {layer}")
        selectivity, _ = unit_selectivity(_per_stimulus(scan, site, layer, rows), scan.labels)
        result = topography(selectivity, permutations=permutations, seed=seed)
        results.append({"layer": layer, **result.to_dict()})
        arrays[f"topography_layer{layer}_selectivity"] = selectivity
        arrays[f"topography_layer{layer}_null"] = result.null
    return results, arrays


def _check_options(n_units, density, references, swaps, permutations) -> None:
    from .analysis.connectome import MIN_UNITS

    if n_units < MIN_UNITS:
        raise _BadInput(f"--units {n_units}: a connectome needs at least {MIN_UNITS} units")
    if not 0 < density < 1:
        raise _BadInput(f"--density {density} must lie strictly between 0 and 1 (0.05 keeps 5% of unit pairs)")
    if references < 1 or swaps < 1 or permutations < 1:
        raise _BadInput("--references, --swaps and --permutations must be at least 1")


def _chosen_layers(scan, layers_spec) -> list[int]:
    layers = _layers_option(layers_spec)
    if layers is None:
        return scan.layers
    missing = [layer for layer in layers if layer not in scan.layers]
    if missing:
        raise _BadInput(f"--layers {missing}: not recorded; this scan has layers {scan.layers}")
    return list(dict.fromkeys(layers))


@main.command()
@click.argument("scan_dir", type=click.Path(path_type=Path))
@click.option("--site", default="mlp_act", show_default=True, help="Per-layer site: mlp_act (MLP neurons) or resid_post.")
@click.option("--layers", "layers_spec", default=None, help="all (default), 12, 0,5,10 or 4-8 (model layers).")
@click.option("--per-layer", is_flag=True, help="One graph per layer instead of one graph across the chosen layers.")
@click.option("--units", "n_units", type=int, default=MAX_NODES, show_default=True,
              help="Nodes per graph: a seeded random sample when the layers hold more units.")
@click.option("--density", type=float, default=0.05, show_default=True, help="Fraction of unit pairs kept as edges.")
@click.option("--sign", type=click.Choice(["positive", "abs"]), default="positive", show_default=True,
              help="Rank pairs by r (co-activation) or by |r| (anti-correlated units linked too).")
@click.option("--references", type=int, default=5, show_default=True,
              help="Random and lattice reference graphs per graph (made once, cached).")
@click.option("--swaps", type=int, default=10, show_default=True, help="Swap attempts per edge in a random reference.")
@click.option("--permutations", type=int, default=1000, show_default=True, help="Unit-order shuffles (topography null).")
@click.option("--surrogates", type=int, default=10, show_default=True,
              help="Surrogate data sets (each unit permuted on its own) per graph and half: the claims' null.")
@click.option("--permute-units", is_flag=True,
              help="Negative control: permute each unit on its own across observations before anything is built.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save connectome.json, connectome.npz and per graph its .graphml, partition and .png here.")
def connectome(scan_dir, site, layers_spec, per_layer, n_units, density, sign, references, swaps, permutations,
               surrogates, permute_units, seed, as_json, out_dir):
    """Functional connectome of units: small-worldness, rich club, modularity and index topography."""
    import numpy as np

    from .analysis.connectome import NullModelCache, build_connectome, independent_units, surrogate_nulls
    from .command_claims import claims_lines, command_claims, output_folder
    from .store import open_scan

    _check_options(n_units, density, references, swaps, permutations)
    if surrogates < 2:
        raise _BadInput(f"--surrogates {surrogates}: the claims' null needs at least 2 surrogate data sets")
    scan = open_scan(scan_dir)
    if site not in scan.sites:
        raise _BadInput(f"the scan has no site {site!r} (it has {', '.join(scan.sites)}); pass --site")
    layers = _chosen_layers(scan, layers_spec)
    say, rows, cache = _progress(as_json), _rows(scan), NullModelCache(_null_cache_folder())
    record = {"scan": str(scan.folder), "model": scan.manifest["model"]["ref"], "site": site, "pool": scan.pool,
              "over": "tokens" if scan.pool == "all" else "stimuli", "layers": layers, "per_layer": per_layer,
              "units_requested": n_units, "sign": sign, "permutations": permutations, "surrogates": surrogates,
              "permute_units": permute_units, "graphs": []}
    graphs, arrays = {}, {}
    for key, group in ([(f"layer{layer}", [layer]) for layer in layers] if per_layer else [("joint", layers)]):
        started = time.perf_counter()
        units, available = _sample_units(scan, site, group, n_units, seed)
        say(f"graph {key}: {len(units)} of {available} units")
        X = _gather(scan, site, units, rows)
        if permute_units:  # the negative control: no two units related, every claim must come out null
            X = independent_units(X, np.random.default_rng([seed, 41, len(graphs)]))
        nulls = surrogate_nulls(X, density=density, sign=sign, surrogates=surrogates, seed=seed, say=say)
        arrays.update({f"{key}_{name}": value for name, value in nulls.items()})
        result = build_connectome(X, units=units, density=density, sign=sign, references=references, swaps=swaps,
                                  seed=seed, cache=cache, say=say)
        graphs[key] = result
        record["n_observations"] = len(X)
        record["graphs"].append({"graph": key, "units_available": available, **result.to_dict(),
                                 "seconds": round(time.perf_counter() - started, 1)})
        arrays.update({f"{key}_{name}": value for name, value in result.arrays().items()})
    record["topography"], topography_arrays = _topography(scan, site, layers, rows, permutations, seed, say)
    arrays.update(topography_arrays)
    with output_folder(out_dir) as folder:
        _save(folder, record, arrays, graphs, plots=out_dir is not None)
        judged, record["claims"] = command_claims("connectome", folder, {"per-layer": per_layer, "seed": seed})
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print(record, out_dir)
        for line in claims_lines(judged):
            click.echo(line)


def _community_blocks(result):
    """[b, b] edge density between blocks of units ordered by community (the adjacency, shrunk to fit)."""
    import numpy as np

    n = len(result.units)
    order = np.lexsort((np.arange(n), result.modularity.community))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    size = -(-n // PLOT_CELLS)  # units per block
    blocks = -(-n // size)
    edges = position[result.edges] // size  # [m, 2] blocks of both ends
    counts = np.zeros((blocks, blocks))
    np.add.at(counts, (edges[:, 0], edges[:, 1]), 1)
    counts = counts + counts.T
    members = np.bincount(np.arange(n) // size, minlength=blocks).astype(float)
    pairs = np.outer(members, members) - np.diag(members)  # no self-pairs on the diagonal blocks
    return np.divide(counts, pairs, out=np.zeros_like(counts), where=pairs > 0), size


def _save(out_dir: Path, record: dict, arrays: dict, graphs: dict, plots: bool = True) -> None:
    import networkx as nx

    from .outputs import write_outputs
    from .plots import heatmap

    files = {"connectome.json": record, "connectome.npz": arrays}
    for key, result in graphs.items():
        files[f"connectome_{key}.graphml"] = "\n".join(nx.generate_graphml(result.graph())) + "\n"
        files[f"connectome_{key}_partition.json"] = {
            "graph": key, "q": result.modularity.q, "seed": result.modularity.seed,
            "layer": result.units[:, 0].tolist(), "unit": result.units[:, 1].tolist(),
            "community": result.modularity.community.tolist()}
    write_outputs(out_dir, files)
    for key, result in (graphs.items() if plots else ()):
        blocks, size = _community_blocks(result)
        heatmap(Path(out_dir) / f"connectome_{key}.png", blocks, vmin=0, origin="upper",
                title=f"edge density by community, {key} (Q {result.modularity.q:.2f})",
                xlabel=f"units by community ({size} per cell)", ylabel="units by community")


def _number(value, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _print(record: dict, out_dir) -> None:
    click.echo(f"{record['model']}  site {record['site']}  correlation over {record['n_observations']} "
               f"{record['over']}  sign {record['sign']}")
    click.echo(f"{'graph':<8} {'nodes':>5} {'edges':>7} {'density':>7} {'C':>6} {'L':>5} {'σ':>6} {'ω':>6} "
               f"{'rich-club (k)':>14} {'Q':>5} {'Q rand':>6} {'comms':>5} {'sec':>5}")
    for row in record["graphs"]:
        world, club, modules = row["small_world"], row["rich_club"], row["modularity"]
        club_text = f"{_number(club['max_normalized'], '.2f')} ({club['k_at_max']})"
        click.echo(f"{row['graph']:<8} {row['nodes']:>5} {row['edges']:>7} {row['density']:>7.3f} "
                   f"{_number(world['clustering'], '.3f'):>6} {_number(world['path_length'], '.2f'):>5} "
                   f"{_number(world['sigma'], '.2f'):>6} {_number(world['omega'], '.2f'):>6} {club_text:>14} "
                   f"{modules['q']:>5.3f} {_number(modules['q_random'], '.3f'):>6} {modules['n_communities']:>5} "
                   f"{row['seconds']:>5.0f}")
    first = record["graphs"][0]
    click.echo(f"C: average clustering; L: mean path length of the largest component "
               f"({first['small_world']['component_nodes']} of {first['nodes']} nodes in {first['graph']}); "
               f"σ = (C/C_rand)/(L/L_rand) > 1 small-world; ω = L_rand/L − C/C_latt: −1 lattice, 0 small-world, "
               f"+1 random; rich club: max φ/φ_rand over clubs of ≥ {first['rich_club']['min_club']} nodes; "
               f"{first['references']} random ({first['swaps']} swaps/edge) and lattice references")
    if record["topography"] is None:
        click.echo("topography: skipped (a text corpus has no categories)")
    else:
        click.echo(f"topography: signal correlation of index-neighbouring units vs {record['permutations']} "
                   "shuffled unit orders")
        click.echo(f"{'layer':>5} {'units':>6} {'neighbours':>10} {'shuffled':>16} {'z':>6} {'p':>7}")
        for row in record["topography"]:
            click.echo(f"{row['layer']:>5} {row['n_units']:>6} {row['observed']:>10.4f} "
                       f"{row['null_mean']:>+8.4f}±{_number(row['null_sd'], '.4f'):<7} {_number(row['z'], '.2f'):>6} "
                       f"{row['p']:>7.4f}")
    if out_dir:
        click.echo(f"saved connectome.json, connectome.npz and each graph's .graphml, _partition.json and .png in "
                   f"{out_dir}")
