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
def scan(model_ref, stimuli_path, sites, layers_spec, pool, store_dtype, model_dtype, batch_size, overwrite, as_json,
         out_dir):
    """Record sites of every stimulus into an on-disk store (resumable; a finished scan is reused)."""
    from .capture.scan import ProgressBar, ScanSettings, run_scan
    from .models import load
    from .stimuli import load_stimuli

    stimuli = load_stimuli(stimuli_path or _default_stimuli())
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


if __name__ == "__main__":
    main()
