"""`mlxscan ablate`, `mlxscan steer` and `mlxscan invariance`: the causal experiments.

Each scans a word subsample of the stimuli (cached), reruns it under interventions, prints a table,
and with --out writes <name>.json, <name>.npz (the arrays behind the numbers) and a PNG. Options are
checked before anything runs, so bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from .cli import _BadInput, _default_stimuli, _progress, main


def _numbers(value: str, name: str) -> tuple[float, ...]:
    """'0.25,0.5,1' as floats; anything else is one-line bad input."""
    try:
        numbers = tuple(float(item) for item in value.split(",") if item.strip())
    except ValueError as error:
        raise _BadInput(f"{name} must be comma-separated numbers, for example 0.25,0.5,1; got {value!r}") from error
    if not numbers:
        raise _BadInput(f"{name} is empty; give comma-separated numbers")
    return numbers


def _experiment_options(command):
    """The options every causal experiment takes: what to run on, where, and how to report."""
    options = [
        click.option("--model", "model_ref", default=None, help="Hugging Face folder or .gguf (default: bundled SmolLM2-135M-Instruct)."),
        click.option("--stimuli", "stimuli_path", type=click.Path(path_type=Path), default=None,
                     help="Stimulus set (.jsonl; default: stimuli/categories.jsonl)."),
        click.option("--per-category", type=int, default=3, show_default=True,
                     help="Words drawn per category (whole words, seeded); 0 keeps every word."),
        click.option("--frames", type=int, default=4, show_default=True,
                     help="Frames (sentences) kept per word, the same for every word; 0 keeps all."),
        click.option("--layer", type=int, default=None, help="Intervention layer L (default: n_layers // 2)."),
        click.option("--readout-layer", type=int, default=None, help="Readout layer R (default: the last layer)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table."),
        click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
                     help="Also write the record (.json), its arrays (.npz) and a plot (.png) here."),
    ]
    return functools.reduce(lambda wrapped, option: option(wrapped), reversed(options), command)


def _load(model_ref, stimuli_path, per_category: int, frames: int):
    """The model and stimuli; --per-category and --frames of 0 mean everything."""
    from .models import load
    from .stimuli import load_stimuli

    if per_category < 0 or frames < 0:
        raise _BadInput("--per-category and --frames must be 0 (everything) or more")
    stimuli = load_stimuli(stimuli_path or _default_stimuli())
    return load(model_ref), stimuli, (per_category or None), (frames or None)


def _baseline(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json):
    from .capture.scan import ProgressBar
    from .experiments.causal import prepare_baseline

    return prepare_baseline(model, stimuli, layer=layer, readout_layer=readout_layer, per_category=per_category,
                            frames=frames, seed=seed, say=_progress(as_json),
                            scan_progress=ProgressBar("scan", enabled=False if as_json else None))


def _finish(record: dict, arrays: dict, out_dir, stem: str, as_json: bool, table, plot=None, *,
            claims_of: tuple[str, dict, Path] | None = None) -> None:
    """Write --out (record, arrays, plot), judge the command's claims from those files (claims_of: command,
    options, stimuli path), then print the record (claims under "claims") or the table and its claims."""
    from .command_claims import claims_lines, command_claims, output_folder
    from .outputs import write_outputs

    judged = []
    with output_folder(out_dir) as folder:
        write_outputs(folder, {f"{stem}.json": record, f"{stem}.npz": arrays})
        if claims_of is not None:
            command, options, stimuli_path = claims_of
            judged, record["claims"] = command_claims(command, folder, options, stimuli_path=stimuli_path)
        if plot is not None and out_dir:
            plot(Path(out_dir))
    if as_json:
        click.echo(json.dumps(record))
    else:
        for line in table(record) + claims_lines(judged):
            click.echo(line)
        if out_dir:
            click.echo(f"saved {stem}.json, {stem}.npz{' and PNG' if plot else ''}"
                       f"{', claims.json' if claims_of else ''} in {out_dir}")


def _claim_options(per_category, frames, seed) -> dict:
    """The options the claims' adapters read back (0 means everything, as on the command line)."""
    return {"per-category": per_category or 0, "frames": frames or 0, "seed": seed}


def _ci(pair, signed: bool = True, digits: int = 3) -> str:
    if pair is None or pair[0] is None:
        return "[  n/a  ]"
    form = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"[{form.format(pair[0])}, {form.format(pair[1])}]"


