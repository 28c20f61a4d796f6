"""The site vocabulary: every place in the forward pass that can be recorded or intervened on.

Per-layer sites come back as [batch, layers, seq, width]; model-level sites as [batch, seq, width].
"""

from __future__ import annotations

from ..errors import MlxscanError

# name -> (width attribute of the model, what it is)
LAYER_SITES = {
    "resid_pre": ("d_model", "residual stream entering the block"),  # [batch, seq, d_model]
    "attn_out": ("d_model", "what attention adds to the residual (after Gemma 2's post-norm)"),
    "resid_mid": ("d_model", "residual after attention, entering the MLP branch"),
    "mlp_act": ("d_mlp", "MLP neurons: act(gate(x)) * up(x), the input of down_proj"),  # [batch, seq, d_mlp]
    "mlp_out": ("d_model", "what the MLP adds to the residual (after Gemma 2's post-norm)"),
    "resid_post": ("d_model", "residual stream leaving the block"),
}
MODEL_SITES = {
    "embed": ("d_model", "token embeddings as they enter layer 0 (Gemma's sqrt(d_model) scale applied)"),
    "final_norm": ("d_model", "the last residual after the final norm: the LM head's input"),
    "logits": ("vocab_size", "next-token logits (after Gemma 2's soft-capping)"),
}
ALL_SITES = {**LAYER_SITES, **MODEL_SITES}


def check_site(name: str) -> str:
    if name not in ALL_SITES:
        raise MlxscanError(f"unknown site {name!r}; valid sites: {', '.join(ALL_SITES)}")
    return name


def is_layer_site(name: str) -> bool:
    return check_site(name) in LAYER_SITES


def site_width(model, name: str) -> int:
    return getattr(model, ALL_SITES[check_site(name)][0])
