"""`mlxscan ica` and `mlxscan inhibit`: functional networks of MLP neurons, and switching them off or up."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import _BadInput, _layers_option, _progress, _split_list, main

DEFAULT_INHIBIT_NETWORKS = 10  # the paper inhibits ten networks; each costs 1 + draws passes of the held-out text


def _stimuli_file(name: str, option: str) -> Path:
    """stimuli/<name> beside the package in a checkout, or shipped inside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "stimuli" / name, here / "data" / name):
        if candidate.exists():
            return candidate
    raise _BadInput(f"stimuli/{name} not found; pass {option} FILE")


@main.command()
@click.argument("scan_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default=None, help="Model to scan first when no SCAN_DIR is given (default: bundled).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="Texts to scan first (every token, mlp_act; cached) when no SCAN_DIR is given "
                   "(default: stimuli/corpus.txt).")
@click.option("--components", type=int, default=20, show_default=True, help="Networks (independent components) per fit.")
@click.option("--per-layer", is_flag=True, help="One ICA per layer instead of all layers side by side.")
@click.option("--layers", "layers_spec", default=None, help="all (default), 12, 0,5,10 or 4-8 (model layers).")
@click.option("--threshold", type=float, default=3.6, show_default=True, help="|z| of a map above which a neuron is key.")
@click.option("--restarts", type=int, default=5, show_default=True, help="FastICA seeds; the sparsest solution is kept.")
@click.option("--no-split-half", is_flag=True, help="Skip the split-half consistency (two more fits).")
@click.option("--permutations", type=int, default=20, show_default=True, help="Neuron shuffles of the consistency null.")
@click.option("--keep-first-token", is_flag=True,
              help="Keep each text's position 0 (the attention sink; left out by default: its norm dwarfs the rest).")
@click.option("--surrogates", type=int, default=3, show_default=True,
              help="Covariance-matched Gaussian surrogates the split-half claim is judged against.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save ica.json, ica.npz, key_neurons.json and ica.png here.")
def ica(scan_dir, model_ref, texts_path, components, per_layer, layers_spec, threshold, restarts, no_split_half,
        permutations, keep_first_token, surrogates, seed, as_json, out_dir):
    """Functional networks: spatial ICA of every token's MLP neurons, their key neurons, layers and consistency."""
    from .experiments.networks import run_ica
    from .store import open_scan

    if scan_dir is not None and (model_ref or texts_path):
        raise _BadInput("give either SCAN_DIR or --model/--texts, not both")
    if components < 1 or restarts < 1 or permutations < 1 or not threshold > 0:
        raise _BadInput("--components, --restarts and --permutations must be at least 1, --threshold positive")
    if surrogates < 1 and not no_split_half:
        raise _BadInput("--surrogates must be at least 1: the split-half claim is judged against them")
    outcome = run_ica(
        scan=open_scan(scan_dir) if scan_dir else None, model_ref=model_ref,
        texts_path=None if scan_dir else (texts_path or _stimuli_file("corpus.txt", "--texts")),
        components=components, per_layer=per_layer, layers=_layers_option(layers_spec), threshold=threshold,
        restarts=restarts, seed=seed, split_half=not no_split_half, permutations=permutations,
        keep_first_token=keep_first_token, surrogates=surrogates, say=_progress(as_json), scan_progress=_scan_bar(as_json))
    record = outcome.to_dict()
    if out_dir:
        _save_ica(out_dir, outcome, record)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_ica(record, out_dir)


def _scan_bar(as_json: bool):
    from .capture.scan import ProgressBar

    return ProgressBar("scan", enabled=None if not as_json else False)


def _save_ica(out_dir: Path, outcome, record: dict) -> None:
    from .outputs import write_outputs
    from .plots import heatmap

    write_outputs(out_dir, {"ica.json": record, "ica.npz": outcome.arrays(), "key_neurons.json": outcome.key_neurons()})
    heatmap(Path(out_dir) / "ica.png", outcome.key_per_layer(), title="key neurons per layer, by network",
            xlabel="layer (position in the scan's layers)", ylabel="network", origin="upper")