def _header(record: dict, what: str) -> list[str]:
    return [f"{what}: {record['model']}, {record['site']} at layer {record['layer']}, readout at layer "
            f"{record['readout_layer']}",
            f"{record['n_stimuli']} stimuli ({record['n_words']} words, {len(record['classes'])} categories); "
            f"intervals: 95% bootstrap over words; clean rerun matches the cached scan to "
            f"{record['rerun_matches_scan']:.1e}"]


# ---------------------------------------------------------------------------------------------
# ablate


@main.command()
@_experiment_options
@click.option("--k", type=int, default=20, show_default=True, help="Units ablated per arm.")
@click.option("--draws", type=int, default=10, show_default=True, help="Random draws of k units (the units' control).")
@click.option("--direction-draws", type=int, default=2, show_default=True,
              help="Random directions projected out (the direction's control); 0 skips them.")
@click.option("--ablate-mode", type=click.Choice(["mean", "zero"]), default="mean", show_default=True,
              help="Replace what is ablated with its clean mean, or with zero.")
def ablate(model_ref, stimuli_path, per_category, frames, layer, readout_layer, seed, as_json, out_dir, k, draws,
           direction_draws, ablate_mode):
    """Ablate each category's top-k units, k random units, or its direction; how much readout survives?

    ΔAUC = clean AUC - ablated AUC of the readout probe at the readout layer (the ablated category's
    own AUC for its own units and direction); KL and top-1 agreement of the next token.
    """
    from .experiments.ablation import check_ablation, run_ablation

    model, stimuli, per_category, frames = _load(model_ref, stimuli_path, per_category, frames)
    check_ablation(model, k, draws, direction_draws, ablate_mode)
    baseline = _baseline(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json)
    result = run_ablation(model, baseline, k=k, draws=draws, direction_draws=direction_draws, mode=ablate_mode,
                          say=_progress(as_json))
    _finish(result.to_dict(), result.arrays(), out_dir, "ablation", as_json, _ablation_table,
            lambda folder: _ablation_plot(folder, result.to_dict()),
            claims_of=("ablate", _claim_options(per_category, frames, seed), stimuli_path or _default_stimuli()))


ARM_LABELS = {"top_units": "top-{k} units (own)", "random_units": "{k} random units",
              "direction": "direction (own)", "random_direction": "random direction"}


def _ablation_table(record: dict) -> list[str]:
    lines = _header(record, f"ablation ({record['mode']} ablation)")
    lines.append(f"{'arm':<24} {'ΔAUC':>7}  {'95% CI':<17} {'KL nats':>7}  {'95% CI':<15} {'top-1 same':>10}  "
                 f"{'|Δx|/|x|':>8}")
    for arm in record["arms"]:
        label = ARM_LABELS[arm["name"]].format(k=record["k"]) + (f" x{arm['runs']}" if "random" in arm["name"] else "")
        change = next(iter(arm["relative_change"].values()))
        lines.append(f"{label:<24} {arm['mean_delta_auc']:>+7.3f}  {_ci(arm['mean_delta_auc_ci']):<17} "
                     f"{arm['kl']:>7.3f}  {_ci(arm['kl_ci'], signed=False):<15} {arm['top1_agreement']:>10.1%}  "
                     f"{change:>8.3f}")
    lines.append(f"top units against random units: p = {record['random_units_p']:.3f} "
                 "(share of random draws whose ΔAUC reaches the top units')")
    by_name = {arm["name"]: arm for arm in record["arms"]}
    lines.append(f"{'category':<14} {'clean AUC':>9}  {'ΔAUC top units':<26} {'ΔAUC direction':<26}")
    for c, category in enumerate(record["classes"]):
        cells = [f"{by_name[name]['delta_auc'][c]:+.3f} {_ci(by_name[name]['delta_auc_ci'][c])}"
                 for name in ("top_units", "direction")]
        lines.append(f"{category:<14} {record['clean_auc'][category]:>9.3f}  {cells[0]:<26} {cells[1]:<26}")
    lines.append(f"control: {record['control']}")
    return lines


def _ablation_plot(folder: Path, record: dict) -> None:
    from .plots import line_plot

    # The plots' font is ASCII: no Greek letters in labels.
    series = {}
    for arm in record["arms"]:
        values = [math.nan if v is None else v for v in arm["delta_auc"]]
        bands = ([math.nan if c[0] is None else c[0] for c in arm["delta_auc_ci"]],
                 [math.nan if c[1] is None else c[1] for c in arm["delta_auc_ci"]])
        series[ARM_LABELS[arm["name"]].format(k=record["k"])] = (values, bands)
    line_plot(folder / "ablation.png", list(range(len(record["classes"]))), series,
              title=f"ablation at layer {record['layer']}, readout at {record['readout_layer']}",
              xlabel="category (index into classes)", ylabel="AUC drop (clean - ablated)", hlines={"no change": 0.0})


