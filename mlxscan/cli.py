"""The `mlxscan` command: a thin click layer over the library.

Heavy imports happen inside commands so `mlxscan --help` is instant. Library errors (MlxscanError)
become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

DTYPE_CHOICE = click.Choice(["float32", "float16", "bfloat16"])


class _BadInput(click.ClickException):
    exit_code = 2  # 1 is taken: it means "ran, and the check failed"


class _Group(click.Group):
    def invoke(self, ctx):
        from .errors import MlxscanError

        try:
            return super().invoke(ctx)
        except MlxscanError as error:
            raise _BadInput(str(error)) from error


@click.group(cls=_Group)
@click.version_option(package_name="mlxscan")
def main():
    """mlxscan: an fMRI for language models, in MLX."""


def _progress(quiet: bool):
    """Progress lines for a person at a terminal; nothing in pipes, logs or --json runs."""
    if quiet or not sys.stderr.isatty():
        return lambda message: None
    return lambda message: click.echo(f"mlxscan: {message}", err=True)


@main.command()
@click.option("--model", "model_ref", default=None, help="Hugging Face folder or .gguf file (default: bundled SmolLM2-135M-Instruct).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="Texts to compare on: .txt (one a line) or .jsonl (field \"text\"). Default: six built-in texts.")
@click.option("--dtype", type=DTYPE_CHOICE, default=None, help="dtype of the quantized-path drift check (default float32 on CPU).")
@click.option("--tolerance", type=float, default=None, help="Largest relative error allowed (default 1e-4).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of a table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Also save verify.json and the per-text errors (errors.npz) here.")
def verify(model_ref, texts_path, dtype, tolerance, as_json, out_dir):
    """Check MLX against transformers on the same weights: logits and every layer.

    Exits 1 when any relative error exceeds the tolerance.
    """
    from .verify import TOLERANCE, read_texts, verify as run_verify

    from .outputs import write_outputs

    texts = read_texts(texts_path) if texts_path else None
    report = run_verify(model_ref, texts, dtype=dtype, tolerance=tolerance or TOLERANCE, progress=_progress(as_json))
    if out_dir:
        write_outputs(out_dir, {"verify.json": report.to_dict(), "errors.npz": report.arrays})
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        _print_verify(report)
    sys.exit(0 if report.ok else 1)


def _default_stimuli() -> Path:
    """stimuli/categories.jsonl: beside the package in a checkout, or shipped inside it."""
    for candidate in (Path(__file__).resolve().parent.parent / "stimuli" / "categories.jsonl",
                      Path(__file__).resolve().parent / "data" / "categories.jsonl"):
        if candidate.exists():
            return candidate
    raise _BadInput("stimuli/categories.jsonl not found; pass --stimuli FILE")


def _split_list(value: str | None, name: str, cast=str):
    if value is None:
        return None
    try:
        return tuple(cast(item.strip()) for item in value.split(",") if item.strip())
    except ValueError as error:
        raise click.BadParameter(f"{name} must be a comma-separated list: {error}") from error


def _layers_option(value: str | None):
    """'all', '3', '0,5,10' or '4-8' (inclusive)."""
    if value is None or value == "all":
        return None
    layers = []
    try:
        for part in value.split(","):
            part = part.strip()
            if "-" in part[1:]:
                first, last = part.split("-", 1)
                if int(last) < int(first):
                    raise ValueError(part)
                layers.extend(range(int(first), int(last) + 1))
            elif part:
                layers.append(int(part))
    except ValueError as error:
        raise _BadInput(f"--layers {value!r} is not a layer list; use all, N, N,M or N-M (for example 0,5,10 or 4-8)") from error
    if not layers:
        raise _BadInput("--layers is empty; use all, N, N,M or N-M")
    return tuple(layers)


@main.command()
@click.option("--model", "model_ref", default=None, help="Hugging Face folder or .gguf file (default: bundled SmolLM2-135M-Instruct).")
@click.option("--stimuli", "stimuli_path", type=click.Path(path_type=Path), default=None,
              help="Stimulus set (.jsonl; default: stimuli/categories.jsonl).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="A text corpus instead (.txt one text a line, or .jsonl field \"text\"), e.g. stimuli/corpus.txt.")
@click.option("--sites", default="resid_post", show_default=True, help="Comma-separated per-layer sites.")
@click.option("--layers", "layers_spec", default=None, help="all (default), 12, 0,5,10 or 4-8.")
@click.option("--pool", type=click.Choice(["last", "mean", "word", "all"]), default="last", show_default=True,
              help="Pool each stimulus' tokens: last token, mean, the target word's tokens, or keep all tokens.")
@click.option("--dtype", "store_dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="dtype of the stored arrays (the model computes in its own dtype).")
@click.option("--model-dtype", type=DTYPE_CHOICE, default=None, help="dtype the model computes in (default float32 on CPU).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a different scan already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON when done.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Folder of the scan.")
def scan(model_ref, stimuli_path, texts_path, sites, layers_spec, pool, store_dtype, model_dtype, batch_size,
         overwrite, as_json, out_dir):
    """Record sites of every stimulus (or text) into an on-disk store (resumable; a finished scan is reused)."""
    from .capture.scan import ProgressBar, ScanSettings, run_scan
    from .models import load
    from .stimuli import load_stimuli, load_texts

    if stimuli_path and texts_path:
        raise _BadInput("give --stimuli or --texts, not both")
    stimuli = load_texts(texts_path) if texts_path else load_stimuli(stimuli_path or _default_stimuli())
    settings = ScanSettings(sites=_split_list(sites, "--sites"), layers=_layers_option(layers_spec), pool=pool,
                            store_dtype=store_dtype, batch_size=batch_size)
    model = load(model_ref, dtype=model_dtype)
    result = run_scan(model, stimuli, out_dir, settings, overwrite=overwrite, progress=ProgressBar("scan"))
    if as_json:
        click.echo(json.dumps(result.manifest))
    else:
        m = result.manifest
        click.echo(f"scan complete: {out_dir}  ({m['stimuli']['n']} stimuli, sites {', '.join(m['sites'])}, "
                   f"{len(m['layers'])} layers, pool {m['pool']}; finished {m['finished']})")


@main.command()
@click.argument("scan_dir", required=False, type=click.Path(path_type=Path))
@click.option("--model", "model_ref", default=None, help="Model to scan first when no SCAN_DIR is given (default: bundled).")
@click.option("--stimuli", "stimuli_path", type=click.Path(path_type=Path), default=None,
              help="Stimuli to scan first when no SCAN_DIR is given (default: stimuli/categories.jsonl).")
@click.option("--site", default="resid_post", show_default=True, help="Per-layer site to probe.")
@click.option("--target", type=click.Choice(["category", "frame"]), default="category", show_default=True)
@click.option("--folds", type=int, default=5, show_default=True, help="Group folds by word.")
@click.option("--permutations", type=int, default=20, show_default=True,
              help="Label shuffles across words, per layer (at most: see --no-early-stop).")
@click.option("--no-early-stop", is_flag=True,
              help="Run every permutation at every layer, not only where the first 5 leave the verdict open.")
@click.option("--no-twin", is_flag=True, help="Skip the untrained-twin control.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save probe.json, the arrays (probe_arrays.npz) and the plot (probe.png) here.")
def probe(scan_dir, model_ref, stimuli_path, site, target, folds, permutations, no_early_stop, no_twin, seed, as_json,
          out_dir):
    """Is the target decodable at each layer, and more than the untrained architecture gives?"""
    from .capture.scan import ProgressBar
    from .experiments.probe import run_probe
    from .store import open_scan

    if scan_dir is not None and (model_ref or stimuli_path):
        raise _BadInput("give either SCAN_DIR or --model/--stimuli, not both")
    if folds < 2 or permutations < 2:
        raise _BadInput("--folds and --permutations must be at least 2")
    say = _progress(as_json)
    outcome = run_probe(
        scan=open_scan(scan_dir) if scan_dir else None, model_ref=model_ref,
        stimuli_path=None if scan_dir else (stimuli_path or _default_stimuli()), site=site, target=target,
        folds=folds, permutations=permutations, early_stop=not no_early_stop, twin=not no_twin, seed=seed, say=say,
        scan_progress=ProgressBar("scan", enabled=None if not as_json else False),
        probe_progress=_layer_progress(as_json),
    )
    record = outcome.to_dict()
    from .command_claims import claims_lines, command_claims, output_folder

    with output_folder(out_dir) as folder:
        _save_probe(folder, outcome, record, plot=out_dir is not None)
        judged = []
        if target == "category":  # the claims test category decoding, word-grouped
            stimuli_file = Path(scan_dir) / "stimuli.jsonl" if scan_dir else (stimuli_path or _default_stimuli())
            judged, record["claims"] = command_claims("probe", folder, {"permutations": permutations, "seed": seed},
                                                      stimuli_path=stimuli_file)
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_probe(record, out_dir)
        for line in claims_lines(judged):
            click.echo(line)


def _open_pair(scan_a: Path, scan_b: Path | None, site: str):
    """Two scans (or one) of the same stimuli, and the site's arrays."""
    from .store import open_scan

    first = open_scan(scan_a)
    second = open_scan(scan_b) if scan_b else None
    for scan in filter(None, (first, second)):
        if scan.pool == "all":
            raise _BadInput(f"{scan.folder} is a token-level scan (--pool all); geometry needs one vector per "
                            "stimulus: scan with --pool word, last or mean")
        if site not in scan.sites:
            raise _BadInput(f"{scan.folder} has no site {site!r} (it has {', '.join(scan.sites)}); pass --site")
    if second is not None and first.stimuli.sha256 != second.stimuli.sha256:
        raise _BadInput("the two scans used different stimuli; compare scans of the same stimulus set")
    return first, second


