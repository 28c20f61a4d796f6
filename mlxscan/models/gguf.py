"""GGUF files: llama.cpp's names and layout turned into a Hugging Face config and weight names.

`mx.load` reads GGUF natively (Q4_0, Q4_1 and Q8_0 stay packed as MLX affine quantization). What it
leaves to us: the tensor names, the config (kept as metadata), and the rows of the Q and K matrices,
which llama.cpp's converter permutes for its interleaved rotary layout. We undo that permutation so
the weights are in Hugging Face's layout and captured queries and keys line up with transformers'.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx

from ..errors import MlxscanError

# llama.cpp tensor name -> Hugging Face module path (the suffix .weight/.bias/.scales/.biases is kept).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Architectures whose Q/K rows llama.cpp's converter permutes (Qwen2 uses NeoX rotary and is left as is).
_PERMUTED_QK = {"llama"}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


def _value(metadata: dict, key: str, default=None):
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def read_gguf(path: Path) -> tuple[dict, dict[str, mx.array], dict]:
    """(Hugging Face style config, weights under Hugging Face names, raw metadata)."""
    try:
        raw, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as error:
        raise MlxscanError(f"cannot read GGUF {path}: {error}; the file may be truncated or corrupt") from error
    arch = _value(metadata, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MlxscanError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "use the model's Hugging Face folder instead"
        )
    if "rope_freqs.weight" in raw:
        raise MlxscanError(
            f"{path.name} carries rope_freqs (Llama 3.1-style rope scaling), which mlxscan's GGUF reader does not map yet; "
            "use the model's Hugging Face folder"
        )
    config = _config_from_metadata(arch, metadata, tied="output.weight" not in raw)
    weights = {_hf_name(name): array for name, array in raw.items()}
    if arch in _PERMUTED_QK:
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        for name in list(weights):
            match = re.search(r"self_attn\.(q_proj|k_proj)\.", name)
            if match:
                weights[name] = unpermute_rows(weights[name], heads[match.group(1)])
    return config, weights, metadata


def _hf_name(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}.{suffix}"
    return name  # left as is: strict loading then names it as unexpected


def unpermute_rows(array: mx.array, n_heads: int) -> mx.array:
    """Inverse of llama.cpp's `permute`: within each head, interleaved rotary pairs back to halves."""
    rows = array.shape[0]
    rest = array.shape[1:]
    return array.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _config_from_metadata(arch: str, metadata: dict, *, tied: bool) -> dict:
    def get(key, default=None):
        return _value(metadata, f"{arch}.{key}", default)

    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": get("attention.key_length", hidden // n_heads if hidden and n_heads else None),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    missing = [key for key, value in config.items() if value is None]
    if missing:
        raise MlxscanError(f"GGUF metadata lacks {missing}; the file is not a complete {arch} model")
    if arch == "qwen2":
        config["attention_bias"] = True
    return config
