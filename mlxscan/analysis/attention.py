"""Attention sinks: tokens that draw far more attention than their share, per layer and head (NumPy only).

A key's received attention is its weight averaged over the queries that can see it (q >= k, causal),
leaving out query 0, which can only attend to itself. Under uniform attention, key k would receive
the mean of 1 / (q + 1) over those queries; a sink receives much more. Following Gu et al. (2024,
"When attention sink emerges"), a head has a sink at a key when that key receives more than a
threshold epsilon (0.3) of attention on average. The primary sink of a head is its most-attended key
(usually the first token); a secondary sink is the next most-attended key past the threshold (often
punctuation or a delimiter).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import MlxscanError

SINK_THRESHOLD = 0.3


def attention_received(pattern: np.ndarray) -> np.ndarray:
    """pattern [..., query, key] (one text, no padding) -> [..., key]: mean weight from queries q >= max(k, 1)."""
    pattern = np.asarray(pattern, np.float64)
    length = pattern.shape[-1]
    if pattern.shape[-2] != length or length < 2:
        raise MlxscanError(f"a pattern must be square [query, key] over at least 2 tokens, got {pattern.shape[-2:]}")
    sees = np.tril(np.ones((length, length), bool))  # [query, key]: q >= k
    sees[0] = False  # query 0 has no choice
    counts = sees.sum(axis=0)  # [key]
    received = np.where(sees, pattern, 0.0).sum(axis=-2) / np.maximum(counts, 1)
    received[..., counts == 0] = np.nan
    return received


def uniform_received(length: int) -> np.ndarray:
    """[key] what each key would receive if every query spread its attention evenly."""
    return attention_received(np.tril(np.ones((length, length))) / np.arange(1, length + 1)[:, None])


@dataclass(frozen=True)
class SinkReport:
    """Sinks of one set of texts, per layer and head."""

    layers: tuple[int, ...]
    threshold: float
    first_share: np.ndarray  # [layers, heads] attention the first token receives, mean over texts
    first_ratio: np.ndarray  # [layers, heads] first_share over what uniform attention would give it
    primary_is_first: np.ndarray  # [layers, heads] share of texts whose most-attended key is the first token
    primary_share: np.ndarray  # [layers, heads] the most-attended key's share, mean over texts
    secondary_share: np.ndarray  # [layers, heads] the second most-attended key's share, mean over texts
    secondary_rate: np.ndarray  # [layers, heads] share of texts with a secondary sink (second key > threshold)
    secondary_tokens: list[tuple[str, int]]  # tokens most often a secondary sink, with counts over texts x heads
    n_texts: int

    @property
    def sink_rate(self) -> np.ndarray:
        """[layers] share of heads whose first token receives more than the threshold (Gu et al.'s metric)."""
        return (self.first_share > self.threshold).mean(axis=1)

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "threshold": self.threshold, "n_texts": self.n_texts,
                "sink_rate": self.sink_rate.tolist(), "first_share": self.first_share.tolist(),
                "first_ratio": self.first_ratio.tolist(), "primary_is_first": self.primary_is_first.tolist(),
                "secondary_rate": self.secondary_rate.tolist(),
                "secondary_tokens": [[token, count] for token, count in self.secondary_tokens]}

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ("first_share", "first_ratio", "primary_is_first",
                                                        "primary_share", "secondary_share", "secondary_rate")}


def find_sinks(patterns: Sequence[np.ndarray], tokens: Sequence[Sequence[str]], *, layers: Sequence[int],
               threshold: float = SINK_THRESHOLD, top_tokens: int = 8) -> SinkReport:
    """Sinks over texts: patterns[t] is [layers, heads, length, length] (unpadded), tokens[t] its token strings."""
    if len(patterns) == 0 or len(patterns) != len(tokens):
        raise MlxscanError(f"need one pattern per text and at least one text; got {len(patterns)} and {len(tokens)}")
    if not 0 < threshold < 1:
        raise MlxscanError(f"threshold must lie between 0 and 1, got {threshold}")
    first, ratio, top, second, second_is_sink, primary_first = [], [], [], [], [], []
    counter: Counter = Counter()
    for pattern, text_tokens in zip(patterns, tokens):
        received = attention_received(pattern)  # [layers, heads, length]
        if received.shape[-1] != len(text_tokens) or received.shape[0] != len(layers):
            raise MlxscanError(f"pattern {pattern.shape} does not match {len(layers)} layers x {len(text_tokens)} tokens")
        order = np.argsort(-received, axis=-1, kind="stable")  # most-attended first; ties: earlier key
        ranked = np.take_along_axis(received, order[..., :2], axis=-1)  # [layers, heads, 2]
        first.append(received[..., 0])
        ratio.append(received[..., 0] / uniform_received(len(text_tokens))[0])
        primary_first.append(order[..., 0] == 0)
        top.append(ranked[..., 0])
        second.append(ranked[..., 1])
        is_sink = ranked[..., 1] > threshold
        second_is_sink.append(is_sink)
        counter.update(text_tokens[k] for k in order[..., 1][is_sink])
    mean = lambda values: np.mean(np.stack(values).astype(np.float64), axis=0)  # noqa: E731
    return SinkReport(tuple(int(l) for l in layers), float(threshold), mean(first), mean(ratio), mean(primary_first),
                      mean(top), mean(second), mean(second_is_sink), counter.most_common(top_tokens), len(patterns))