# ---------------------------------------------------------------------------------------------
# steer


@main.command()
@_experiment_options
@click.option("--alphas", default=None,
              help="Steering strengths in typical residual norms at L (default 0.125,0.25,0.5,1,2).")
@click.option("--additivity-alpha", type=float, default=0.125, show_default=True,
              help="α injected at each of N layers (against N·α at one layer).")
@click.option("--max-layers", type=int, default=8, show_default=True, help="Largest N of the additivity test.")
@click.option("--steer-alpha", type=float, default=0.5, show_default=True,
              help="α at which each category's steerability is measured.")
@click.option("--generate", "prompt", default=None,
              help="Instead of the analyses: greedy continuations of PROMPT, plain and steered at each α.")
@click.option("--category", default=None, help="Category steered toward with --generate (default: the first).")
@click.option("--max-tokens", type=int, default=20, show_default=True, help="Tokens generated with --generate.")
@click.option("--random-draws", type=int, default=10, show_default=True,
              help="Random directions of the same norm at --steer-alpha: the control of the shifts claim (2 or more).")
def steer(model_ref, stimuli_path, per_category, frames, layer, readout_layer, seed, as_json, out_dir, alphas,
          additivity_alpha, max_layers, steer_alpha, prompt, category, max_tokens, random_draws):
    """Add a category direction to the residual: additivity, dose-response, steerability vs dimensionality.

    The effect is the concept shift at the readout layer (movement along the category's readout
    direction in units of its clean separation) of stimuli not of that category. With --generate,
    shows what the direction does to text instead.
    """
    from .experiments.causal import category_index, check_layers
    from .experiments.steering import DEFAULT_ALPHAS, DEFAULT_GENERATE_ALPHAS, check_steering, run_steering

    model, stimuli, per_category, frames = _load(model_ref, stimuli_path, per_category, frames)
    grid = _numbers(alphas, "--alphas") if alphas else (DEFAULT_GENERATE_ALPHAS if prompt else DEFAULT_ALPHAS)
    check_layers(model, layer, readout_layer)
    if prompt is not None:
        target = category_index(stimuli.categories, category)
        _generate(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json, out_dir, prompt,
                  stimuli.categories[target], grid, max_tokens)
        return
    if category is not None:
        raise _BadInput("--category chooses the direction of --generate; the analyses steer every category")
    check_steering(grid, additivity_alpha, steer_alpha, max_layers)
    if random_draws < 2:
        raise _BadInput(f"--random-draws {random_draws}: the random-direction control needs 2 draws or more")
    baseline = _baseline(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json)
    result = run_steering(model, baseline, alphas=grid, additivity_alpha=additivity_alpha, steer_alpha=steer_alpha,
                          max_layers=max_layers, random_draws=random_draws, say=_progress(as_json))
    _finish(result.to_dict(), result.arrays(), out_dir, "steering", as_json, _steering_table,
            lambda folder: _steering_plots(folder, result.to_dict()),
            claims_of=("steer", _claim_options(per_category, frames, seed), stimuli_path or _default_stimuli()))


def _generate(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json, out_dir, prompt, category,
              grid, max_tokens) -> None:
    from .experiments.causal import check_finite
    from .experiments.steering import generate_steered

    check_finite(grid, "--alphas")
    if not prompt.strip() or not 1 <= max_tokens <= 200:
        raise _BadInput("--generate needs a prompt with some text, and --max-tokens must lie in 1..200")
    baseline = _baseline(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json)
    result = generate_steered(model, prompt, baseline.directions[baseline.classes.index(category)],
                              layer=baseline.layer, typical_norm=baseline.typical_norm, alphas=grid,
                              max_tokens=max_tokens, category=category, say=_progress(as_json))
    _finish(result.to_dict(), result.arrays(), out_dir, "steering_generation", as_json, _generation_table)


