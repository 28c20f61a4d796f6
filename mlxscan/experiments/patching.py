"""Activation patching: clean values spliced into corrupted runs, and attention-head ablation.

A pair is a clean prompt, a corrupted prompt of the same token length, and two one-token answers:
the clean one and the corrupted one. The metric is the logit difference at the last token,
LD = logit(answer) - logit(corrupted_answer); patching a site from the clean run into the corrupted
one recovers (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted), over the set's mean LDs (a
ratio of means: one pair the model barely separates cannot blow it up). Positions are counted back
from each prompt's end, so pairs of different lengths share columns (-1 is every last token).
Each patched variant is one row of a batch: a layer's whole table costs one batched run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from ..capture.forward import run_tokens
from ..capture.interventions import Map
from ..capture.sites import LAYER_SITES
from ..errors import MlxscanError

PATCH_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_head")
PAIR_FIELDS = {"clean", "corrupted", "answer", "corrupted_answer", "kind"}
DEFAULT_POSITIONS = 8
ROWS_PER_RUN = 160  # patched variants per batched forward: bounds memory, keeps batches large


@dataclass(frozen=True)
class PromptPair:
    clean: str
    corrupted: str
    answer: str  # the clean prompt's answer, with its leading space: " Paris"
    corrupted_answer: str  # the corrupted prompt's answer: " Rome"
    kind: str = ""


def load_pairs(path) -> list[PromptPair]:
    """Read a pairs JSONL file; every bad line is reported at once, by number."""
    path = Path(path)
    if not path.is_file():
        raise MlxscanError(f"pairs file {path} not found; give a JSONL file of clean/corrupted pairs")
    pairs, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"line {number}: not JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {number}: not a JSON object")
            continue
        missing = sorted(PAIR_FIELDS - {"kind"} - set(record))
        unknown = sorted(set(record) - PAIR_FIELDS)
        empty = [k for k, v in record.items() if not isinstance(v, str) or (k != "kind" and not v.strip())]
        if missing or unknown or empty:
            problems.append(f"line {number}: " + "; ".join(filter(None, [
                missing and f"missing {', '.join(missing)}", unknown and f"unknown field {', '.join(unknown)}",
                empty and f"{', '.join(empty)} must be non-empty strings"])))
            continue
        pairs.append(PromptPair(**record))
    if problems:
        raise MlxscanError(f"{path}: {len(problems)} bad line(s): " + " | ".join(problems))
    if not pairs:
        raise MlxscanError(f"{path} holds no pairs")
    return pairs


@dataclass(frozen=True)
class TokenizedPairs:
    clean: list[list[int]]
    corrupted: list[list[int]]
    answer_ids: np.ndarray  # [pairs]
    corrupted_answer_ids: np.ndarray  # [pairs]
    lengths: np.ndarray  # [pairs]

    def __len__(self) -> int:
        return len(self.clean)


def _answer_id(model, prompt: str, answer: str, where: str) -> int:
    """The one token `answer` adds after `prompt` (tokenized together, as the model would read it)."""
    prefix, whole = model.tokenize(prompt), model.tokenize(prompt + answer)
    if whole[: len(prefix)] != prefix or len(whole) != len(prefix) + 1:
        pieces = len(whole) - len(prefix)
        raise MlxscanError(f"{where}: answer {answer!r} is {pieces} tokens after its prompt; answers must be one token")
    return whole[-1]


def tokenize_pairs(model, pairs: Sequence[PromptPair]) -> TokenizedPairs:
    """Token ids of every pair; clean and corrupted must be equally long, answers one token each."""
    clean, corrupted, answers, wrongs, problems = [], [], [], [], []
    for number, pair in enumerate(pairs, start=1):
        a, b = model.tokenize(pair.clean), model.tokenize(pair.corrupted)
        try:
            if len(a) != len(b):
                raise MlxscanError(f"pair {number} ({pair.clean!r}): clean is {len(a)} tokens, corrupted {len(b)}; "
                                   "make them tokenize to the same length")
            if a == b:
                raise MlxscanError(f"pair {number} ({pair.clean!r}): clean and corrupted are the same tokens")
            answers.append(_answer_id(model, pair.clean, pair.answer, f"pair {number}"))
            wrongs.append(_answer_id(model, pair.corrupted, pair.corrupted_answer, f"pair {number}"))
        except MlxscanError as error:
            problems.append(str(error))
            continue
        if answers[-1] == wrongs[-1]:
            problems.append(f"pair {number}: answer and corrupted_answer are the same token")
        clean.append(a)
        corrupted.append(b)
    if problems:
        raise MlxscanError(" | ".join(problems))
    return TokenizedPairs(clean, corrupted, np.array(answers), np.array(wrongs),
                          np.array([len(t) for t in clean]))


def logit_diffs(model, token_lists, answer_ids, wrong_ids, interventions=(), resume=None) -> np.ndarray:
    """[rows] logit(answer) - logit(wrong) at each row's last token, the LM head run on that token only.

    resume (layer, resid_pre [rows, seq, d_model]) starts the runs at that layer (see run_tokens).
    """
    run = run_tokens(model, token_lists, sites=["final_norm"], interventions=list(interventions), resume=resume)
    last = run["final_norm"][np.arange(len(token_lists)), run.lengths - 1]  # [rows, d_model]
    logits = np.array(model.lm_head(mx.array(last)).astype(mx.float32))  # [rows, vocab]
    rows = np.arange(len(token_lists))
    return logits[rows, answer_ids] - logits[rows, wrong_ids]


def _batched_diffs(model, prompts: list[list[int]], starts: np.ndarray, pairs: TokenizedPairs, site: str,
                   layer: int, row_pairs: np.ndarray, row_masks: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """[rows] LD of prompts[row_pairs[r]] with sources[row_pairs[r]] written into `site` where row_masks[r].

    row_masks is [rows, seq, 1] (token positions) or [rows, 1, heads, 1] (heads, every position);
    sources is [pairs, seq, ...]: the clean run's values, or head means for ablation. starts
    [pairs, seq, d_model] is the prompts' own resid_pre at `layer`: the runs begin there.
    """
    out = np.empty(len(row_pairs))
    by_length = np.argsort(pairs.lengths[row_pairs], kind="stable")  # batches of similar lengths pad little
    for start in range(0, len(row_pairs), ROWS_PER_RUN):
        rows = by_length[start:start + ROWS_PER_RUN]
        index = row_pairs[rows]
        seq = int(pairs.lengths[index].max())
        masks = row_masks[rows][:, :seq] if site in LAYER_SITES else row_masks[rows]
        mask, values = mx.array(masks), mx.array(sources[index][:, :seq])
        patch = Map(site, layer, fn=lambda x, mask=mask, values=values: mx.where(mask, values.astype(x.dtype), x))
        out[rows] = logit_diffs(model, [prompts[i] for i in index], pairs.answer_ids[index],
                                pairs.corrupted_answer_ids[index], [patch], resume=(layer, starts[index][:, :seq]))
    return out


def _gap(clean: np.ndarray, corrupted: np.ndarray) -> float:
    """Mean LD clean - mean LD corrupted: what patching can recover; it must be positive."""
    gap = float(clean.mean() - corrupted.mean())
    if not gap > 0:
        raise MlxscanError(f"the model does not prefer the clean answers on the clean prompts (mean LD clean "
                           f"{clean.mean():.3f} vs corrupted {corrupted.mean():.3f}); nothing can be recovered")
    return gap


def _recovered(patched: np.ndarray, clean: np.ndarray, corrupted: np.ndarray) -> np.ndarray:
    """(mean patched - mean corrupted) / (mean clean - mean corrupted), patched [..., pairs]."""
    return (patched.mean(-1) - corrupted.mean()) / _gap(clean, corrupted)


@dataclass(frozen=True)
class PatchResult:
    """Recovered logit difference per layer and column (a position from the end, or a head; then 'all')."""

    site: str
    layers: tuple[int, ...]
    columns: tuple[str, ...]  # "-5".."-1", "changed", "all" (positions) or "0".."H-1", "all" (heads)
    clean_ld: np.ndarray  # [pairs]
    corrupted_ld: np.ndarray  # [pairs]
    patched_ld: np.ndarray  # [layers, columns, pairs]
    nothing_ld: np.ndarray  # [pairs]: the same patching engine with nothing selected (must equal corrupted)
    recovered: np.ndarray = field(init=False)  # [layers, columns]

    def __post_init__(self):
        object.__setattr__(self, "recovered", _recovered(self.patched_ld, self.clean_ld, self.corrupted_ld))

    @property
    def recovered_nothing(self) -> float:
        return float(_recovered(self.nothing_ld, self.clean_ld, self.corrupted_ld))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"recovered": self.recovered, "patched_ld": self.patched_ld, "clean_ld": self.clean_ld,
                "corrupted_ld": self.corrupted_ld, "nothing_ld": self.nothing_ld, "layers": np.array(self.layers)}


def _position_masks(pairs: TokenizedPairs, offsets: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_pairs, masks [rows, seq, 1]): each pair patched at one position -offsets..-1, then at every
    position where its clean and corrupted tokens differ ("changed"), then everywhere ("all")."""
    seq = int(pairs.lengths.max())
    n_columns = offsets + 2
    masks = np.zeros((len(pairs), n_columns, seq, 1), bool)
    for i, length in enumerate(pairs.lengths):
        for column in range(offsets):
            masks[i, column, length - offsets + column] = True
        masks[i, offsets, :length, 0] = np.array(pairs.clean[i]) != np.array(pairs.corrupted[i])
        masks[i, offsets + 1, :length] = True
    return np.repeat(np.arange(len(pairs)), n_columns), masks.reshape(-1, seq, 1)


