"""`mlxscan patch` and `mlxscan attention`: activation patching, head ablation, attention sinks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import _BadInput, _layers_option, _progress, main
from .cli_ica import _stimuli_file
from .cli_units import _layer_counter

SHIPPED_PAIRS = ("patch_recall.jsonl", "patch_reasoning.jsonl")
PATCH_SITE_CHOICE = click.Choice(["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_head"])


def _checked_layers(model, layers_spec):
    layers = _layers_option(layers_spec)
    bad = [layer for layer in layers or () if not 0 <= layer < model.n_layers]
    if bad:
        raise _BadInput(f"--layers {layers_spec}: layers {bad} do not exist; the model has 0..{model.n_layers - 1}")
    return layers


def _set_record(name, path, result, ablation) -> dict:
    """One pair set's numbers: the table, its sanity checks, and where information sits."""
    import numpy as np

    recovered = result.recovered
    columns = list(result.columns)
    record = {"name": name, "pairs": str(path), "n_pairs": int(len(result.clean_ld)), "site": result.site,
              "layers": list(result.layers), "columns": columns, "recovered": recovered.tolist(),
              "clean_ld": float(result.clean_ld.mean()), "corrupted_ld": float(result.corrupted_ld.mean()),
              "pairs_separated": int(np.sum(result.clean_ld > result.corrupted_ld)),
              "recovered_nothing": result.recovered_nothing,
              "recovered_all_at_last_layer": float(recovered[-1, columns.index("all")])}  # of the layers run
    if "-1" in columns:
        last, changed = recovered[:, columns.index("-1")], recovered[:, columns.index("changed")]
        record["last_position_reaches_half_at"] = next((l for l, v in zip(result.layers, last) if v >= 0.5), None)
        record["changed_tokens_hold_half_until"] = max((l for l, v in zip(result.layers, changed) if v >= 0.5),
                                                       default=None)
    else:
        cells = recovered[:, :-1]
        best = np.argsort(-cells, axis=None)[:5]
        record["top_heads"] = [[int(result.layers[i // cells.shape[1]]), int(i % cells.shape[1]),
                                float(cells.flat[i])] for i in best]
    if ablation is not None:
        effect = ablation.effect
        worst = np.argsort(effect, axis=None)[:5]
        record["head_ablation"] = {"mode": ablation.mode, "layers": list(ablation.layers), "effect": effect.tolist(),
                                   "most_needed": [[int(ablation.layers[i // effect.shape[1]]), int(i % effect.shape[1]),
                                                    float(effect.flat[i])] for i in worst]}
    return record


@main.command()
@click.option("--pairs", "pair_files", multiple=True, type=click.Path(path_type=Path),
              help="Clean/corrupted pairs (.jsonl); repeatable. Default: stimuli/patch_recall.jsonl and "
                   "stimuli/patch_reasoning.jsonl.")
@click.option("--model", "model_ref", default=None, help="Hugging Face folder or .gguf (default: bundled SmolLM2-135M-Instruct).")
@click.option("--site", type=PATCH_SITE_CHOICE, default="resid_pre", show_default=True,
              help="What is patched: a residual/branch site per (layer, position), or attn_head per (layer, head).")
@click.option("--layers", "layers_spec", default=None, help="all (default), 12, 0,5,10 or 4-8.")
@click.option("--positions", type=int, default=None, help="Final positions given a column (default: up to 8).")
@click.option("--ablate-heads", is_flag=True, help="Also ablate every attention head on the clean prompts.")
@click.option("--ablate-mode", type=click.Choice(["mean", "zero"]), default="mean", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the tables.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save patch.json, patch.npz and a heatmap per set (patch_<set>.png) here.")
def patch(pair_files, model_ref, site, layers_spec, positions, ablate_heads, ablate_mode, as_json, out_dir):
    """Patch clean activations into corrupted runs: how much of the logit difference comes back?

    recovered = (LD patched - LD corrupted) / (LD clean - LD corrupted), LD = logit(answer) -
    logit(corrupted answer) at the last token, over each set's mean LDs. Columns: positions counted
    from the end, "changed" (every token where clean and corrupted differ) and "all".
    """
    from .experiments.patching import load_pairs, run_head_ablation, run_patching, tokenize_pairs
    from .models import load

    if positions is not None and positions < 1:
        raise _BadInput("--positions must be 1 or more")
    paths = list(pair_files) or [_stimuli_file(name, "--pairs") for name in SHIPPED_PAIRS]
    sets = [(path.stem, path, load_pairs(path)) for path in paths]  # every file checked before the model loads
    say = _progress(as_json)
    say("loading the model")
    model = load(model_ref)
    layers = _checked_layers(model, layers_spec)
    tokenized = [(name, path, tokenize_pairs(model, pairs)) for name, path, pairs in sets]
    shortest = min(int(pairs.lengths.min()) for _, _, pairs in tokenized)
    if positions is not None and positions > shortest:
        raise _BadInput(f"--positions {positions} is longer than the shortest prompt ({shortest} tokens)")
    records, arrays, results = [], {}, []
    for name, path, pairs in tokenized:
        say(f"{name}: patching {site} ({len(pairs)} pairs)")
        result = run_patching(model, pairs, site, layers=layers, positions=positions,
                              progress=_layer_counter(as_json, f"{name}: patched"))
        ablation = None
        if ablate_heads:
            say(f"{name}: ablating heads")
            ablation = run_head_ablation(model, pairs, layers=layers, mode=ablate_mode,
                                         progress=_layer_counter(as_json, f"{name}: ablated"))
            arrays.update({f"{name}/ablation_{key}": value for key, value in ablation.arrays().items()})
        records.append(_set_record(name, path, result, ablation))
        arrays.update({f"{name}/{key}": value for key, value in result.arrays().items()})
        results.append((name, result, ablation))
    record = {"model": model.ref, "site": site, "sets": records}
    if out_dir:
        _save_patch(out_dir, record, arrays, results)
    if as_json:
        click.echo(json.dumps(record))
    else:
        for line in _patch_table(record):
            click.echo(line)
        if out_dir:
            click.echo(f"saved patch.json, patch.npz and heatmaps in {out_dir}")


def _save_patch(out_dir: Path, record: dict, arrays: dict, results) -> None:
    from .outputs import write_outputs
    from .plots import heatmap

    write_outputs(out_dir, {"patch.json": record, "patch.npz": arrays})
    for name, result, ablation in results:
        what = "head" if result.site == "attn_head" else "position from end, then changed, all"
        heatmap(Path(out_dir) / f"patch_{name}.png", result.recovered, title=f"recovered LD, {result.site}: {name}",
                xlabel=f"column ({what})", ylabel="layer index")
        if ablation is not None:
            heatmap(Path(out_dir) / f"head_ablation_{name}.png", ablation.effect, title=f"head ablation: {name}",
                    xlabel="head", ylabel="layer index")


def _patch_table(record: dict) -> list[str]:
    lines = [f"{record['model']}: patching {record['site']} from clean into corrupted runs"]
    for s in record["sets"]:
        lines.append("")
        lines.append(f"{s['name']}: {s['n_pairs']} pairs ({s['pairs_separated']} with LD clean > corrupted); mean LD "
                     f"clean {s['clean_ld']:+.2f}, corrupted {s['corrupted_ld']:+.2f}")
        lines.append("layer " + "".join(f"{c:>8}" for c in s["columns"]))
        for layer, row in zip(s["layers"], s["recovered"]):
            lines.append(f"{layer:>5} " + "".join(f"{v:>8.2f}" for v in row))
        everything = "every head" if s["site"] == "attn_head" else "everything"
        lines.append(f"checks: nothing patched recovers {s['recovered_nothing']:+.3f}; {everything} at layer "
                     f"{s['layers'][-1]} recovers {s['recovered_all_at_last_layer']:.3f}")
        if "last_position_reaches_half_at" in s:
            lines.append(f"the last position alone recovers >= 50% from layer {s['last_position_reaches_half_at']}; "
                         f"the changed tokens hold >= 50% until layer {s['changed_tokens_hold_half_until']}")
        if "top_heads" in s:
            lines.append("heads recovering most (layer.head recovered): " +
                         ", ".join(f"{l}.{h} {v:+.2f}" for l, h, v in s["top_heads"]))
        if "head_ablation" in s:
            lines.append(f"heads whose {s['head_ablation']['mode']} ablation costs most (layer.head, change in LD "
                         "as a fraction of clean - corrupted): " +
                         ", ".join(f"{l}.{h} {v:+.2f}" for l, h, v in s["head_ablation"]["most_needed"]))
    return lines


@main.command()
@click.option("--model", "model_ref", default=None, help="Hugging Face folder or .gguf (default: bundled SmolLM2-135M-Instruct).")
@click.option("--texts", "texts_path", type=click.Path(path_type=Path), default=None,
              help="Texts (.txt one a line, or .jsonl field \"text\"); default: stimuli/corpus.txt.")
@click.option("--limit", type=int, default=64, show_default=True, help="Use the first N texts; 0 keeps all.")
@click.option("--layers", "layers_spec", default=None, help="all (default), 12, 0,5,10 or 4-8.")
@click.option("--threshold", type=float, default=0.3, show_default=True,
              help="A key receiving more than this much attention on average is a sink (Gu et al.'s epsilon).")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the table.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Save attention.json, attention.npz and attention.png (first-token share, layer x head) here.")
def attention(model_ref, texts_path, limit, layers_spec, threshold, batch_size, as_json, out_dir):
    """Attention sinks: which tokens draw disproportionate attention, per layer and head."""
    from .analysis.attention import find_sinks
    from .models import load
    from .stimuli import load_texts

    if limit < 0 or batch_size < 1:
        raise _BadInput("--limit must be 0 (all) or more and --batch-size 1 or more")
    if not 0 < threshold < 1:
        raise _BadInput(f"--threshold must lie between 0 and 1, got {threshold}")
    texts = [s.text for s in load_texts(texts_path or _stimuli_file("corpus.txt", "--texts")).stimuli]
    texts = texts[:limit] if limit else texts
    say = _progress(as_json)
    say("loading the model")
    model = load(model_ref)
    layers = _checked_layers(model, layers_spec)
    token_lists = model.token_lists(texts)
    short = [number for number, tokens in enumerate(token_lists, start=1) if len(tokens) < 2]
    if short:
        raise _BadInput(f"texts {short[:5]} are a single token; attention sinks need at least 2 tokens per text")
    patterns, tokens = [], []
    for start in range(0, len(token_lists), batch_size):
        say(f"attention patterns {start}/{len(token_lists)} texts")
        run = model.run(token_lists[start:start + batch_size], sites=["attn_pattern"], layers=layers)
        for row, ids in enumerate(run.tokens):
            n = len(ids)
            patterns.append(run["attn_pattern"][row, :, :, :n, :n])
            tokens.append([model.tokenizer.decode([token]) for token in ids])
        recorded_layers = run.layers
    report = find_sinks(patterns, tokens, layers=recorded_layers, threshold=threshold)
    record = {"model": model.ref, "texts": str(texts_path or "stimuli/corpus.txt"), **report.to_dict()}
    if out_dir:
        from .outputs import write_outputs
        from .plots import heatmap

        write_outputs(out_dir, {"attention.json": record, "attention.npz": report.arrays()})
        heatmap(Path(out_dir) / "attention.png", report.first_share, title="attention received by the first token",
                xlabel="head", ylabel="layer index", vmin=0.0, vmax=1.0)
    if as_json:
        click.echo(json.dumps(record))
    else:
        for line in _sink_table(record, report):
            click.echo(line)
        if out_dir:
            click.echo(f"saved attention.json, attention.npz and attention.png in {out_dir}")


def _sink_table(record: dict, report) -> list[str]:
    lines = [f"{record['model']}: attention sinks over {report.n_texts} texts ({record['texts']}), threshold "
             f"{report.threshold}",
             f"{'layer':>5}  {'sink rate':>9}  {'first-token share':>17}  {'x uniform':>9}  {'primary=first':>13}  "
             f"{'secondary rate':>14}  strongest head (share)"]
    for row, layer in enumerate(report.layers):
        head = int(report.first_share[row].argmax())
        lines.append(f"{layer:>5}  {report.sink_rate[row]:>9.2f}  {report.first_share[row].mean():>17.3f}  "
                     f"{report.first_ratio[row].mean():>9.1f}  {report.primary_is_first[row].mean():>13.2f}  "
                     f"{report.secondary_rate[row].mean():>14.2f}  {head} ({report.first_share[row, head]:.2f})")
    tokens = ", ".join(f"{token!r} {count}" for token, count in report.secondary_tokens)
    lines.append(f"secondary sinks, most frequent tokens (text x layer x head count): {tokens or 'none'}")
    return lines
