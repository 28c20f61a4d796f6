"""`mlxscan selectivity` and `mlxscan directions`: units and concept directions from a scan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli import _BadInput, _default_stimuli, _layers_option, _progress, main

DPRIME = "d'"  # the header of the d' column
SITE_HELP = "Per-layer site: resid_post (residual dimensions) or mlp_act (MLP neurons), or any other scanned site."


def _layer_counter(quiet: bool, verb: str):
    if quiet or not sys.stderr.isatty():
        return None
    return lambda done, total: click.echo(f"\rmlxscan: {verb} {done}/{total} layers", err=True, nl=done == total)


def _source(scan_dir, model_ref, stimuli_path, as_json: bool) -> dict:
    """The keyword arguments naming what to analyse: a scan folder, or a model and stimuli to scan (cached)."""
    from .capture.scan import ProgressBar
    from .store import open_scan

    if scan_dir is not None and (model_ref or stimuli_path):
        raise _BadInput("give either SCAN_DIR or --model/--stimuli, not both")
    return {"scan": open_scan(scan_dir) if scan_dir else None, "model_ref": model_ref,
            "stimuli_path": None if scan_dir else (stimuli_path or _default_stimuli()),
            "say": _progress(as_json), "scan_progress": ProgressBar("scan", enabled=None if not as_json else False)}


def _scan_options(command):
    """SCAN_DIR | --model/--stimuli, --site and --layers: what both commands read."""
    for option in reversed([
        click.argument("scan_dir", required=False, type=click.Path(path_type=Path)),
        click.option("--model", "model_ref", default=None,
                     help="Model to scan first (cached, word-pooled) when no SCAN_DIR is given (default: bundled)."),
        click.option("--stimuli", "stimuli_path", type=click.Path(path_type=Path), default=None,
                     help="Stimuli to scan first when no SCAN_DIR is given (default: stimuli/categories.jsonl)."),
        click.option("--site", default="resid_post", show_default=True, help=SITE_HELP),
        click.option("--layers", "layers_spec", default=None, help="all (default), 12, 0,5,10 or 4-8 (model layers)."),
    ]):
        command = option(command)
    return command


@main.command()
@_scan_options
@click.option("--k", type=int, default=20, show_default=True, help="Top units per category.")
@click.option("--halvings", type=int, default=100, show_default=True, help="Random splits of each category's words.")
@click.option("--permutations", type=int, default=1000, show_default=True, help="Label shuffles across words.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save selectivity.json, selectivity.npz and selectivity.png here.")
def selectivity(scan_dir, model_ref, stimuli_path, site, layers_spec, k, halvings, permutations, seed, as_json,
                out_dir):
    """Most category-selective units per layer, against a word-shuffled null, and whether they replicate."""
    from .experiments.units import run_selectivity, save_selectivity

    if k < 1 or halvings < 1 or permutations < 1:
        raise _BadInput("--k, --halvings and --permutations must be at least 1")
    layers = _layers_option(layers_spec)
    outcome = run_selectivity(**_source(scan_dir, model_ref, stimuli_path, as_json), site=site, layers=layers, k=k,
                              halvings=halvings, permutations=permutations, seed=seed,
                              progress=_layer_counter(as_json, "analysed"))
    record = outcome.to_dict()
    if out_dir:
        save_selectivity(out_dir, outcome, record)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_selectivity(record, out_dir)


def _print_selectivity(record: dict, out_dir) -> None:
    stimuli = record["stimuli"]
    click.echo(f"{record['model']['ref']}  site {record['site']} ({record['width']} units)  {len(record['classes'])} "
               f"categories, {stimuli['n_words']} words, {stimuli['n']} stimuli  k={record['k']}")
    click.echo(f"null: {record['permutations']} shuffles of labels across words (p: maxT over units and categories); "
               f"replicability: {record['halvings']} random halvings of each category's words")
    click.echo(f"{'layer':>5}  {'best unit (category)':<24} {DPRIME:>6}  {'p':>7}  {'overlap':>7}  "
               f"{'95% of halvings':>15}  {'shuffled':>8}  {'chance':>6}  {'>chance95':>9}")
    for row in record["layers"]:
        best, overlap = row["best"], row["overlap"]
        unit = f"{best['unit']} ({best['class']})"
        click.echo(f"{row['layer']:>5}  {unit:<24} {best['dprime']:>6.2f}  {best['p']:>7.4f}  {overlap['mean']:>7.3f}  "
                   f"[{overlap['ci'][0]:.3f}, {overlap['ci'][1]:.3f}]  {overlap['shuffled_mean']:>8.3f}  "
                   f"{overlap['chance']:>6.3f}  {overlap['fraction_above_chance']:>9.2f}")
    layers = record["layers"]
    click.echo(f"layers whose best unit beats the null (Holm over layers, p < 0.05): "
               f"{sum(row['selective_holm'] for row in layers)}/{len(layers)}")
    top = max(layers, key=lambda row: row["overlap"]["mean"])
    click.echo(f"by category at layer {top['layer']} (the highest mean overlap):")
    for row in top["classes"]:
        click.echo(f"  {row['class']:<16} best unit {row['top_units'][0]:>5}  d' {row['top_dprime'][0]:5.2f}  "
                   f"p {row['top_p'][0]:.4f}  overlap {row['overlap']:.3f} [{row['overlap_ci'][0]:.3f}, "
                   f"{row['overlap_ci'][1]:.3f}]")
    click.echo(f"p: fraction of word shuffles whose best unit reaches this d' (maxT; in the table over all units and "
               f"categories, by category over units; the smallest possible is 1/{record['permutations'] + 1})")
    click.echo(f"overlap: top-{record['k']} sets of two word-disjoint halves, |A∩B|/k; shuffled: the same with "
               "categories shuffled across words (the control); chance = k/n_units; >chance95: fraction of "
               "(halving, category) overlaps above chance's 95th percentile (~0.05 by chance)")
    if out_dir:
        click.echo(f"saved selectivity.json, selectivity.npz and selectivity.png in {out_dir}")


@main.command()
@_scan_options
@click.option("--C", "C", type=float, default=1.0, show_default=True, help="Inverse L2 strength of the probes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split-half control.")
@click.option("--json", "as_json", is_flag=True, help="Print directions.json instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for directions_mean.npy, directions_probe.npy, directions_control.npz, directions.json.")
def directions(scan_dir, model_ref, stimuli_path, site, layers_spec, C, seed, as_json, out_dir):
    """Concept directions per category and layer: class-mean differences and probe weights, saved as .npy."""
    from .experiments.units import run_directions, save_directions

    if not C > 0:
        raise _BadInput("--C must be positive")
    layers = _layers_option(layers_spec)
    outcome = run_directions(**_source(scan_dir, model_ref, stimuli_path, as_json), site=site, layers=layers, C=C,
                             seed=seed, progress=_layer_counter(as_json, "fitted"))
    record = outcome.to_dict()
    save_directions(out_dir, outcome, record)
    if as_json:
        click.echo(json.dumps(record))
        return
    click.echo(f"{record['model']['ref']}  site {record['site']}  {len(record['classes'])} categories  "
               f"directions {' x '.join(map(str, record['shape']))} (layer, category, unit)")
    click.echo(f"{'layer':>5}  {'cos(mean, probe)':>16}  {'split-half cos':>14}  {'shuffled words':>14}")
    for row in record["layers_summary"]:
        halves, control = row["split_half_cosine"], row["split_half_cosine_shuffled"]
        click.echo(f"{row['layer']:>5}  {_mean(row['mean_probe_cosine']):>16.3f}  {_mean(halves):>14.3f}  "
                   f"{_mean(control):>14.3f}")
    click.echo("means over categories; split-half cos: the mean direction found on two word-disjoint halves of each "
               "category; shuffled words: the same with labels shuffled across words (the control)")
    click.echo("saved directions_mean.npy, directions_probe.npy, directions_control.npz and directions.json "
               f"in {out_dir}")


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")