def _generation_table(record: dict) -> list[str]:
    lines = [f"steering toward {record['category']!r} at layer {record['layer']} ({record['model']}); α in typical "
             f"residual norms ({record['typical_norm']:.1f}); greedy, {record['max_tokens']} tokens at most",
             f"prompt: {record['prompt']}",
             f"{'α':>6}  {'NLL':>5}  {'distinct':>8}  continuation"]
    for row in record["continuations"]:
        nll = "  n/a" if row["plain_nll"] is None else f"{row['plain_nll']:>5.2f}"
        distinct = "n/a" if row["distinct"] is None else f"{row['distinct']:.2f}"
        label = "plain" if row["alpha"] == 0 else f"{row['alpha']:g}"
        lines.append(f"{label:>6}  {nll}  {distinct:>8}  {row['text']!r}")
    lines.append("NLL: mean -log p of the continuation under the plain model (rises as text breaks down); "
                 "distinct: share of distinct tokens (falls as it repeats)")
    return lines


def _steering_table(record: dict) -> list[str]:
    lines = _header(record, "steering")
    lines.append(f"effect = concept shift at layer {record['readout_layer']}: movement along the target category's "
                 "readout direction / its clean separation, over stimuli of other categories")
    lines.append(f"(a) additivity: α = {record['additivity_alpha']:g} at N layers from {record['layer']} "
                 "against N·α at one layer")
    lines.append(f"{'N':>3}  {'spread':>7}  {'single':>7}  {'ratio':>6}  95% CI")
    for row in record["additivity"]:
        lines.append(f"{row['n_layers']:>3}  {row['spread_shift']:>7.3f}  {row['single_shift']:>7.3f}  "
                     f"{row['ratio']:>6.3f}  {_ci(row['ratio_ci'], signed=False)}")
    lines.append(f"(b) dose-response (α in typical residual norms at layer {record['layer']}: "
                 f"{record['typical_norm']:.1f}); monotonic: {'yes' if record['monotonic'] else 'NO'}")
    lines.append(f"{'α':>6}  {'shift':>7}  {'95% CI':<17} {'ΔP(target)':>10}  95% CI")
    for row in record["dose_response"]:
        lines.append(f"{row['alpha']:>6g}  {row['shift']:>+7.3f}  {_ci(row['shift_ci']):<17} "
                     f"{row['probability_change']:>+10.3f}  {_ci(row['probability_change_ci'])}")
    correlation = record["correlation"]
    lines.append(f"(c) steerability (shift at α = {record['steer_alpha']:g}) against encoding dimensionality "
                 "(participation ratio at the layer, standardized)")
    lines.append(f"{'category':<14} {'shift':>7}  {'95% CI':<17} {'dimensionality':>14}")
    for category, row in record["steerability"].items():
        lines.append(f"{category:<14} {row['shift']:>+7.3f}  {_ci(row['ci']):<17} {row['dimensionality']:>14.2f}")
    if correlation["pearson"] is None:
        lines.append("correlation: undefined (fewer than 3 categories, or no spread)")
    else:
        lines.append(f"correlation over {correlation['n']} categories: Pearson r = {correlation['pearson']:+.2f} "
                     f"{_ci(correlation['pearson_ci'], digits=2)}, Spearman ρ = {correlation['spearman']:+.2f} "
                     f"{_ci(correlation['spearman_ci'], digits=2)} (bootstrap over categories; few points: "
                     "a wide interval)")
    lines.append(f"control: {record['control']}")
    return lines


def _steering_plots(folder: Path, record: dict) -> None:
    from .plots import line_plot

    doses = record["dose_response"]
    alphas = [0.0] + [row["alpha"] for row in doses]
    line_plot(folder / "steering.png", alphas,
              {"concept shift": ([0.0] + [row["shift"] for row in doses],
                                 ([0.0] + [row["shift_ci"][0] for row in doses],
                                  [0.0] + [row["shift_ci"][1] for row in doses])),
               "P(target) change": ([0.0] + [row["probability_change"] for row in doses],
                              ([0.0] + [row["probability_change_ci"][0] for row in doses],
                               [0.0] + [row["probability_change_ci"][1] for row in doses]))},
              title=f"dose-response: steering at layer {record['layer']}, read at {record['readout_layer']}",
              xlabel="alpha (typical residual norms)", ylabel="change toward the target category")
    rows = record["additivity"]
    line_plot(folder / "steering_additivity.png", [row["n_layers"] for row in rows],
              {"spread / single": ([row["ratio"] for row in rows],
                                   ([row["ratio_ci"][0] for row in rows], [row["ratio_ci"][1] for row in rows]))},
              title=f"additivity: a at N layers vs N*a at one (a = {record['additivity_alpha']:g})",
              xlabel="N layers", ylabel="ratio of concept shifts", hlines={"additive": 1.0})


