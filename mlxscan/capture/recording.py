"""What a run returns: NumPy arrays of the recorded sites, with the token bookkeeping beside them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sites import is_layer_site


@dataclass(frozen=True)
class InterventionEffect:
    """How much one intervention changed its site at one layer, over the real (unpadded) tokens."""

    intervention: str
    site: str
    layer: int | None
    relative_change: float  # ||after - before|| / ||before||
    tokens_touched: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Recording:
    """Recorded activations of one run.

    `recording[site]` is [batch, layers, seq, width] for per-layer sites (the layers in `layers`)
    and [batch, seq, width] for embed / final_norm / logits. Positions past a sequence's length
    (right padding) are zero; `lengths` gives each sequence's true length.
    """

    arrays: dict[str, np.ndarray]
    tokens: list[list[int]]
    lengths: np.ndarray  # [batch]
    layers: tuple[int, ...]
    effects: list[InterventionEffect] = field(default_factory=list)

    def __getitem__(self, site: str) -> np.ndarray:
        if site not in self.arrays:
            raise KeyError(f"site {site!r} was not recorded; recorded: {', '.join(self.arrays) or 'none'}")
        return self.arrays[site]

    def __contains__(self, site: str) -> bool:
        return site in self.arrays

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.arrays)

    @property
    def logits(self) -> np.ndarray:
        """[batch, seq, vocab]"""
        return self["logits"]

    def layer_index(self, layer: int) -> int:
        """Position of model layer `layer` along the layers axis of per-layer sites."""
        return self.layers.index(layer)

    def unpadded(self, site: str, item: int) -> np.ndarray:
        """One sequence's array without padding: [layers, length, ...], [length, width], or for attn_pattern
        [layers, heads, length, length]."""
        array = self[site][item]
        length = int(self.lengths[item])
        if site == "attn_pattern":
            return array[:, :, :length, :length]
        return array[:, :length] if is_layer_site(site) else array[:length]
