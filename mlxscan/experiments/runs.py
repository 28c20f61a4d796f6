"""Running stimuli through a model in memory, with interventions: the engine of the causal experiments.

A scan writes a store once; an experiment reruns the same stimuli many times under different
interventions and compares. `run_stimuli` pools each layer site the way a scan does (so arrays line
up with a scan of the same stimuli) and keeps the last token's final-norm vector, from which the
next-token distribution is computed only when needed (the vocabulary is large, the vector small).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..capture.forward import run_tokens
from ..capture.scan import pool_weights, tokenize_stimuli
from ..errors import MlxscanError
from ..stimuli import StimulusSet


@dataclass(frozen=True)
class StimulusRun:
    """Pooled activations of every stimulus (in stimulus order) under one set of interventions."""

    arrays: dict[str, np.ndarray]  # site -> [n_stimuli, n_layers, width]
    layers: tuple[int, ...]
    last_final_norm: np.ndarray | None  # [n_stimuli, d_model]: the last token after the final norm
    effects: dict[str, float]  # intervention -> mean relative change it made to its site

    def layer(self, site: str, layer: int) -> np.ndarray:
        return self.arrays[site][:, self.layers.index(layer)]


def run_stimuli(model, stimuli: StimulusSet, *, sites: Sequence[str] = ("resid_post",),
                layers: Sequence[int] | None = None, pool: str = "word", interventions: Sequence = (),
                next_token: bool = False, batch_size: int = 32,
                progress: Callable[[int, int], None] | None = None) -> StimulusRun:
    """Run every stimulus under `interventions`; pooled `sites` at `layers`, optionally the last token's state.

    Batches are of similar length, and results come back in stimulus order.
    """
    if pool not in ("last", "mean", "word"):
        raise MlxscanError(f"pool must be last, mean or word, got {pool!r}")
    if batch_size < 1:
        raise MlxscanError("batch_size must be at least 1")
    tokenized = tokenize_stimuli(model, stimuli)
    layers = tuple(range(model.n_layers)) if layers is None else tuple(sorted(set(int(l) for l in layers)))
    order = sorted(range(len(stimuli)), key=lambda i: len(tokenized.token_ids[i]))
    arrays: dict[str, np.ndarray] = {}
    final = np.zeros((len(stimuli), model.d_model), np.float32) if next_token else None
    changes: dict[str, list[float]] = {}
    record = list(sites) + (["final_norm"] if next_token else [])
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        token_lists = [tokenized.token_ids[i] for i in batch]
        weights = pool_weights(pool, token_lists, [tokenized.word_tokens[i] for i in batch], model.tokenizer.adds_bos)
        per_site = {site: weights for site in sites}
        if next_token:
            per_site["final_norm"] = pool_weights("last", token_lists, [[]] * len(token_lists), model.tokenizer.adds_bos)
        recording = run_tokens(model, token_lists, sites=record, layers=layers, interventions=interventions,
                               pool_weights=per_site)
        for site in sites:
            values = recording[site]
            if site not in arrays:
                arrays[site] = np.zeros((len(stimuli), *values.shape[1:]), np.float32)
            arrays[site][batch] = values
        if next_token:
            final[batch] = recording["final_norm"]
        for effect in recording.effects:
            changes.setdefault(effect.intervention, []).append(effect.relative_change)
        if progress:
            progress(start + len(batch), len(order))
    return StimulusRun(arrays=arrays, layers=layers, last_final_norm=final,
                       effects={name: float(np.mean(values)) for name, values in changes.items()})


def next_token_log_probs(model, final_norm: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[n, vocab] log-softmax of the next-token logits from final-norm vectors [n, d_model]."""
    final_norm = np.ascontiguousarray(final_norm, dtype=np.float32)  # mx.array refuses negative strides
    out = []
    for start in range(0, len(final_norm), batch_size):
        logits = model.lm_head(mx.array(final_norm[start:start + batch_size])).astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return np.concatenate(out)


def next_token_change(model, reference: np.ndarray, changed: np.ndarray,
                      batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """([n] KL(reference || changed) in nats, [n] bool: is the most likely next token the same?)

    From final-norm vectors [n, d_model]; both from one pass of the LM head over each side.
    """
    reference, changed = np.asarray(reference, np.float32), np.asarray(changed, np.float32)
    if reference.shape != changed.shape:
        raise MlxscanError(f"reference {reference.shape} and changed {changed.shape} must have the same shape")
    kls, same = [], []
    for start in range(0, len(reference), batch_size):
        p = next_token_log_probs(model, reference[start:start + batch_size])
        q = next_token_log_probs(model, changed[start:start + batch_size])
        kls.append(np.sum(np.exp(p) * (p - q), axis=-1))
        same.append(p.argmax(-1) == q.argmax(-1))
    return np.maximum(np.concatenate(kls), 0.0), np.concatenate(same)  # rounding can leave KL at -1e-9


def next_token_kl(model, reference: np.ndarray, changed: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[n] KL(reference || changed) of the next-token distributions, in nats, from final-norm vectors."""
    return next_token_change(model, reference, changed, batch_size)[0]


def top1_agreement(model, reference: np.ndarray, changed: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[n] bool: does the most likely next token stay the same?"""
    return next_token_change(model, reference, changed, batch_size)[1]