def _matrix_summary(name: str, matrix, first, second) -> list[str]:
    """One line per layer of A: the most similar layer of B (or the neighbouring layer within one scan)."""
    import numpy as np

    lines = []
    for row, layer in enumerate(first.layers):
        if second is None:
            if len(first.layers) == 1:
                lines.append(f"{layer:>5}  one layer recorded: nothing to compare it with")
                continue
            neighbour = row + 1 if row + 1 < len(first.layers) else row - 1
            lines.append(f"{layer:>5}  {name} with layer {first.layers[neighbour]:>3}: {matrix[row, neighbour]:.3f}")
        else:
            if np.all(np.isnan(matrix[row])):  # a constant layer (e.g. all zeros) has no defined similarity
                lines.append(f"{layer:>5}  undefined (constant activations)")
                continue
            best = int(np.nanargmax(matrix[row]))
            lines.append(f"{layer:>5}  best match in B: layer {second.layers[best]:>3}  {name} {matrix[row, best]:.3f}")
    return lines


def _save_matrix(out_dir: Path, stem: str, record: dict, arrays: dict, matrix, title: str, first, second) -> None:
    from .outputs import write_outputs
    from .plots import heatmap

    write_outputs(out_dir, {f"{stem}.json": record, f"{stem}.npz": arrays})
    heatmap(Path(out_dir) / f"{stem}.png", matrix, title=title,
            xlabel=f"layer ({'B' if second else 'A'})", ylabel="layer (A)")


