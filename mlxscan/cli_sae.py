"""`mlxscan sae train|eval`: sparse autoencoders on token-level scans."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .cli import _BadInput, _default_stimuli, _progress, main
from .cli_ica import _scan_bar, _stimuli_file


@main.group()
def sae():
    """Sparse autoencoders: train one on a token-level scan, evaluate it (or a published one)."""


class _TrainBar:
    """One line on a terminal's stderr: steps done, loss, FVU, L0 and dead features of the latest batch."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()

    def __call__(self, step: int, steps: int, metrics: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        filled = int(30 * step / steps)
        sys.stderr.write(f"\rsae [{'#' * filled}{'.' * (30 - filled)}] {step}/{steps} steps  loss {metrics['loss']:.4g}"
                         f"  FVU {metrics['fvu']:.3f}  L0 {metrics['l0']:.1f}  dead {metrics['dead']}"
                         f"  eta {elapsed / step * (steps - step):4.0f}s ")
        if step >= steps:
            sys.stderr.write("\n")
        sys.stderr.flush()


@sae.command("train")
@click.argument("scan_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default=None, help="Model to scan first when no SCAN_DIR is given (default: bundled).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="Texts to scan first (every token; cached) when no SCAN_DIR is given (default: stimuli/corpus.txt).")
@click.option("--site", default="resid_post", show_default=True, help="Per-layer site the SAE reads.")
@click.option("--layer", type=int, default=None, help="Layer (default: the middle one, n_layers // 2).")
@click.option("--architecture", type=click.Choice(["topk", "relu"]), default="topk", show_default=True,
              help="topk: k active features, AuxK for dead ones; relu: L1 penalty, dead features resampled.")
@click.option("--features", type=int, default=None, help="SAE width (default: 4 x the site's width).")
@click.option("--k", type=int, default=32, show_default=True, help="topk: active features per token.")
@click.option("--l1", "l1_coefficient", type=float, default=1.0, show_default=True,
              help="relu: L1 weight (inputs scaled to mean squared norm = width).")
@click.option("--skip-first", type=int, default=1, show_default=True,
              help="Leading positions of each text left out (the first token is an attention sink of huge norm).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the summary.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder of the SAE: cfg.json, sae_weights.safetensors, train.json, train.npz, train.png.")
def sae_train(scan_dir, model_ref, texts_path, site, layer, architecture, features, k, l1_coefficient, skip_first,
              steps, batch_size, learning_rate, seed, as_json, out_dir):
    """Train a sparse autoencoder on every token of one site at one layer."""
    from .sae.experiment import run_train
    from .sae.train import TrainSettings
    from .store import open_scan

    if scan_dir is not None and (model_ref or texts_path):
        raise _BadInput("give either SCAN_DIR or --model/--texts, not both")
    if min(steps, batch_size, k) < 1 or (features is not None and features < 1) or skip_first < 0:
        raise _BadInput("--steps, --batch-size, --k and --features must be at least 1, --skip-first at least 0")
    if not learning_rate > 0 or l1_coefficient < 0:
        raise _BadInput("--lr must be positive and --l1 non-negative")
    if out_dir.exists() and not out_dir.is_dir():
        raise _BadInput(f"--out {out_dir} is a file; give a folder")
    scan = open_scan(scan_dir) if scan_dir else None
    model = None
    if scan is None:
        from .models import load

        model = load(model_ref)
        layer = model.n_layers // 2 if layer is None else layer
        width = getattr(model, "d_mlp" if site == "mlp_act" else "d_model")
    else:
        layer = scan.layers[len(scan.layers) // 2] if layer is None else layer
        if layer not in scan.layers:
            raise _BadInput(f"--layer {layer} was not recorded; {scan.folder} has layers {scan.layers}")
        width = scan[site].shape[2] if site in scan.sites else 0
    settings = TrainSettings(architecture=architecture, d_sae=features or 4 * max(width, 1), k=k,
                             l1_coefficient=l1_coefficient, steps=steps, batch_size=batch_size,
                             learning_rate=learning_rate, seed=seed)
    if architecture == "topk" and k > settings.d_sae:
        raise _BadInput(f"--k {k} is more than the {settings.d_sae} features; lower --k or raise --features")
    outcome = run_train(scan=scan, model=model, texts_path=texts_path or _stimuli_file("corpus.txt", "--texts"),
                        site=site, layer=layer, settings=settings, skip_first=skip_first, say=_progress(as_json),
                        scan_progress=_scan_bar(as_json), progress=_TrainBar(not as_json))
    record = outcome.to_dict()
    _save_train(out_dir, outcome, record)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_train(record, out_dir)


def _save_train(out_dir: Path, outcome, record: dict) -> None:
    from .outputs import write_outputs
    from .plots import line_plot
    from .sae.io import sae_files

    history = outcome.result.history
    extra = {"training": {key: record[key] for key in ("settings", "input_scale", "seconds", "tokens_seen", "epochs",
                                                       "scan", "texts", "training_tokens")}}
    write_outputs(out_dir, {**sae_files(outcome.result.sae, extra), "train.json": record, "train.npz": outcome.arrays()})
    line_plot(Path(out_dir) / "train.png", history["step"],
              {"FVU (batch)": (history["fvu"], None), "dead fraction": (history["dead"] / record["d_sae"], None)},
              title=f"SAE training: {record['site']} layer {record['layer']}", xlabel="step",
              ylabel="fraction", ylim=(0, 1))


def _print_train(record: dict, out_dir: Path) -> None:
    settings, final = record["settings"], record["training_tokens"]
    sparsity = f"k={settings['k']}" if settings["architecture"] == "topk" else f"L1 {settings['l1_coefficient']}"
    click.echo(f"{record['model']['ref']}  {record['site']} layer {record['layer']}: {record['texts']['n']} texts, "
               f"{final['n_tokens']} tokens; {settings['architecture']} SAE {record['d_in']} -> {record['d_sae']} "
               f"({sparsity})")
    click.echo(f"trained {settings['steps']} steps x {settings['batch_size']} tokens ({record['epochs']:.1f} epochs) "
               f"in {record['seconds']:.1f} s" + (f"; {record['resampled']} features resampled"
                                                  if settings["architecture"] == "relu" else ""))
    click.echo(f"on the training tokens: FVU {final['fvu']:.4f}  L0 {final['l0']:.1f}  dead {final['dead']}/"
               f"{final['d_sae']}  dense (>{final['dense_threshold']:.0%} of tokens) {final['dense']}")
    click.echo(f"saved cfg.json, sae_weights.safetensors, train.json, train.npz and train.png in {out_dir}; "
               f"held-out numbers: mlxscan sae eval {out_dir}")


@sae.command("eval")
@click.argument("sae_path", type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default=None,
              help="Model to run (default: the one the SAE was trained on, else the bundled one).")
@click.option("--site", default=None, help="Site the SAE reads (default: from its files).")
@click.option("--layer", type=int, default=None, help="Layer the SAE reads (default: from its files).")
@click.option("--heldout", "heldout_path", type=click.Path(path_type=Path), default=None,
              help="Held-out texts for reconstruction and loss (default: stimuli/corpus_heldout.txt).")
@click.option("--stimuli", "stimuli_path", type=click.Path(path_type=Path), default=None,
              help="Category stimuli for localization and separability (default: stimuli/categories.jsonl).")
@click.option("--skip-first", type=int, default=None,
              help="Leading positions of each text the SAE leaves alone (default: from its files, else 1).")
@click.option("--no-splice", is_flag=True, help="Skip the spliced-in language-modelling loss.")
@click.option("--no-concepts", is_flag=True, help="Skip localization and separability on the category stimuli.")
@click.option("--target-accuracy", type=float, default=0.9, show_default=True,
              help="Balanced accuracy a category probe must reach in the localization test.")
@click.option("--dense-threshold", type=float, default=0.1, show_default=True,
              help="A feature firing on more than this fraction of tokens counts as dense.")
@click.option("--folds", type=int, default=5, show_default=True, help="Word-grouped folds of the localization probes.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the tables.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save eval.json, eval.npz and eval.png here.")
def sae_eval(sae_path, model_ref, site, layer, skip_first, heldout_path, stimuli_path, no_splice, no_concepts,
             target_accuracy, dense_threshold, folds, batch_size, seed, as_json, out_dir):
    """Reconstruction, spliced-in loss, localization and separability of an SAE (mlxscan, SAELens or Gemma Scope)."""
    from .sae.experiment import run_eval
    from .sae.io import load_sae
    from .stimuli import load_stimuli

    if not 0.5 < target_accuracy < 1 or not 0 < dense_threshold < 1:
        raise _BadInput("--target-accuracy must lie in (0.5, 1) and --dense-threshold in (0, 1)")
    if folds < 2 or batch_size < 1:
        raise _BadInput("--folds must be at least 2 and --batch-size at least 1")
    if skip_first is not None and skip_first < 0:
        raise _BadInput("--skip-first must be at least 0")
    sae = load_sae(sae_path, site=site, layer=layer, skip_first=skip_first)
    if sae.config.site is None or sae.config.layer is None:
        raise _BadInput(f"{sae_path} does not say which site and layer it reads; pass --site and --layer")
    heldout = heldout_path or _stimuli_file("corpus_heldout.txt", "--heldout")
    stimuli = None if no_concepts else load_stimuli(stimuli_path or _default_stimuli())
    outcome = run_eval(_eval_model(model_ref, sae), sae, heldout_path=heldout, stimuli=stimuli, splice=not no_splice,
                       target=target_accuracy, dense_threshold=dense_threshold, folds=folds, seed=seed,
                       batch_size=batch_size, say=_progress(as_json), scan_progress=_scan_bar(as_json))
    record = outcome.to_dict()
    if out_dir:
        _save_eval(out_dir, outcome, record)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_eval(record, out_dir)


def _eval_model(model_ref, sae):
    from .experiments.networks import model_of_record
    from .models import load

    if model_ref is not None or not sae.config.model:
        return load(model_ref)
    return model_of_record(sae.config.model)


def _save_eval(out_dir: Path, outcome, record: dict) -> None:
    import numpy as np

    from .outputs import write_outputs
    from .plots import line_plot

    write_outputs(out_dir, {"eval.json": record, "eval.npz": outcome.arrays()})
    located = outcome.localization
    if located is not None:
        shared = min(len(located.grid_neurons), len(located.grid_features))
        line_plot(Path(out_dir) / "eval.png", np.log2(located.grid_neurons[:shared]),
                  {"SAE features": (located.accuracy_features[:, :shared].mean(0), None),
                   "neurons": (located.accuracy_neurons[:, :shared].mean(0), None)},
                  title="one-vs-rest category probes on the top-k units", xlabel="log2(units)",
                  ylabel="balanced accuracy (mean)", hlines={"target": located.target}, ylim=(0.5, 1))
    else:
        frequency = np.sort(outcome.reconstruction.frequencies)[::-1]
        line_plot(Path(out_dir) / "eval.png", np.arange(frequency.size),
                  {"log10 firing frequency": (np.log10(np.maximum(frequency, 1e-7)), None)},
                  title="SAE feature firing frequency on held-out tokens", xlabel="feature (sorted)",
                  ylabel="log10 fraction of tokens")


def _print_eval(record: dict, out_dir) -> None:
    sae, rec = record["sae"], record["reconstruction"]
    click.echo(f"{record['model']}  {sae['layout']} {sae['architecture']} SAE on {sae['site']} layer {sae['layer']}: "
               f"{sae['d_in']} -> {sae['d_sae']}")
    click.echo(f"held-out reconstruction ({rec['n_tokens']} tokens): FVU {rec['fvu']:.4f}  L0 {rec['l0']:.1f}  "
               f"dead {rec['dead']} ({rec['dead_fraction']:.1%})  dense (>{rec['dense_threshold']:.0%} of tokens) "
               f"{rec['dense']}")
    down = record["downstream"]
    if down:
        loss, ppl = down["loss_per_token"], down["perplexity"]
        recovered = "-" if down["loss_recovered"] is None else f"{down['loss_recovered']:.3f}"
        click.echo(f"next-token loss ({down['n_predicted_tokens']} tokens): clean {loss['clean']:.4f} (ppl "
                   f"{ppl['clean']:.2f})  spliced {loss['spliced']:.4f} (ppl {ppl['spliced']:.2f})  zeroed "
                   f"{loss['zero']:.4f} (ppl {ppl['zero']:.2f})  loss recovered {recovered}")
    located = record["localization"]
    if located:
        click.echo(f"localization: fewest units whose one-vs-rest probe reaches balanced accuracy "
                   f"{located['target_balanced_accuracy']}")
        click.echo(f"{'category':>14}  {'neurons':>7}  {'features':>8}  {'ratio':>6}")
        for name, n, f, r in zip(located["classes"], located["needed_neurons"], located["needed_features"],
                                 located["ratios"]):
            click.echo(f"{name:>14}  {_count(n, located['grid_neurons']):>7}  {_count(f, located['grid_features']):>8}  "
                       f"{'-' if r is None else f'{r:.2f}':>6}")
        mean = located["geometric_mean_ratio"]
        click.echo(f"geometric mean ratio (neurons / features) over {located['n_both_reached']} categories: "
                   f"{'-' if mean is None else f'{mean:.2f}'}")
    if record["separability"]:
        click.echo(f"{'JS separability':>16}  {'live':>6}  {'mean':>6}  {'top 10%':>7}  {'null mean':>9}  "
                   f"{'null 95%':>8}  {'above null':>10}")
        for name, row in record["separability"].items():
            click.echo(f"{name:>16}  {row['n_live']:>6}  {row['mean']:>6.3f}  {row['mean_top_10pct']:>7.3f}  "
                       f"{row['null_mean']:>9.3f}  {row['null_threshold_95']:>8.3f}  {row['fraction_above_null']:>10.1%}")
    click.echo("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in record["timings_s"].items()))
    if out_dir:
        click.echo(f"saved eval.json, eval.npz and eval.png in {out_dir}")


def _count(value, grid) -> str:
    return f">{grid[-1]}" if value is None else str(value)
