"""Turn a config and a dict of weights into one of mlx-lm's model objects, in the dtype asked for."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import MlxscanError
from .families import Family, family_for
from .mlx_lm_classes import model_module

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def normalize_config(config: dict) -> dict:
    """Repair the config.json forms that mlx-lm would misread.

    transformers 5 writes `rope_parameters: {"rope_theta": ..., "rope_type": ...}` and may leave out
    the top-level `rope_theta`; mlx-lm reads only the top level and silently falls back to its own
    default (1e6 for qwen2 where the model used 1e4), so copy the values up.
    """
    config = dict(config)
    if "text_config" in config and "model_type" not in config:
        config = {**config["text_config"], **{k: v for k, v in config.items() if k != "text_config"}}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and config.get("rope_theta") is None:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def quantization_params(path: str, module: nn.Module, weights: dict) -> dict:
    """Group size and bits a packed weight was stored with, read off the array shapes."""
    scales = weights[f"{path}.scales"]
    in_dims = module.weight.shape[-1]
    group_size = in_dims // scales.shape[-1]
    bits = weights[f"{path}.weight"].shape[-1] * 32 // in_dims
    if scales.dtype == mx.uint8 or f"{path}.biases" not in weights:
        raise MlxscanError(f"{path}: only affine quantization (weight, scales, biases) is supported")
    return {"group_size": group_size, "bits": bits}


def build_model(
    config: dict, weights: dict[str, mx.array], *, dtype: str, dequantize: bool
) -> tuple[nn.Module, Family]:
    """An mlx-lm Model with these weights loaded, strictly: a missing or unexpected weight is an error.

    Quantized weights (`X.weight` packed, `X.scales`, `X.biases`) are either dequantized into plain
    `dtype` matrices (exact parity, and on CPU the fast BLAS path) or kept packed (less memory,
    MLX's quantized kernels).
    """
    family = family_for(config.get("model_type"))
    module = model_module(family.mlx_lm_module)
    args = module.ModelArgs.from_dict(config)
    model = module.Model(args)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    target = DTYPES[dtype]

    quantized = {
        path: quantization_params(path, m, weights)
        for path, m in model.named_modules()
        if hasattr(m, "to_quantized") and f"{path}.scales" in weights
    }
    weights = dict(weights)
    if dequantize:
        for path, q in quantized.items():
            packed = weights.pop(f"{path}.weight")
            scales, biases = weights.pop(f"{path}.scales"), weights.pop(f"{path}.biases")
            weights[f"{path}.weight"] = mx.dequantize(
                packed, scales.astype(mx.float32), biases.astype(mx.float32), **q
            )
    elif quantized:
        nn.quantize(model, class_predicate=lambda path, m: quantized.get(path, False))
    weights = {
        name: value if value.dtype in (mx.uint32, mx.uint8) else value.astype(target)
        for name, value in weights.items()
    }
    expected = {name for name, _ in tree_flatten(model.parameters())}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        problem = f"missing weights {missing[:4]}" if missing else f"unexpected weights {unexpected[:4]}"
        if missing and missing[0].startswith("lm_head"):
            problem += " (the config says the embeddings are not tied, but the file has no output head)"
        raise MlxscanError(f"the weights do not fit the {family.name} config: {problem}; check the model files")
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model, family