@main.command()
@click.argument("scan_a", type=click.Path(path_type=Path))
@click.argument("scan_b", required=False, type=click.Path(path_type=Path))
@click.option("--site", default="resid_post", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record (both matrices) instead of a summary.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Save cka.json, cka.npz and cka.png here.")
def cka(scan_a, scan_b, site, as_json, out_dir):
    """Layer x layer linear CKA (and its debiased estimator), within one scan or across two models."""
    from .analysis.geometry import cka_matrix

    first, second = _open_pair(scan_a, scan_b, site)
    other = second[site] if second else None
    biased = cka_matrix(first[site], other)
    debiased = cka_matrix(first[site], other, debiased=True)
    record = {"scan_a": str(first.folder), "scan_b": str(second.folder) if second else None, "site": site,
              "layers_a": first.layers, "layers_b": (second or first).layers,
              "cka": biased.tolist(), "cka_debiased": debiased.tolist(), "n_stimuli": len(first)}
    if out_dir:
        _save_matrix(out_dir, "cka", record, {"cka": biased, "cka_debiased": debiased}, debiased,
                     f"debiased linear CKA, {site}", first, second)
    if as_json:
        click.echo(json.dumps(record))
    else:
        click.echo(f"linear CKA of {site} over {len(first)} stimuli (debiased; biased in cka.json)")
        for line in _matrix_summary("CKA", debiased, first, second):
            click.echo(line)


@main.command()
@click.argument("scan_a", type=click.Path(path_type=Path))
@click.argument("scan_b", required=False, type=click.Path(path_type=Path))
@click.option("--site", default="resid_post", show_default=True)
@click.option("--per-stimulus", is_flag=True, help="RDMs over stimuli instead of over category means.")
@click.option("--metric", type=click.Choice(["correlation", "euclidean"]), default="correlation", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of a summary.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Save rsa.json, rsa.npz and rsa.png here.")
def rsa(scan_a, scan_b, site, per_stimulus, metric, as_json, out_dir):
    """Representational dissimilarity matrices and their Spearman correlation across layers (or models)."""
    import numpy as np

    from .analysis.geometry import condition_rdm, rdm, rsa_matrix

    first, second = _open_pair(scan_a, scan_b, site)
    labels = None if per_stimulus else first.labels
    matrix = rsa_matrix(first[site], second[site] if second else None, labels=labels, metric=metric)
    rdms = np.stack([rdm(np.asarray(first.layer(site, layer), np.float64), metric) if per_stimulus else
                     condition_rdm(np.asarray(first.layer(site, layer), np.float64), first.labels, metric)
                     for layer in first.layers])
    record = {"scan_a": str(first.folder), "scan_b": str(second.folder) if second else None, "site": site,
              "metric": metric, "over": "stimuli" if per_stimulus else "category means",
              "conditions": None if per_stimulus else list(first.stimuli.categories),
              "layers_a": first.layers, "layers_b": (second or first).layers, "spearman": matrix.tolist()}
    if out_dir:
        _save_matrix(out_dir, "rsa", record, {"spearman": matrix, "rdms_a": rdms}, matrix,
                     f"RSA (Spearman of RDMs), {site}", first, second)
    if as_json:
        click.echo(json.dumps(record))
    else:
        click.echo(f"RSA of {site}: Spearman correlation of RDMs over {record['over']} ({metric} distance)")
        for line in _matrix_summary("rho", matrix, first, second):
            click.echo(line)


def _layer_progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    # A second pass (the permutations of layers the first look left open) continues the count.
    return lambda done, total: click.echo(f"\rmlxscan: probed {done}/{total} layer batches", err=True, nl=done == total)


def _save_probe(out_dir: Path, outcome, record: dict, plot: bool = True) -> None:
    from .outputs import write_outputs
    from .plots import line_plot

    layers = [row["layer"] for row in record["layers"]]
    series = {"trained": ([row["accuracy"] for row in record["layers"]], _bands(record["layers"], "ci"))}
    if record["span_twin"] is not None:
        series["untrained twin"] = ([row["twin_accuracy"] for row in record["layers"]], _bands(record["layers"], "twin_ci"))
    write_outputs(out_dir, {"probe.json": record, "probe_arrays.npz": outcome.arrays})
    if not plot:
        return
    line_plot(Path(out_dir) / "probe.png", layers, series, title=f"{record['target']} decoding by layer: {record['model']}",
              xlabel="layer", ylabel="accuracy (word-grouped CV)", hlines={"chance": record["chance"]}, ylim=(0, 1))


def _bands(rows, key):
    return ([row[key][0] for row in rows], [row[key][1] for row in rows])


def _print_probe(record: dict, out_dir) -> None:
    twin = record["span_twin"] is not None
    click.echo(f"{record['model']}  site {record['site']}  target {record['target']} ({len(record['classes'])} classes, "
               f"chance {record['chance']:.3f})  {record['folds']} word-grouped folds, {record['permutations']} permutations"
               + (f" (perm: how many ran; {record['first_look']} where they settled the verdict)"
                  if record["early_stop"] and record["permutations"] > record["first_look"] else ""))
    header = f"{'layer':>5}  {'accuracy':>8}  {'95% CI':>16}  {'AUC':>5}  {'p':>8}  {'perm':>4}"
    click.echo(header + ("  " + f"{'twin acc':>8}  {'twin p':>8}  {'perm':>4}" if twin else ""))
    for row in record["layers"]:
        line = (f"{row['layer']:>5}  {row['accuracy']:>8.3f}  [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]  "
                f"{row['auc']:>5.3f}  {row['p']:>8.1e}  {row['permutations_run']:>4}")
        if twin:
            line += f"  {row['twin_accuracy']:>8.3f}  {row['twin_p']:>8.1e}  {row['twin_permutations_run']:>4}"
        click.echo(line)
    spans = f"decodable layer-span (Holm-corrected p < 0.05): trained {record['span_trained']:.2f}"
    if twin:
        spans += f", untrained twin {record['span_twin']:.2f}"
    click.echo(spans)
    depth = record["depth"]
    gap = depth["mlp_gap"]
    click.echo(f"at the best layer ({depth['layer']}): one direction per category reaches "
               f"{depth['rank']['mean_ratio']:.3f} of the full probe's AUC (rank-1 if ~1); a shared probe keeps "
               f"{depth['retention']['mean_retention']:.3f} of dedicated probes' accuracy; MLP probe minus linear "
               f"{gap['gap']:+.3f} [{gap['gap_ci'][0]:+.3f}, {gap['gap_ci'][1]:+.3f}]")
    if out_dir:
        click.echo(f"saved probe.json, probe_arrays.npz, claims.json and probe.png in {out_dir}")


def _print_verify(report) -> None:
    click.echo(f"model      {report.model}   ({report.n_texts} texts, {report.n_tokens} tokens; BLAS: {report.blas})")
    click.echo(f"embed      rel err {report.embed_rel_err:.2e}")
    for layer, error in enumerate(report.hidden_rel_err):
        click.echo(f"layer {layer:>3}  rel err {error:.2e}")
    click.echo(f"final norm rel err {report.final_norm_rel_err:.2e}")
    click.echo(f"logits     rel err {report.logits_rel_err:.2e}   top-1 agreement {report.top1_agree:.1%}")
    if report.quantized_drift:
        drift = report.quantized_drift
        layers = drift["hidden_rel_err"]
        click.echo(f"quantized MLX path ({drift['dtype']}) vs dequantized float32: logits {drift['logits_rel_err']:.2e}, "
                   f"layers {min(layers):.2e}..{max(layers):.2e}, top-1 agreement {drift['top1_agree']:.1%}")
    verdict = "OK" if report.ok else "FAILED"
    click.echo(f"{verdict}: worst relative error {max([report.logits_rel_err, *report.hidden_rel_err]):.2e} "
               f"(tolerance {report.tolerance:.0e})")


# Commands of later capabilities live in their own modules and register themselves on `main`.
from . import cli_causal, cli_ica, cli_networks, cli_units  # noqa: E402,F401
from . import cli_patch, cli_report, cli_sae, cli_snmf, cli_study, cli_wiring  # noqa: E402,F401

if __name__ == "__main__":
    main()