# ---------------------------------------------------------------------------------------------
# invariance


@main.command()
@_experiment_options
@click.option("--factors", default="0.25,0.5,1,2,4", show_default=True, help="Scale factors (positive).")
@click.option("--tolerance", type=float, default=1e-5, show_default=True,
              help="Largest relative logit change the exact check (scaling before the final norm) allows.")
def invariance(model_ref, stimuli_path, per_category, frames, layer, readout_layer, seed, as_json, out_dir, factors,
               tolerance):
    """Scale the whole residual, or only its concept component, at a layer: what changes downstream?

    Also scales the last residual (before the final norm), where nothing may change: exits 1 if the
    logits move by more than --tolerance there.
    """
    from .experiments.causal import check_finite, check_layers
    from .experiments.invariance import run_invariance

    model, stimuli, per_category, frames = _load(model_ref, stimuli_path, per_category, frames)
    grid = check_finite(_numbers(factors, "--factors"), "--factors", positive=True)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise _BadInput(f"--tolerance must be a positive number, got {tolerance}")
    check_layers(model, layer, readout_layer)
    baseline = _baseline(model, stimuli, per_category, frames, layer, readout_layer, seed, as_json)
    result = run_invariance(model, baseline, factors=grid, tolerance=tolerance, say=_progress(as_json))
    _finish(result.to_dict(), result.arrays(), out_dir, "invariance", as_json, _invariance_table,
            lambda folder: _invariance_plots(folder, result.to_dict()),
            claims_of=("invariance", _claim_options(per_category, frames, seed), stimuli_path or _default_stimuli()))
    if not result.ok:
        worst = max(result.exact.max_relative_logit_change)
        click.echo(f"Error: exact check FAILED: scaling the last residual before the final norm moved the logits by "
                   f"{worst:.1e} (tolerance {tolerance:.0e}); the intervention machinery is not doing what it says",
                   err=True)
        sys.exit(1)


def _invariance_table(record: dict) -> list[str]:
    lines = _header(record, "invariance")
    lines.append("whole: the residual times the factor; concept: only its component along the stimulus' own "
                 "category direction")
    lines.append("KL: next token, clean || scaled (nats); shift: toward the own category at the readout layer, in "
                 "units of its clean separation")
    lines.append(f"{'factor':>6}  {'whole KL':>8}  {'top-1':>6}  {'shift':>7}  {'ΔP(own)':>7}  |  "
                 f"{'concept KL':>10}  {'top-1':>6}  {'shift':>7}  {'95% CI':<17} {'ΔP(own)':>7}")
    for row in record["rows"]:
        whole, concept = row["whole"], row["concept"]
        lines.append(f"{row['factor']:>6g}  {whole['kl']:>8.3f}  {whole['top1_agreement']:>6.1%}  "
                     f"{whole['shift']:>+7.3f}  {whole['probability_change']:>+7.3f}  |  {concept['kl']:>10.3f}  "
                     f"{concept['top1_agreement']:>6.1%}  {concept['shift']:>+7.3f}  {_ci(concept['shift_ci']):<17} "
                     f"{concept['probability_change']:>+7.3f}")
    lines.append(f"concept shift grows with the factor: {'yes' if record['concept_monotonic'] else 'NO'}")
    exact = record["exact_check"]
    worst = max(exact["max_relative_logit_change"], default=0.0)
    lines.append(f"exact check (layer {exact['layer']}, before the final norm, {exact['n_stimuli']} stimuli): "
                 f"largest relative logit change {worst:.1e}, largest KL {max(exact['max_kl'], default=0.0):.1e}: "
                 f"{'OK' if exact['ok'] else 'FAILED'} (tolerance {exact['tolerance']:.0e})")
    lines.append(f"control: {record['control']}")
    return lines


def _invariance_plots(folder: Path, record: dict) -> None:
    from .plots import line_plot

    rows = record["rows"]
    x = [math.log2(row["factor"]) for row in rows]
    for stem, key, label in (("invariance", "kl", "KL(clean || scaled), nats"),
                             ("invariance_shift", "shift", "concept shift toward the own category")):
        series = {way: ([row[way][key] for row in rows], None) for way in ("whole", "concept")}
        line_plot(folder / f"{stem}.png", x, series, xlabel="log2 factor", ylabel=label,
                  title=f"scaling the residual at layer {record['layer']}, read at {record['readout_layer']}")
