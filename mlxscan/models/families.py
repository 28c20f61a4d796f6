"""One small adapter per architecture family: what each block adds to the residual stream.

Llama and Qwen2 add `attn(norm(x))` and `mlp(norm(h))`; Gemma 2 wraps both branches in a second
norm (its `post_attention_layernorm` is applied to the attention output, where in Llama that name
is the norm before the MLP), scales the embeddings by sqrt(d_model), soft-caps the logits and
uses sliding-window attention on alternate layers (which mlx-lm's gemma2 leaves out).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MlxscanError


@dataclass(frozen=True)
class Family:
    name: str
    mlx_lm_module: str  # the file under mlx_lm/models holding ModelArgs and Model
    sandwich_norms: bool  # Gemma 2: norms on both branch outputs as well as their inputs
    scales_embeddings: bool  # Gemma: h = embed * sqrt(d_model)
    attention_needs_array_mask: bool  # Gemma 2's attention compares mask.dtype, so no "causal" string
    mlp_activation: str  # neurons = act(gate(x)) * up(x): "silu" (SwiGLU) or "gelu_tanh" (GeGLU)


FAMILIES = {
    "llama": Family("llama", "llama", False, False, False, "silu"),
    "qwen2": Family("qwen2", "qwen2", False, False, False, "silu"),
    "gemma2": Family("gemma2", "gemma2", True, True, True, "gelu_tanh"),
}
# model_type values that are one of the families under another name.
ALIASES = {"mistral": "llama"}


def family_for(model_type: str | None) -> Family:
    name = ALIASES.get(model_type, model_type)
    if name not in FAMILIES:
        supported = ", ".join(sorted([*FAMILIES, *ALIASES]))
        raise MlxscanError(
            f"model_type {model_type!r} is not supported (supported: {supported}); "
            "pick a model of one of these architectures"
        )
    return FAMILIES[name]


def sliding_layers(config: dict, n_layers: int) -> tuple[int | None, frozenset[int]]:
    """(window, indices of the layers that attend within the window) from a Hugging Face config."""
    family = family_for(config.get("model_type"))
    window = config.get("sliding_window")
    if family.name == "qwen2":
        if config.get("use_sliding_window"):
            raise MlxscanError("Qwen2 configs with use_sliding_window=true are not supported; set it to false")
        return None, frozenset()
    layer_types = config.get("layer_types")
    if layer_types:
        sliding = frozenset(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    elif family.name == "gemma2":
        sliding = frozenset(range(0, n_layers, 2))  # Gemma 2 alternates, starting with a local layer
    else:
        sliding = frozenset()
    if sliding and not window:
        raise MlxscanError("the config marks sliding-window layers but gives no sliding_window size")
    return (int(window) if sliding else None), sliding
