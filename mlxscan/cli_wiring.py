"""`mlxscan wiring`: does a wiring-cost penalty make a small transformer modular?"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click

from .cli import _BadInput, _progress, main
from .cli_ica import _stimuli_file


class _TrainingBar:
    """One line per run on a terminal's stderr: steps, language-model loss, tokens/s, time left."""

    def __init__(self, tokens_per_step: int, enabled: bool):
        self.tokens_per_step, self.enabled = tokens_per_step, enabled and sys.stderr.isatty()
        self.label, self.started = None, time.perf_counter()

    def __call__(self, label: str, step: int, steps: int, loss: float) -> None:
        if not self.enabled:
            return
        if label != self.label:
            self.label, self.started = label, time.perf_counter()
        elapsed = time.perf_counter() - self.started
        filled = int(24 * step / steps)
        eta = elapsed / step * (steps - step)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (24 - filled)}] step {step}/{steps}  loss {loss:.3f}  "
                         f"{self.tokens_per_step * step / max(elapsed, 1e-9):,.0f} tok/s  eta {eta:4.0f}s ")
        if step >= steps:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _lambdas(value: str | None):
    if value is None:
        return None
    try:
        values = tuple(float(item) for item in value.split(",") if item.strip())
    except ValueError as error:
        raise _BadInput(f"--lambdas {value!r} is not a list of numbers; use e.g. 0,1e-4,1e-3") from error
    if not values:
        raise _BadInput("--lambdas is empty; use e.g. 0,1e-4,1e-3")
    return values


def _settings(quick: bool, lambdas, seeds, steps, layout, density):
    from .experiments.wiring import QUICK, SweepSettings

    base = QUICK if quick else SweepSettings()
    chosen = {name: value for name, value in (("lambdas", lambdas), ("seeds", seeds), ("steps", steps),
                                              ("layout", layout), ("density", density)) if value is not None}
    if chosen.get("steps", 1) < 1:
        raise _BadInput(f"--steps {steps} must be at least 1")
    return replace(base, **chosen)


@main.command()
@click.option("--quick", is_flag=True, help="A tiny model, 2 λ, 2 seeds, 40 steps: about a minute, for tests.")
@click.option("--lambdas", "lambdas_spec", default=None,
              help="Wiring-cost strengths, 0 first (the control); default 0,1e-5,1e-4,1e-3,1e-2 (quick: 0,3e-3).")
@click.option("--seeds", type=int, default=None, help="Seeds per λ (default 4; quick 2). A seed fixes init, layout and data order.")
@click.option("--steps", type=int, default=None, help="Training steps per run (default 500; quick 40).")
@click.option("--layout", type=click.Choice(["line", "sheet"]), default=None,
              help="Where units sit: on a line (default) or a 2-D sheet.")
