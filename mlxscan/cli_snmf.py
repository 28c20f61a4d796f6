"""`mlxscan snmf`: MLP activations factorized into features, sparse sets of co-activating neurons (analysis/snmf.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .cli import _BadInput, _layers_option, _progress, main
from .cli_ica import _scan_bar, _stimuli_file

SITE = "mlp_act"
TOP_NEURONS = 8  # loadings listed per feature in the record


@main.command()
@click.argument("scan_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default=None, help="Model to scan first when no SCAN_DIR is given (default: bundled).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="Texts to scan first (every token, mlp_act of every layer; cached, shared with `mlxscan ica`) "
                   "when no SCAN_DIR is given (default: stimuli/corpus.txt).")
@click.option("--layers", "layers_spec", default=None,
              help="Layers to factorize, one fit each: 12, 0,5,10 or 4-8 (default: the middle layer).")
@click.option("--features", type=int, default=32, show_default=True, help="Features (rank k) per layer.")
@click.option("--keep", type=float, default=0.05, show_default=True,
              help="Fraction of neurons each feature keeps (winner-take-all, as in the paper, which used 0.01); 1: dense.")
@click.option("--iterations", type=int, default=500, show_default=True, help="Most iterations per fit phase.")
@click.option("--top", "n_top", type=int, default=8, show_default=True, help="Top activating tokens kept per feature.")
@click.option("--no-split-half", is_flag=True, help="Skip the split-half stability check (two more fits per layer).")
@click.option("--no-seed-check", is_flag=True, help="Skip the second-seed stability check (one more fit per layer).")
@click.option("--permutations", type=int, default=20, show_default=True, help="Neuron shuffles of the stability null.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save snmf.json, snmf.npz and snmf.png here.")
def snmf(scan_dir, model_ref, texts_path, layers_spec, features, keep, iterations, n_top, no_split_half,
         no_seed_check, permutations, seed, as_json, out_dir):
    """Features of MLP neurons by semi-nonnegative matrix factorization: quality, sparsity, stability, top tokens.

    Each layer's activations [tokens, neurons] are factorized as coefficients (>= 0, per token) times
    loadings (per neuron); a feature is the set of neurons it loads on and the tokens that express it.
    """
    if scan_dir is not None and (model_ref or texts_path):
        raise _BadInput("give either SCAN_DIR or --model/--texts, not both")
    if features < 1 or iterations < 1 or permutations < 1 or n_top < 1:
        raise _BadInput("--features, --iterations, --permutations and --top must be at least 1")
    if not 0 < keep <= 1:
        raise _BadInput(f"--keep {keep}: give the fraction of neurons each feature keeps, in (0, 1] (1: dense)")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise _BadInput(f"--out {out_dir} is a file; give a folder")
    say, timings = _progress(as_json), {}
    layers = _layers_option(layers_spec)
    scan, tokenizer = _token_scan(scan_dir, model_ref, texts_path, as_json, say, timings)
    layers, rows = _chosen(scan, layers, features)
    from .analysis.snmf import snmf_layer

    results = []
    for layer in layers:
        say(f"SNMF of layer {layer}: {len(rows)} tokens x {scan[SITE].shape[2]} neurons, {features} features")
        results.append(snmf_layer(
            scan.layer(SITE, layer), rows, scan.offsets, features, layer=layer, keep=None if keep == 1 else keep,
            max_iter=iterations, seed=seed, split_half=not no_split_half, seed_check=not no_seed_check,
            permutations=permutations, n_top=n_top))
    timings["snmf"] = sum(result.seconds for result in results)
    record = _record(scan, results, rows, tokenizer, timings,
                     {"features": features, "keep": keep, "iterations": iterations, "top": n_top, "seed": seed,
                      "permutations": None if no_split_half and no_seed_check else permutations})
    if out_dir:
        _save(out_dir, record, results, rows)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print(record, out_dir)


def _token_scan(scan_dir, model_ref, texts_path, as_json, say, timings):
    """(a token-level mlp_act scan, its tokenizer): the given folder, or a cached scan of every layer made now."""
    from .store import open_scan

    if scan_dir is not None:
        scan = open_scan(scan_dir)
        if scan.pool != "all" or SITE not in scan.sites:
            raise _BadInput(f"{scan_dir} must be a token-level {SITE} scan (--sites {SITE} --pool all); it has "
                            f"{', '.join(scan.sites)} pooled {scan.pool}")
        return scan, _tokenizer_of(scan)
    from .capture.scan import ScanSettings, cached_scan
    from .models import load
    from .stimuli import load_texts

    texts, model = load_texts(texts_path or _stimuli_file("corpus.txt", "--texts")), load(model_ref)
    say(f"scanning {model.ref} on {len(texts)} texts ({SITE}, every token, every layer; cached)")
    started = time.perf_counter()
    # every layer, as `mlxscan ica` scans by default: the two commands share one cached scan
    scan = cached_scan(model, texts, ScanSettings(sites=(SITE,), pool="all"), progress=_scan_bar(as_json))
    timings["scan"] = time.perf_counter() - started
    return scan, model.tokenizer


def _tokenizer_of(scan):
    """The scan's model's tokenizer alone (no weights), through the tokenizer cache."""
    from .models.tokenizer import load_tokenizer

    path = Path(scan.manifest["model"]["path"])
    if not path.exists():
        raise _BadInput(f"the scan's model {path} is gone, so its tokens cannot be shown; rescan with a model that exists")
    return load_tokenizer(path.parent, path.name) if path.is_file() else load_tokenizer(path)


def _chosen(scan, layers, features: int):
    """(layers to fit, token rows): the middle recorded layer by default; every token but a BOS attention sink."""
    import numpy as np

    recorded = scan.layers
    layers = [recorded[len(recorded) // 2]] if layers is None else sorted(set(layers))
    missing = [layer for layer in layers if layer not in recorded]
    if missing:
        raise _BadInput(f"--layers {missing} were not recorded; this scan has layers {recorded[0]}..{recorded[-1]}")
    offsets = scan.offsets
    keep_row = np.ones(int(offsets[-1]), bool)
    if scan.manifest.get("tokenizer", {}).get("adds_bos"):
        keep_row[offsets[:-1]] = False  # BOS: outsized activations that would claim features of their own
    rows = np.flatnonzero(keep_row)
    if features >= min(len(rows), scan[SITE].shape[2]):
        raise _BadInput(f"--features {features} must be below the tokens ({len(rows)}) and neurons "
                        f"({scan[SITE].shape[2]}) of the scan")
    return layers, rows


def _feature_rows(result, scan, tokenizer) -> list[dict]:
    import numpy as np

    from .analysis.snmf import token_context

    fit, token_ids, offsets = result.fit, np.load(scan.folder / "token_ids.npy", mmap_mode="r"), scan.offsets
    n90, n50 = fit.neurons_carrying(0.9), fit.neurons_carrying(0.5)
    rows = []
    for f in range(fit.n_features):
        strongest = np.argsort(-np.abs(fit.loadings[f]), kind="stable")[:TOP_NEURONS]
        tokens = []
        for row, value in zip(result.top_rows[f], result.top_values[f]):
            if row < 0:
                continue
            token, context = token_context(token_ids, offsets, int(row), tokenizer.decode)
            tokens.append({"text": int(np.searchsorted(offsets, row, side="right") - 1), "row": int(row),
                           "token": token, "value": float(value), "context": context})
        rows.append({
            "feature": f, "energy": float(fit.energy[f]), "neurons_50": int(n50[f]), "neurons_90": int(n90[f]),
            "support": int(np.count_nonzero(fit.loadings[f])),
            "active_tokens": float(np.mean(fit.coefficients[:, f] > 0)),
            "top_neurons": [[int(unit), float(fit.loadings[f, unit])] for unit in strongest],
            "split_half_cos": None if result.split_half is None else float(result.split_half.cosine[f]),
            "seed_cos": None if result.seed_check is None else float(result.seed_check.cosine[f]),
            "top_tokens": tokens,
        })
    return rows


def _random_neurons_90(width: int, seed: int) -> int:
    """Neurons holding 90% of a random Gaussian direction's squared length: what 'dense' means at this width."""
    import numpy as np

    from .analysis.snmf import neurons_carrying

    return int(neurons_carrying(np.random.default_rng([seed, 31]).standard_normal((1, width)), 0.9)[0])


