"""Running a scan: a stimulus set through the model, the chosen sites recorded into the store.

Stimuli run in batches that share a prefix where they can (a frame's tokens before the target word run
once, see forward.shared_prefix_length), formed the same way every time, so a resumed scan sees the same
batches; a word-pooled scan runs each stimulus only up to its word. Pooling happens inside MLX, so memory
is bounded by the batch, never by the set.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import _blas
from ..errors import MlxscanError
from ..stimuli import StimulusSet
from ..store.scan_store import FORMAT, POOLS, Scan, ScanWriter, now, read_manifest
from .forward import PrefixReuse, common_prefix_length, run_tokens
from .sites import LAYER_SITES, site_width


@dataclass(frozen=True)
class ScanSettings:
    sites: tuple[str, ...] = ("resid_post",)
    layers: tuple[int, ...] | None = None  # None: every layer
    pool: str = "last"
    store_dtype: str = "float32"
    batch_size: int = 32


@dataclass
class TokenizedStimuli:
    token_ids: list[list[int]]
    word_tokens: list[list[int]]  # positions of the target word's tokens in each stimulus


def tokenize_stimuli(model, stimuli: StimulusSet) -> TokenizedStimuli:
    """Token ids, and which tokens cover each target word (from the tokenizer's character offsets)."""
    token_ids, word_tokens, problems = [], [], []
    for stimulus in stimuli:
        ids, offsets = model.tokenizer.encode_with_offsets(stimulus.text)
        if stimulus.word_span is None:  # a text of a corpus: no target word
            token_ids.append(ids)
            word_tokens.append([])
            continue
        start, end = stimulus.word_span
        covering = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not covering:
            problems.append(f"line {stimulus.line}: no token covers the word {stimulus.word!r}")
        if model.max_context and len(ids) > model.max_context:
            problems.append(f"line {stimulus.line}: {len(ids)} tokens, longer than the context of {model.max_context}")
        token_ids.append(ids)
        word_tokens.append(covering)
    if problems:
        raise MlxscanError(f"{len(problems)} stimuli cannot be scanned:\n  " + "\n  ".join(problems[:20]))
    return TokenizedStimuli(token_ids, word_tokens)


def pool_weights(pool: str, token_lists: Sequence[Sequence[int]], word_tokens, adds_bos: bool) -> np.ndarray:
    """[batch, seq] weights whose sum over seq pools a site: last token, mean, or the target word's tokens."""
    seq_len = max(map(len, token_lists))
    weights = np.zeros((len(token_lists), seq_len), np.float32)
    for row, (tokens, word) in enumerate(zip(token_lists, word_tokens)):
        if pool == "last":
            weights[row, len(tokens) - 1] = 1.0
        elif pool == "mean":
            first = 1 if adds_bos and len(tokens) > 1 else 0  # BOS is an attention sink, not content
            weights[row, first:len(tokens)] = 1.0 / (len(tokens) - first)
        elif pool == "word":
            weights[row, word] = 1.0 / len(word)
    return weights


BATCHING = "shared-prefix/2"  # how prefix_batches orders a set: a store resumes only under the same rule


def prefix_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Stimuli in batches of at most batch_size whose members begin with the same tokens where they can.

    In token order, stimuli of one frame sit together; a batch closes when full, or (once half full: smaller
    batches cost more than a prefix saves) when the next stimulus would shorten what its members share,
    so run_tokens can run that prefix once.
    Deterministic, so an interrupted scan resumes on the same batches.
    """
    order = sorted(range(len(token_ids)), key=lambda i: list(token_ids[i]))
    batches: list[list[int]] = []
    shared = 0
    for i in order:
        if batches and len(batches[-1]) < batch_size:
            common = min(shared, common_prefix_length(token_ids[batches[-1][0]], token_ids[i]))
            if common >= shared or len(batches[-1]) < batch_size // 2:
                batches[-1].append(i)
                shared = common
                continue
        batches.append([i])
        shared = len(token_ids[i])
    return batches


def check_settings(model, settings: ScanSettings) -> ScanSettings:
    if settings.pool not in POOLS:
        raise MlxscanError(f"--pool must be one of {', '.join(POOLS)}, got {settings.pool!r}")
    unknown = [site for site in settings.sites if site not in LAYER_SITES]
    if unknown or not settings.sites:
        raise MlxscanError(f"scans record per-layer sites; {unknown or 'none'} given; choose from {', '.join(LAYER_SITES)}")
    layers = tuple(range(model.n_layers)) if settings.layers is None else tuple(sorted(set(settings.layers)))
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad or not layers:
        raise MlxscanError(f"--layers {list(bad) or '[]'}: no such layers; this model has layers 0..{model.n_layers - 1}")
    if settings.batch_size < 1:
        raise MlxscanError("--batch-size must be at least 1")
    if settings.store_dtype not in ("float32", "float16"):
        raise MlxscanError("--dtype must be float32 or float16")
    return ScanSettings(tuple(dict.fromkeys(settings.sites)), layers, settings.pool, settings.store_dtype,
                        settings.batch_size)


def scan_identity(model, stimuli: StimulusSet, settings: ScanSettings) -> dict:
    """What makes two scans the same scan: a store with another identity is refused, not resumed."""
    return {
        "model_sha256": model.weights_sha256(),
        "model_dtype": model.dtype,
        "quantized": model.quantized,
        "stimuli_sha256": stimuli.sha256,
        "sites": list(settings.sites),
        "layers": list(settings.layers),
        "pool": settings.pool,
        "store_dtype": settings.store_dtype,
    }


def _manifest(model, stimuli: StimulusSet, settings: ScanSettings, identity: dict) -> dict:
    versions = {name: metadata.version(name) for name in ("mlxscan", "mlx", "mlx-lm")}
    return {
        "format": FORMAT,
        "status": "running",
        "identity": identity,
        "model": {"ref": model.ref, "path": str(model.path), "sha256": identity["model_sha256"],
                  "family": model.family.name, "n_layers": model.n_layers, "d_model": model.d_model,
                  "d_mlp": model.d_mlp, "dtype": model.dtype, "quantized": model.quantized},
        "stimuli": {"path": str(stimuli.path) if stimuli.path else None, "sha256": stimuli.sha256, "n": len(stimuli),
                    "kind": stimuli.kind,
                    "categories": list(stimuli.categories) if stimuli.kind == "stimuli" else None},
        "sites": list(settings.sites),
        "layers": list(settings.layers),
        "pool": settings.pool,
        "store_dtype": settings.store_dtype,
        "batch_size": settings.batch_size,
        "batching": BATCHING,
        "tokenizer": {"adds_bos": model.tokenizer.adds_bos, "bos_token": model.tokenizer.bos_token,
                      "vocab_size": model.tokenizer.vocab_size},
        "versions": versions,
        "blas": _blas.describe(),
        "started": now(),
        "finished": None,
    }


def run_scan(model, stimuli: StimulusSet, out: Path, settings: ScanSettings = ScanSettings(), *,
             overwrite: bool = False, progress: Callable[[int, int, int], None] | None = None) -> Scan:
    """Scan `stimuli` with `model` into `out`; resume an unfinished scan of the same identity there.

    progress(done_stimuli, total_stimuli, tokens_so_far) is called after each batch.
    """
    out = Path(out)
    settings = check_settings(model, settings)
    if settings.pool == "word" and stimuli.kind == "texts":
        raise MlxscanError("plain texts have no target word to pool over; use --pool all, last or mean")
    tokenized = tokenize_stimuli(model, stimuli)
    identity = scan_identity(model, stimuli, settings)
    existing = read_manifest(out) if out.exists() else None
    if out.exists() and not out.is_dir():
        raise MlxscanError(f"--out {out} is a file; give a folder")
    if existing is not None and existing.get("identity") != identity:
        if not overwrite:
            raise MlxscanError(f"{out} holds a different scan ({existing['model']['ref']}, "
                               f"{existing['stimuli']['n']} stimuli, sites {existing['sites']}); "
                               "choose another --out or pass --overwrite")
        _clear(out)
        existing = None
    elif existing is None and out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MlxscanError(f"{out} is not empty and holds no scan; choose another --out or pass --overwrite")
        _clear(out)
    if existing is not None and existing.get("status") == "complete":
        return Scan(out)  # the manifest says it is done: nothing is recomputed
    out.mkdir(parents=True, exist_ok=True)

    run_ids = tokenized.token_ids
    if settings.pool == "word":
        # Causal attention: what follows the target word cannot change its activations, so it is not run.
        run_ids = [ids[:max(word) + 1] for ids, word in zip(tokenized.token_ids, tokenized.word_tokens)]
    batches = prefix_batches(run_ids, settings.batch_size)
    if existing is not None and existing.get("batching") != BATCHING:
        # A scan started by a version that batched differently: its finished rows are not the first of these.
        _clear(out)
        existing = None
    order = [i for batch in batches for i in batch]
    widths = {site: site_width(model, site) for site in settings.sites}
    token_level = settings.pool == "all"
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokenized.token_ids])]).astype(np.int64)
    writer = ScanWriter(out, existing or _manifest(model, stimuli, settings, identity), stimuli, widths,
                        n_rows=int(offsets[-1]) if token_level else len(stimuli))
    if token_level and not (out / "offsets.npy").exists():
        np.save(out / "token_ids.npy", np.concatenate([np.asarray(t, np.int32) for t in tokenized.token_ids]))
        np.save(out / "offsets.npy", offsets)

    tokens_done = sum(len(run_ids[i]) for i in order[:writer.done])
    ends = np.cumsum([len(batch) for batch in batches])
    prefix_reuse = PrefixReuse()  # the batches of one frame follow each other: its prefix runs once
    for batch, end in zip(batches, ends):
        if end <= writer.done:
            continue
        start = int(end) - len(batch)
        token_lists = [run_ids[i] for i in batch]
        weights = None if token_level else pool_weights(
            settings.pool, token_lists, [tokenized.word_tokens[i] for i in batch], model.tokenizer.adds_bos)
        recording = run_tokens(model, token_lists, sites=settings.sites, layers=settings.layers, pool_weights=weights,
                               prefix_reuse=prefix_reuse)
        if token_level:
            rows = {site: [(offsets[i], recording.unpadded(site, n).swapaxes(0, 1)) for n, i in enumerate(batch)]
                    for site in settings.sites}
        else:
            rows = {site: [(i, recording[site][n:n + 1]) for n, i in enumerate(batch)] for site in settings.sites}
        writer.write(rows, done=start + len(batch))
        tokens_done += sum(map(len, token_lists))
        if progress:
            progress(start + len(batch), len(order), tokens_done)
    writer.finish()
    return Scan(out)


def _clear(folder: Path) -> None:
    """Remove a previous scan's files (only the kinds a scan writes)."""
    for path in folder.iterdir():
        if path.is_file() and (path.suffix in (".npy", ".json", ".jsonl") or path.name.startswith(".")):
            path.unlink()


class ProgressBar:
    """A one-line progress bar with tokens/s on a terminal's stderr; silent elsewhere."""

    def __init__(self, label: str, enabled: bool | None = None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, tokens: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        rate = tokens / elapsed if elapsed > 0 else 0.0
        filled = int(30 * done / max(total, 1))
        eta = elapsed / done * (total - done) if done else 0.0
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} stimuli  "
                         f"{rate:,.0f} tok/s  eta {eta:4.0f}s ")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def cached_scan(model, stimuli: StimulusSet, settings: ScanSettings, *, progress=None) -> Scan:
    """A scan kept in the user cache, keyed by its identity: run once, reused (and resumed) after."""
    import hashlib
    import json

    from ..models.tokenizer import cache_dir

    settings = check_settings(model, settings)
    key = hashlib.sha256(json.dumps(scan_identity(model, stimuli, settings), sort_keys=True).encode()).hexdigest()
    return run_scan(model, stimuli, cache_dir() / "scans" / key[:32], settings, progress=progress)
