"""The site vocabulary: every place in the forward pass that can be recorded or intervened on.

Per-layer sites come back as [batch, layers, seq, width]; model-level sites as [batch, seq, width].
The attention sites are per-layer too but not vectors per token, so they have their own shapes and
are kept out of LAYER_SITES (which scans and unit analyses iterate): `attn_head` is
[batch, layers, seq, heads, head_dim] and `attn_pattern` [batch, layers, heads, query, key].
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
# Computed only when asked for (recorded or intervened on at a layer): that layer's attention then runs
# explicitly from q/k/v and RoPE instead of the fused kernel. The width is the last axis.
HEAD_SITES = {
    "attn_head": ("head_dim", "each head's output before o_proj (softmax(qk) v)"),  # [batch, seq, heads, head_dim]
    "attn_pattern": (None, "attention weights after softmax, per head"),  # [batch, heads, query, key]
}
SITE_NAMES = (*ALL_SITES, *HEAD_SITES)


def check_site(name: str) -> str:
    if name not in ALL_SITES and name not in HEAD_SITES:
        raise MlxscanError(f"unknown site {name!r}; valid sites: {', '.join(SITE_NAMES)}")
    return name


def is_layer_site(name: str) -> bool:
    return check_site(name) in LAYER_SITES or name in HEAD_SITES


def head_dim(model) -> int:
    """Width of one attention head (Gemma 2 sets it apart from d_model / heads)."""
    config = model.config
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def site_width(model, name: str) -> int | None:
    """The last axis of the site; None for attn_pattern, whose last axis is the sequence."""
    if check_site(name) in HEAD_SITES:
        return head_dim(model) if name == "attn_head" else None
    return getattr(model, ALL_SITES[name][0])