def _print_ica(record: dict, out_dir) -> None:
    fit = record["fits"][0]
    split = fit["split_half"]
    click.echo(f"{record['model']['ref']}  {record['site']}: {record['n_tokens']} tokens of {record['texts']['n']} texts, "
               f"{len(record['layers'])} layers x {record['width']} neurons"
               f"{' (one ICA per layer)' if record['per_layer'] else ' side by side'}; {record['components']} "
               f"components, key neurons |z| > {record['threshold']}")
    click.echo(f"{'network':>8}  {'key':>5}  {'layers':>7}  {'n':>3}  {'peak':>4}  {'var %':>5}  {'split r':>7}  "
               f"{'IoU':>5}  above null")
    for row in record["networks"]:
        spread = {int(layer): count for layer, count in row["layers"].items()}
        span = f"{row['layer_range'][0]}-{row['layer_range'][1]}" if spread else "-"
        peak = str(max(spread, key=spread.get)) if spread else "-"
        r, iou = row["split_half_r"], row["split_half_iou"]
        click.echo(f"{row['network']:>8}  {row['n_key']:>5}  {span:>7}  {len(spread):>3}  {peak:>4}  "
                   f"{100 * row['variance_explained']:>5.2f}  {_number(r, 7, 3)}  {_number(iou, 5, 2)}  "
                   f"{'-' if row['above_null'] is None else ('yes' if row['above_null'] else 'no')}")
    if split is not None:
        click.echo(f"split-half: fits on two halves of the texts ({split['n_half_a_texts']} texts each side); null: "
                   f"95th percentile of the best |r| after shuffling neurons = {split['null_correlation_95_of_max']:.3f}"
                   f"{' (layer ' + str(fit['layers'][0]) + ')' if record['per_layer'] else ''}")
    timings = record["timings_s"]
    click.echo("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items() if seconds is not None))
    click.echo("layers: range of layers holding key neurons, n of them, peak the layer with most; var %: variance of "
               "the z-scored signals the network explains")
    if out_dir:
        click.echo(f"saved ica.json, ica.npz, key_neurons.json and ica.png in {out_dir}")


def _number(value, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


@main.command()
@click.argument("ica_out", type=click.Path(path_type=Path))
@click.option("--heldout", "heldout_path", type=click.Path(path_type=Path), default=None,
              help="Texts to measure perplexity on (default: stimuli/corpus_heldout.txt).")
@click.option("--networks", "networks_spec", default=None,
              help=f"Comma-separated network names, or all (default: the first {DEFAULT_INHIBIT_NETWORKS} with key neurons).")
@click.option("--mode", type=click.Choice(["zero", "scale", "add"]), default="zero", show_default=True,
              help="Switch key neurons off, multiply them by --factor, or add --value to them.")
@click.option("--factor", type=float, default=2.0, show_default=True, help="Multiplier of --mode scale.")
@click.option("--value", type=float, default=1.0, show_default=True, help="What --mode add adds.")
@click.option("--random-draws", "draws", type=int, default=5, show_default=True,
              help="Random neuron sets per network (same count, same layers).")
@click.option("--readout", is_flag=True, help="Also the category-probe accuracy at the last layer (slower).")
@click.option("--stimuli", "stimuli_path", type=click.Path(path_type=Path), default=None,
              help="Stimuli of --readout (default: stimuli/categories.jsonl).")
@click.option("--model", "model_ref", default=None, help="Model to use instead of the one ica.json names.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save inhibit.json, inhibit.npz and inhibit.png here.")
def inhibit(ica_out, heldout_path, networks_spec, mode, factor, value, draws, readout, stimuli_path, model_ref,
            batch_size, seed, as_json, out_dir):
    """Perplexity with each network's key neurons switched off (or amplified), against random neurons.

    ICA_OUT is the --out folder of `mlxscan ica` (or any key_neurons.json {network: {layer: [units]}}).
    """
    from .experiments.networks import model_of_record, read_key_neurons, readout_baseline, run_inhibition
    from .models import load
    from .stimuli import read_texts

    if batch_size < 1:
        raise _BadInput("--batch-size must be at least 1")
    networks = _chosen_networks(read_key_neurons(ica_out), networks_spec)
    texts = read_texts(heldout_path or _stimuli_file("corpus_heldout.txt", "--heldout"))
    say = _progress(as_json)
    model = load(model_ref) if model_ref else model_of_record(_ica_model(ica_out))
    baseline = readout_baseline(model, stimuli_path or _stimuli_file("categories.jsonl", "--stimuli"), seed=seed,
                                say=say) if readout else None
    result = run_inhibition(model, networks, texts, mode=mode, factor=factor, value=value, draws=draws, seed=seed,
                            batch_size=batch_size, readout=baseline, say=say)
    record = result.to_dict()
    if out_dir:
        _save_inhibit(out_dir, result, record)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_inhibit(record, out_dir)


def _chosen_networks(networks: dict, spec: str | None) -> dict:
    """Named networks; by default (or `all`) only those with key neurons: there is nothing to switch off in the rest."""
    if spec in (None, "all"):
        chosen = {name: units for name, units in networks.items() if any(units.values())}
        if not chosen:
            raise _BadInput("no network has key neurons; rerun `mlxscan ica` with a lower --threshold")
        return chosen if spec == "all" else dict(list(chosen.items())[:DEFAULT_INHIBIT_NETWORKS])
    names = _split_list(spec, "--networks")
    unknown = [name for name in names if name not in networks]
    if unknown or not names:
        shown = ", ".join(list(networks)[:12]) + (", ..." if len(networks) > 12 else "")
        raise _BadInput(f"--networks {spec!r}: no network {unknown[0] if unknown else ''!r}; the file has {shown}")
    return {name: networks[name] for name in names}


def _ica_model(ica_out: Path) -> dict:
    """The model record of ica.json beside the key neurons."""
    folder = ica_out if ica_out.is_dir() else ica_out.parent
    path = folder / "ica.json"
    if not path.exists():
        raise _BadInput(f"{path} not found, so the model is unknown; pass --model")
    try:
        return json.loads(path.read_text())["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise _BadInput(f"{path} is not an `mlxscan ica` record; pass --model") from error


def _save_inhibit(out_dir: Path, result, record: dict) -> None:
    """inhibit.json, inhibit.npz and a plot of log perplexity (nats per token: one broken network can raise
    perplexity a thousandfold, which would flatten every other point on a linear axis)."""
    import numpy as np

    from .outputs import write_outputs
    from .plots import line_plot

    rows = record["networks"]
    random_logs = [np.log(row["random_perplexity"]) for row in rows]
    mean, sd = np.array([v.mean() for v in random_logs]), np.array([v.std(ddof=1) for v in random_logs])
    write_outputs(out_dir, {"inhibit.json": record, "inhibit.npz": result.arrays()})
    line_plot(Path(out_dir) / "inhibit.png", list(range(len(rows))),
              {f"key neurons ({record['mode']})": (np.log([row["perplexity"] for row in rows]), None),
               "random neurons (mean +/- 1 sd)": (mean, (mean - sd, mean + sd))},
              title=f"held-out log perplexity, key neurons {record['mode']}", xlabel="network (row of the table)",
              ylabel="log perplexity (nats per token)", hlines={"baseline": float(np.log(record["baseline_perplexity"]))})


def _print_inhibit(record: dict, out_dir) -> None:
    how = {"zero": "set to 0", "scale": f"multiplied by {record['factor']}", "add": f"+ {record['value']}"}[record["mode"]]
    readout = record["baseline_readout_accuracy"] is not None
    click.echo(f"{record['model']}  key neurons {how}; held-out: {record['heldout']['n_texts']} texts, "
               f"{record['heldout']['n_predicted_tokens']} predicted tokens; control: {record['random_draws']} random "
               "draws of as many neurons in the same layers")
    click.echo(f"baseline perplexity {record['baseline_perplexity']:.3f}"
               + (f"; category readout accuracy {record['baseline_readout_accuracy']:.3f}" if readout else ""))
    header = (f"{'network':>8}  {'neurons':>7}  {'perplexity':>11}  {'random mean ± sd':>20}  {'Δ net':>11}  "
              f"{'Δ random':>9}  {'ratio':>7}  {'p':>5}")
    click.echo(header + (f"  {'readout':>7}  {'random':>6}" if readout else ""))
    for row in record["networks"]:
        ratio = "inf" if row["ratio"] is None else f"{row['ratio']:.1f}"
        line = (f"{row['network']:>8}  {row['n_neurons']:>7}  {row['perplexity']:>11.2f}  "
                f"{row['random_mean']:>11.2f} ± {row['random_sd']:<6.2f}  {row['delta']:>+11.2f}  "
                f"{row['random_delta']:>+9.2f}  {ratio:>7}  {row['p_random']:>5.2f}")
        if readout:
            line += f"  {row['readout_accuracy']:>7.3f}  {row['random_readout_mean']:>6.3f}"
        click.echo(line)
    click.echo("ratio: Δ net / Δ random (perplexity change against baseline); p: (1 + draws changing log perplexity "
               f"at least as much) / (1 + draws), so never below {1 / (1 + record['random_draws']):.2f}")
    timings = record["timings_s"]
    click.echo(f"time: {timings['total']:.1f} s for {timings['perplexity_passes']} perplexity passes of the held-out "
               f"texts" + (f" and {timings['readout_passes']} of the readout stimuli" if readout else ""))
    if out_dir:
        click.echo(f"saved inhibit.json, inhibit.npz and inhibit.png in {out_dir}")