def _record(scan, results, rows, tokenizer, timings: dict, settings: dict) -> dict:
    import numpy as np

    from .analysis.snmf import _jsonable

    m, width = scan.manifest, scan[SITE].shape[2]
    layers = []
    for result in results:
        fit = result.fit
        summary = {key: value for key, value in fit.to_dict().items()
                   if key not in ("energy", "neurons_50", "neurons_90", "support", "active_tokens")}
        layers.append({
            "layer": result.layer, **summary, "error_ratio": fit.relative_error / max(fit.svd_relative_error, 1e-12),
            "median_neurons_90": float(np.median(fit.neurons_carrying(0.9))),
            "split_half": None if result.split_half is None else result.split_half.to_dict(),
            "seed_check": None if result.seed_check is None else result.seed_check.to_dict(),
            "seconds": result.seconds, "features": _feature_rows(result, scan, tokenizer)})
    return _jsonable({
        "analysis": "snmf", "site": SITE, "model": m["model"], "scan": str(scan.folder),
        "texts": {k: m["stimuli"][k] for k in ("path", "sha256", "n")}, "width": width, "n_tokens": len(rows),
        **settings, "random_neurons_90": _random_neurons_90(width, settings["seed"]), "layers": layers,
        "timings_s": timings,
        "notes": "A [tokens, neurons] ~ coefficients (>= 0) @ loadings, per layer (Ding et al. 2010 updates, "
                 "winner-take-all support as in Shafran et al. 2025); relative_error ||A - YL||/||A|| against the "
                 "rank-k truncated SVD (the floor); neurons_90: neurons holding 90% of a feature's squared loading "
                 "(random_neurons_90: the same for a random direction); split_half/seed cos: |cos| of a feature's "
                 "partners in two other fits (Hungarian on |cos|), null: neurons shuffled in one fit",
    })


