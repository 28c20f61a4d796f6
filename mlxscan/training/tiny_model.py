"""A small Llama-architecture decoder for training in MLX, its seeded init, and its checkpoints.

The model is mlx-lm's own Llama (the class mlxscan.load builds), so a checkpoint saved here in the
Hugging Face layout loads back through mlxscan.load with the same weights and the same logits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import MlxscanError
from ..capture.cpu_math import exp_poly
from ..models.mlx_lm_classes import model_module
from .corpus import EOS_ID, save_tokenizer

INIT_STD = 0.02  # GPT-2's init; the residual outputs (o_proj, down_proj) get it / sqrt(2 n_layers)


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the model; vocab_size comes from the tokenizer."""

    vocab_size: int
    n_layers: int = 4
    d_model: int = 128
    d_mlp: int = 512  # MLP neurons per layer: the units the wiring cost places
    n_heads: int = 4
    max_context: int = 256
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise MlxscanError(f"d_model {self.d_model} must split into {self.n_heads} heads of even width")
        if min(self.n_layers, self.d_model, self.d_mlp, self.n_heads, self.vocab_size) < 1:
            raise MlxscanError("layers, d_model, d_mlp, heads and vocab size must all be at least 1")

    def hf_config(self) -> dict:
        """config.json as transformers writes a tied Llama (rope_theta at the top level, where mlx-lm reads it)."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.d_model, "intermediate_size": self.d_mlp, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_heads,
                "head_dim": self.d_model // self.n_heads, "max_position_embeddings": self.max_context,
                "rms_norm_eps": 1e-5, "rope_theta": self.rope_theta, "hidden_act": "silu",
                "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
                "initializer_range": INIT_STD, "bos_token_id": None, "eos_token_id": EOS_ID,
                "pad_token_id": EOS_ID, "torch_dtype": "float32"}

    def n_parameters(self) -> int:
        per_layer = 4 * self.d_model ** 2 + 3 * self.d_model * self.d_mlp + 2 * self.d_model
        return self.n_layers * per_layer + self.vocab_size * self.d_model + self.d_model


def _initial(name: str, shape: tuple[int, ...], n_layers: int, rng: np.random.Generator) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    std = INIT_STD / np.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else INIT_STD
    return rng.normal(0.0, std, size=shape).astype(np.float32)


def build_model(config: TinyConfig, seed: int):
    """mlx-lm's Llama Model with seeded float32 weights (NumPy's generator: the same on every machine)."""
    module = model_module("llama")
    model = module.Model(module.ModelArgs.from_dict(config.hf_config()))
    rng = np.random.default_rng([seed, 11])  # stream 11: apart from the data order's and the layout's
    names = sorted(name for name, _ in tree_flatten(model.parameters()))  # a fixed order, whatever the tree's
    shapes = dict((name, value.shape) for name, value in tree_flatten(model.parameters()))
    model.update(tree_unflatten([(name, mx.array(_initial(name, shapes[name], config.n_layers, rng)))
                                 for name in names]))
    mx.eval(model.parameters())
    return model


def save_checkpoint(folder: Path, model, config: TinyConfig, tokenizer, metadata: dict | None = None) -> Path:
    """config.json, model.safetensors and the tokenizer files: a folder mlxscan.load and transformers open.

    `metadata` (strings only, e.g. λ and seed) goes into the safetensors header.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights,
                        metadata={"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}})
    (folder / "config.json").write_text(json.dumps(config.hf_config(), indent=2) + "\n")
    save_tokenizer(tokenizer, folder, config.max_context)
    (folder / "mlxscan_training.json").write_text(json.dumps({"config": asdict(config), **(metadata or {})},
                                                             indent=2, default=str) + "\n")
    return folder


def mlp_weights(model) -> list[dict[str, np.ndarray]]:
    """Per layer {"gate": [d_mlp, d_model], "up": [d_mlp, d_model], "down": [d_model, d_mlp]} as float32 NumPy."""
    return [{"gate": np.array(layer.mlp.gate_proj.weight), "up": np.array(layer.mlp.up_proj.weight),
             "down": np.array(layer.mlp.down_proj.weight)} for layer in model.model.layers]


# ---------------------------------------------------------------- a faster MLP activation for CPU training


@mx.custom_function
def _silu_cpu(x: mx.array) -> mx.array:
    return x / (1.0 + exp_poly(-x))


@_silu_cpu.vjp
def _silu_cpu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (tuple, list)) else primals
    s = 1.0 / (1.0 + exp_poly(-x))  # sigmoid
    return (cotangent * s * (1.0 + x * (1.0 - s)),)  # d silu / dx = s (1 + x (1 - s))


def use_cpu_activation(model) -> None:
    """Give every MLP the polynomial SiLU (capture/cpu_math.py) with its exact derivative, in place.

    MLX's Linux CPU build evaluates exp one element at a time; SiLU and its gradient were the largest
    part of a training step. The values agree with nn.silu to float32 rounding, and the parameter names
    stay the same, so checkpoints are unchanged. Only training uses it (mlxscan.load builds plain models).
    """
    if mx.default_device() != mx.cpu:
        return
    for block in model.model.layers:
        mlp = block.mlp
        if not isinstance(mlp, _CpuMLP):
            mlp.__class__ = _make_cpu_mlp(type(mlp))


_CPU_CLASSES: dict[type, type] = {}


class _CpuMLP:
    """Marker base of the MLP subclasses made by _make_cpu_mlp."""


def _make_cpu_mlp(base: type) -> type:
    if base not in _CPU_CLASSES:
        def __call__(self, x):
            return self.down_proj(_silu_cpu(self.gate_proj(x)) * self.up_proj(x))
        _CPU_CLASSES[base] = type(f"Cpu{base.__name__}", (base, _CpuMLP), {"__call__": __call__})
    return _CPU_CLASSES[base]