@click.option("--density", type=float, default=None, help="Fraction of possible edges kept in both graphs (default 0.05).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="Training texts (default: stimuli/corpus.txt).")
@click.option("--heldout", "heldout_path", type=click.Path(path_type=Path), default=None,
              help="Validation texts (default: stimuli/corpus_heldout.txt).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save wiring.json, wiring.npz, claims.json, the plots and every run's checkpoint (runs/) here.")
def wiring(quick, lambdas_spec, seeds, steps, layout, density, texts_path, heldout_path, as_json, out_dir):
    """Train small transformers with a wiring cost λ·Σ|w|·distance and measure modularity against λ = 0.

    Every run is a fresh model; one seed fixes init, unit positions and data order across all λ. Q of the
    weight graph and of the functional connectome, paired by seed, go through the verification gate.
    """
    from .experiments.wiring import read_corpus, run_sweep

    settings = _settings(quick, _lambdas(lambdas_spec), seeds, steps, layout, density)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise _BadInput(f"--out {out_dir} is a file; give a folder")
    train_texts, validation_texts, corpus = read_corpus(
        texts_path or _stimuli_file("corpus.txt", "--texts"), heldout_path or _stimuli_file("corpus_heldout.txt", "--heldout"))
    staging = Path(tempfile.mkdtemp(prefix=".wiring-", dir=_staging_parent(out_dir)))
    try:
        sweep = run_sweep(settings, train_texts, validation_texts, corpus=corpus,
                          checkpoints=staging / "runs" if out_dir else None, say=_progress(as_json),
                          progress=_TrainingBar(settings.batch_size * settings.seq_len, not as_json))
        record = _judge_and_save(sweep, staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print(record, out_dir)


def _staging_parent(out_dir: Path | None) -> Path | None:
    """Beside --out (the same file system, so the final move is a rename), or the system's temp folder."""
    if out_dir is None:
        return None
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def _judge_and_save(sweep, staging: Path, out_dir: Path | None) -> dict:
    """Arrays first (the claims cite their sha256), then the judged record and plots; all moved into --out at the end."""
    from .claims import claims_record, file_record
    from .experiments.wiring import judge_sweep
    from .outputs import write_outputs

    if out_dir is None:
        return judge_sweep(sweep, []).to_dict()
    write_outputs(staging, {"wiring.npz": sweep.arrays()})
    judge_sweep(sweep, [file_record(staging / "wiring.npz", staging)])
    record = sweep.to_dict()
    write_outputs(staging, {"wiring.json": record, "claims.json": claims_record(sweep.claims)})
    _plots(staging, sweep)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "runs").exists():
        shutil.rmtree(out_dir / "runs")  # checkpoints of an earlier sweep in the same folder
    for entry in staging.iterdir():
        os.replace(entry, out_dir / entry.name)
    return record


def _plots(folder: Path, sweep) -> None:
    """wiring.png: Q of both graphs, local and total MLP weight mass against λ (mean, ±1 sd over seeds);
    wiring_loss.png: validation loss."""
    import numpy as np

    from .plots import line_plot

    lambdas = np.array(sweep.settings.lambdas)
    floor = int(np.floor(np.log10(lambdas[1:].min()))) - 1  # λ = 0 sits one decade below the smallest λ
    x = np.where(lambdas > 0, np.log10(np.where(lambdas > 0, lambdas, 1)), floor)
    xlabel = f"log10 lambda (lambda = 0 drawn at {floor})"  # the figures' font is ASCII: no λ

    def band(name):
        values = sweep.table(name)
        mean, sd = values.mean(axis=1), values.std(axis=1, ddof=1)
        return mean, (mean - sd, mean + sd)

    mass = sweep.table("mlp_weight_mass")
    line_plot(folder / "wiring.png", x, {"Q weight graph": band("weight_q"),
                                         "Q weight, random rewiring": band("weight_q_random"),
                                         "Q functional graph": band("functional_q"),
                                         "Q functional, random rewiring": band("functional_q_random"),
                                         "local share of MLP weight mass": band("local_mass"),
                                         "MLP weight mass / lambda = 0": ((mass / mass[0]).mean(axis=1), None)},
              title="modularity against wiring cost (mean +/- 1 sd over seeds)", xlabel=xlabel,
              ylabel="Q, or fraction", ylim=(0, 1.05), size=(800, 620))
    line_plot(folder / "wiring_loss.png", x, {"validation loss": band("validation_loss")},
              title="validation loss against wiring cost (mean +/- 1 sd)", xlabel=xlabel, ylabel="nats per token")


def _print(record: dict, out_dir) -> None:
    settings = record["settings"]
    click.echo(f"wiring cost sweep: {len(settings['lambdas'])} λ x {settings['seeds']} seeds, {settings['steps']} steps, "
               f"{settings['n_layers']} layers x {settings['d_mlp']} neurons (d_model {settings['d_model']}), "
               f"units on a {settings['layout']}, graph density {settings['density']}")
    click.echo(f"{'λ':>7} {'val loss':>8} {'Δ loss':>7} {'Σ|w|':>7} {'local':>5} | {'Q weight':>8} {'rewired':>7} "
               f"{'Δ excess [95% CI]':>24} | {'Q func':>6} {'rewired':>7} {'Δ excess [95% CI]':>24}")
    for row in record["by_lambda"]:
        effects = row.get("effects")

        def delta(name):
            if not effects:
                return "control"
            e = effects[name]
            return f"{e['mean']:+.3f} [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}]"
        click.echo(f"{row['lambda']:>7g} {row['validation_loss']['mean']:>8.3f} "
                   f"{(effects['validation_loss']['mean'] if effects else 0):>+7.3f} "
                   f"{row['mlp_weight_mass']['ratio_to_control']:>7.2g} {row['local_mass']['mean']:>5.3f} | "
                   f"{row['weight_q']['mean']:>8.3f} {row['weight_q_random']['mean']:>7.3f} {delta('weight_q_excess'):>24} | "
                   f"{row['functional_q']['mean']:>6.3f} {row['functional_q_random']['mean']:>7.3f} "
                   f"{delta('functional_q_excess'):>24}")
    for kind, spot in record["sweet_spot"].items():
        if not spot["positive"]:
            click.echo(f"sweet spot, {kind} graph: none, no λ raises excess Q (least drop {spot['mean_effect']:+.3f} at "
                       f"λ = {spot['lambda']:g})")
            continue
        shape = "interior peak (non-monotonic)" if spot["interior"] else "peak at the largest λ tested"
        click.echo(f"sweet spot, {kind} graph: λ = {spot['lambda']:g} (mean Δ excess Q {spot['mean_effect']:+.3f}); {shape}")
    click.echo("claims: excess Q over λ = 0, one-sided paired t over seeds, Holm over all:")
    for claim in record["claims"]:
        click.echo(f"  {claim['id']:<34} Δ {claim['effect']:+.3f}  p {claim['p']:.3g}  p_holm {claim['p_corrected']:.3g}  "
                   f"{claim['verdict']}")
    verdict = record["verdict"]
    graphs = ", ".join(f"{kind} graph {value}" for kind, value in verdict["by_graph"].items())
    click.echo(f"wiring cost raises modularity: {verdict['wiring cost raises modularity']} ({graphs}); "
               f"time {record['timings_s']['total']:.0f} s (training {record['timings_s']['training']:.0f} s)")
    click.echo("Σ|w|: MLP weight mass as a fraction of λ = 0's (same seed); local: share of it on the nearest 10% of "
               "neuron–dimension pairs (0.1 if place did not matter); Q: Louvain modularity of the 5%-density graph; "
               "rewired: Q of a degree-preserving random rewiring of it; excess: Q − rewired. Where Σ|w| is near 0 "
               "the MLP wiring is gone and Q describes leftover noise")
    if out_dir:
        click.echo(f"saved wiring.json, wiring.npz, claims.json, wiring.png, wiring_loss.png and runs/ in {out_dir}")