def _save(out_dir: Path, record: dict, results, rows) -> None:
    import numpy as np

    from .outputs import write_outputs

    arrays = {"layers": np.array([r.layer for r in results]), "rows": rows,
              "loadings": np.stack([r.fit.loadings for r in results]),  # [n_layers, k, width]
              "coefficients": np.stack([r.fit.coefficients for r in results]),  # [n_layers, n_tokens, k]
              "energy": np.stack([r.fit.energy for r in results]),
              "top_rows": np.stack([r.top_rows for r in results]), "top_values": np.stack([r.top_values for r in results])}
    for r in results:
        arrays[f"objective_layer{r.layer}"] = r.fit.objective
        for check, prefix in ((r.split_half, "split_half"), (r.seed_check, "seed")):
            if check is not None:
                arrays.update({f"{key}_layer{r.layer}": value for key, value in check.arrays(prefix).items()})
    write_outputs(out_dir, {"snmf.json": record, "snmf.npz": arrays})
    _figure(Path(out_dir) / "snmf.png", record, results)


def _figure(path: Path, record: dict, results) -> None:
    """Each layer's features sorted by stability, against the shuffled-neuron null: how many come back?"""
    import numpy as np

    from .plots import line_plot

    series, nulls, single = {}, {}, len(results) == 1
    for r in results:
        for check, label in ((r.split_half, "split-half"), (r.seed_check, "second seed")):
            if check is None or (label == "second seed" and not single and r.split_half is not None):
                continue  # several layers: one curve each (split-half when there is one) keeps the plot readable
            name = label if single else f"layer {r.layer} {label}"
            series[f"{name} |cos|"] = (np.sort(check.cosine)[::-1], None)
            nulls[f"{name} null (95%)"] = check.null_threshold  # per layer: the nulls differ (layer 5: 0.65, 15: 0.19)
    if not series:  # no stability check: the features' energies instead
        series = {f"layer {r.layer} energy": (r.fit.energy, None) for r in results}
    fit = results[0].fit
    errors = f" (error SNMF {fit.relative_error:.2f}, SVD {fit.svd_relative_error:.2f})" if single else ""
    line_plot(path, np.arange(record["features"]), series, hlines=nulls, xlabel="feature (sorted by the curve's value)",
              ylabel="|cosine| with its partner" if nulls else "energy",
              title=f"SNMF of {SITE}, layer{'' if single else 's'} {', '.join(str(r.layer) for r in results[:6])}"
                    f"{errors}")


def _print(record: dict, out_dir) -> None:
    click.echo(f"{record['model']['ref']}  {SITE}: {record['n_tokens']} tokens of {record['texts']['n']} texts, "
               f"{record['width']} neurons per layer; {record['features']} features, each keeping "
               + (f"{record['keep']:.0%} of neurons" if record["keep"] < 1 else "every neuron (dense)"))
    click.echo(f"{'layer':>5}  {'rel err':>7}  {'SVD err':>7}  {'ratio':>5}  {'n90':>5}  {'split cos':>9}  "
               f"{'null':>5}  {'>null':>5}  {'seed cos':>8}  {'null':>5}  {'>null':>5}  {'iters':>5}  {'sec':>5}")
    for row in record["layers"]:
        split, seed = row["split_half"], row["seed_check"]
        click.echo(f"{row['layer']:>5}  {row['relative_error']:>7.3f}  {row['svd_relative_error']:>7.3f}  "
                   f"{row['error_ratio']:>5.2f}  {row['median_neurons_90']:>5.0f}  "
                   f"{_cell(split, 'median_cosine', 9)}  {_cell(split, 'null_cosine_95_of_max', 5)}  "
                   f"{_above(split, record['features'])}  "
                   f"{_cell(seed, 'median_cosine', 8)}  {_cell(seed, 'null_cosine_95_of_max', 5)}  "
                   f"{_above(seed, record['features'])}  "
                   f"{row['iterations']:>5}  {row['seconds']:>5.1f}")
    click.echo(f"n90: median neurons holding 90% of a feature's squared loading (a random direction: "
               f"{record['random_neurons_90']} of {record['width']}); cos: median |cos| of a feature's partners in "
               "two other fits; null: 95th percentile of the best |cos| with neurons shuffled; >null: features above it")
    for row in record["layers"]:
        click.echo(f"layer {row['layer']}, strongest features (energy: share of ||A||^2 each reconstructs alone):")
        for feature in row["features"][:5]:
            units = ", ".join(str(unit) for unit, _ in feature["top_neurons"][:4])
            contexts = " | ".join(token["context"][-40:] for token in feature["top_tokens"][:3])
            click.echo(f"  {feature['feature']:>3}  energy {feature['energy']:.3f}  neurons {units}  <- {contexts}")
    if out_dir:
        click.echo(f"saved snmf.json, snmf.npz and snmf.png in {out_dir}")


def _cell(check, key: str, width: int) -> str:
    return f"{'-':>{width}}" if check is None else f"{check[key]:>{width}.3f}"


def _above(check, features: int) -> str:
    return f"{'-':>5}" if check is None else f"{str(check['n_above_null']) + '/' + str(features):>5}"