def _head_masks(n_pairs: int, n_heads: int, with_all: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(row_pairs, masks [rows, 1, heads, 1]): each pair with one head selected (then all heads)."""
    choices = np.eye(n_heads, dtype=bool)
    if with_all:
        choices = np.vstack([choices, np.ones((1, n_heads), bool)])
    masks = np.broadcast_to(choices[None], (n_pairs, *choices.shape)).reshape(-1, 1, n_heads, 1)
    return np.repeat(np.arange(n_pairs), len(choices)), masks


def _check_layers(model, layers) -> tuple[int, ...]:
    layers = tuple(range(model.n_layers)) if layers is None else tuple(sorted({int(l) for l in layers}))
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad or not layers:
        raise MlxscanError(f"layers {list(bad) or '[]'} do not exist; the model has layers 0..{model.n_layers - 1}")
    return layers


def run_patching(model, pairs: TokenizedPairs, site: str = "resid_post", *, layers: Sequence[int] | None = None,
                 positions: int | None = None, progress: Callable[[int, int], None] | None = None) -> PatchResult:
    """Patch `site` from each clean run into its corrupted run, one layer x (position or head) at a time.

    positions: how many final positions get a column (default: the shortest prompt's, at most 8).
    """
    if site not in PATCH_SITES:
        raise MlxscanError(f"cannot patch site {site!r}; choose one of {', '.join(PATCH_SITES)}")
    layers = _check_layers(model, layers)
    shortest = int(pairs.lengths.min())
    offsets = min(shortest, DEFAULT_POSITIONS) if positions is None else int(positions)
    if not 1 <= offsets <= shortest:
        raise MlxscanError(f"positions must lie in 1..{shortest} (the shortest prompt's length), got {offsets}")
    clean_ld = logit_diffs(model, pairs.clean, pairs.answer_ids, pairs.corrupted_answer_ids)
    corrupted_ld = logit_diffs(model, pairs.corrupted, pairs.answer_ids, pairs.corrupted_answer_ids)
    _gap(clean_ld, corrupted_ld)
    clean = model.run(pairs.clean, sites=[site], layers=layers)[site]  # [pairs, layers, seq, ...]
    starts = model.run(pairs.corrupted, sites=["resid_pre"], layers=layers)["resid_pre"]
    if site == "attn_head":
        row_pairs, masks = _head_masks(len(pairs), model.n_heads)
        columns = (*map(str, range(model.n_heads)), "all")
    else:
        row_pairs, masks = _position_masks(pairs, offsets)
        columns = (*(str(-k) for k in range(offsets, 0, -1)), "changed", "all")
    patched = np.empty((len(layers), len(columns), len(pairs)))
    for row, layer in enumerate(layers):
        diffs = _batched_diffs(model, pairs.corrupted, starts[:, row], pairs, site, layer, row_pairs, masks,
                               clean[:, row])
        patched[row] = diffs.reshape(len(pairs), len(columns)).T
        if progress:
            progress(row + 1, len(layers))
    nothing = _batched_diffs(model, pairs.corrupted, starts[:, 0], pairs, site, layers[0], np.arange(len(pairs)),
                             np.zeros_like(masks[: len(pairs)]), clean[:, 0])
    return PatchResult(site, layers, columns, clean_ld, corrupted_ld, patched, nothing)


@dataclass(frozen=True)
class HeadAblationResult:
    """Each head mean-ablated (or zeroed) on the clean prompts: the change in LD, per layer and head."""

    layers: tuple[int, ...]
    mode: str
    clean_ld: np.ndarray  # [pairs]
    corrupted_ld: np.ndarray  # [pairs]
    ablated_ld: np.ndarray  # [layers, heads, pairs]
    effect: np.ndarray = field(init=False)  # [layers, heads]: (ablated - clean) / (clean - corrupted), mean LDs

    def __post_init__(self):
        gap_fraction = _recovered(self.ablated_ld, self.clean_ld, self.corrupted_ld)  # 1 = unchanged
        object.__setattr__(self, "effect", gap_fraction - 1.0)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"effect": self.effect, "ablated_ld": self.ablated_ld, "clean_ld": self.clean_ld,
                "corrupted_ld": self.corrupted_ld, "layers": np.array(self.layers)}


def run_head_ablation(model, pairs: TokenizedPairs, *, layers: Sequence[int] | None = None, mode: str = "mean",
                      progress: Callable[[int, int], None] | None = None) -> HeadAblationResult:
    """Silence each attention head in turn on the clean prompts (mean: its mean output over the set's tokens)."""
    if mode not in ("mean", "zero"):
        raise MlxscanError(f"mode must be 'mean' or 'zero', got {mode!r}")
    layers = _check_layers(model, layers)
    clean_ld = logit_diffs(model, pairs.clean, pairs.answer_ids, pairs.corrupted_answer_ids)
    corrupted_ld = logit_diffs(model, pairs.corrupted, pairs.answer_ids, pairs.corrupted_answer_ids)
    _gap(clean_ld, corrupted_ld)
    run = model.run(pairs.clean, sites=["attn_head", "resid_pre"], layers=layers)
    heads, starts = run["attn_head"], run["resid_pre"]  # [pairs, layers, seq, H, d], [pairs, layers, seq, d]
    real = (np.arange(heads.shape[2])[None, :] < pairs.lengths[:, None]).sum()
    row_pairs, masks = _head_masks(len(pairs), model.n_heads, with_all=False)
    ablated = np.empty((len(layers), model.n_heads, len(pairs)))
    for row, layer in enumerate(layers):
        mean = heads[:, row].sum(axis=(0, 1)) / real if mode == "mean" else np.zeros(heads.shape[3:])
        sources = np.broadcast_to(mean, heads[:, row].shape).astype(np.float32)
        diffs = _batched_diffs(model, pairs.clean, starts[:, row], pairs, "attn_head", layer, row_pairs, masks,
                               sources)
        ablated[row] = diffs.reshape(len(pairs), model.n_heads).T
        if progress:
            progress(row + 1, len(layers))
    return HeadAblationResult(layers, mode, clean_ld, corrupted_ld, ablated)
