"""Reading and writing SAEs: mlxscan's own folders and the two common published layouts.

- mlxscan / SAELens: a folder with `cfg.json` and `sae_weights.safetensors` (W_enc, W_dec, b_enc, b_dec,
  and `threshold` for JumpReLU). mlxscan writes this layout itself, with SAELens' keys (d_in, d_sae,
  architecture, k, apply_b_dec_to_input, hook_name) plus an `mlxscan` block naming the site, layer and model.
  SAELens 5 keeps hook_name and activation_fn_kwargs at the top level, SAELens 6 under `meta`; both are read.
- Gemma Scope: `params.npz` (or a .npz / .safetensors file with W_enc, W_dec, b_enc, b_dec, threshold),
  JumpReLU, b_dec not subtracted before encoding. Its site and layer come from the path
  (`.../gemma-scope-2b-pt-res/layer_12/...`) or from --site / --layer.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MlxscanError
from .model import SaeConfig, SparseAutoencoder

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"
GEMMA_SCOPE_FILE = "params.npz"
_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
# TransformerLens hook names (as SAELens records them) -> mlxscan sites.
_HOOKS = {"hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
          "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out", "mlp.hook_post": "mlp_act"}
_SITE_HOOKS = {site: hook for hook, site in _HOOKS.items()}
# Gemma Scope release names: "...-res" residual stream (after the block), "...-mlp" MLP output.
_GEMMA_SCOPE_KINDS = {"res": "resid_post", "mlp": "mlp_out"}


def hook_name(site: str | None, layer: int | None) -> str | None:
    if site not in _SITE_HOOKS or layer is None:
        return None
    return f"blocks.{layer}.{_SITE_HOOKS[site]}"


def site_of_hook(name: str | None) -> tuple[str | None, int | None]:
    """'blocks.12.hook_resid_post' -> ('resid_post', 12); anything else (None, None)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name or "")
    if match and match.group(2) in _HOOKS:
        return _HOOKS[match.group(2)], int(match.group(1))
    return None, None


def safetensors_bytes(weights: dict[str, np.ndarray]) -> bytes:
    """The safetensors file MLX writes, as bytes (so write_outputs can place it atomically)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / WEIGHTS_FILE
        mx.save_safetensors(str(path), {name: mx.array(value) for name, value in weights.items()})
        return path.read_bytes()


def sae_files(sae: SparseAutoencoder, extra: dict | None = None) -> dict[str, object]:
    """{file name: content} of an SAE folder, for outputs.write_outputs."""
    config = sae.config
    cfg = {"architecture": "standard" if config.architecture == "relu" else config.architecture,
           "d_in": config.d_in, "d_sae": config.d_sae, "dtype": "float32",
           "apply_b_dec_to_input": config.apply_b_dec_to_input, "normalize_activations": "none",
           "meta": {"hook_name": hook_name(config.site, config.layer),
                    "model_name": (config.model or {}).get("ref")},
           "mlxscan": {"site": config.site, "layer": config.layer, "model": config.model,
                       "skip_first": config.skip_first, **(extra or {})}}
    if config.k is not None:
        cfg["k"] = config.k
    return {CONFIG_FILE: cfg, WEIGHTS_FILE: safetensors_bytes(sae.weights())}


def load_sae(path, *, site: str | None = None, layer: int | None = None,
             skip_first: int | None = None) -> SparseAutoencoder:
    """An SAE from a folder or file in any supported layout; site / layer / skip_first override the files."""
    path = Path(path)
    if not path.exists():
        raise MlxscanError(f"{path} does not exist; give an SAE folder (cfg.json + {WEIGHTS_FILE}) or a params.npz")
    if path.is_dir() and (path / CONFIG_FILE).exists():
        config, weights = _read_saelens(path)
    else:
        config, weights = _read_gemma_scope(path)
    config = SaeConfig(**{**config.to_dict(), "site": site or config.site,
                          "layer": config.layer if layer is None else layer,
                          "skip_first": config.skip_first if skip_first is None else skip_first})
    return SparseAutoencoder(config, weights)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                tensors = {name: archive[name] for name in archive.files}
        else:
            tensors = {name: np.array(value.astype(mx.float32)) for name, value in mx.load(str(path)).items()}
    except (OSError, ValueError, RuntimeError) as error:
        raise MlxscanError(f"cannot read SAE weights from {path}: {error}") from error
    if "log_threshold" in tensors and "threshold" not in tensors:  # SAELens' JumpReLU training form
        tensors["threshold"] = np.exp(tensors.pop("log_threshold"))
    scaling = tensors.pop("scaling_factor", None)  # SAELens' finetuning factor: only the neutral one is understood
    if scaling is not None and not np.allclose(scaling, 1.0):
        raise MlxscanError(f"{path} has a scaling_factor other than 1 (a finetuned SAELens SAE); fold it in first")
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise MlxscanError(f"{path} holds tensors {unknown} that no supported SAE layout has "
                           f"(expected {', '.join(_TENSORS)})")
    return {name: np.asarray(value, np.float32) for name, value in tensors.items()}


def _read_saelens(folder: Path) -> tuple[SaeConfig, dict[str, np.ndarray]]:
    try:
        cfg = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MlxscanError(f"{folder / CONFIG_FILE} is not JSON: {error}") from error
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(found) != 1:
            raise MlxscanError(f"{folder} has cfg.json but no {WEIGHTS_FILE} (safetensors found: {found or 'none'})")
        weights_path = folder / found[0]
    weights = _read_tensors(weights_path)
    meta = cfg.get("meta") or {}
    architecture = _architecture(cfg, folder)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    ours = cfg.get("mlxscan") or {}
    site, layer = site_of_hook(meta.get("hook_name") or cfg.get("hook_name"))
    normalize = cfg.get("normalize_activations", "none") or "none"
    if normalize != "none":
        raise MlxscanError(f"{folder}: normalize_activations={normalize!r} is not supported; "
                           "only SAEs that read raw activations (\"none\") can be used")
    config = SaeConfig(
        d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), architecture=architecture,
        k=int(cfg.get("k") or kwargs.get("k")) if architecture == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        site=ours.get("site") or site, layer=ours.get("layer", layer), model=ours.get("model"),
        layout="mlxscan" if ours else "saelens", skip_first=int(ours.get("skip_first", 1)),
        extra={key: value for key, value in ours.items() if key not in ("site", "layer", "model", "skip_first")})
    return config, weights


def _architecture(cfg: dict, folder: Path) -> str:
    name = cfg.get("architecture") or cfg.get("activation_fn_str") or "standard"
    if name == "standard" and cfg.get("activation_fn_str") == "topk":  # SAELens 5 wrote topk this way
        name = "topk"
    mapped = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(name)
    if mapped is None:
        raise MlxscanError(f"{folder}: SAE architecture {name!r} is not supported (standard, topk, jumprelu are)")
    return mapped


def _read_gemma_scope(path: Path) -> tuple[SaeConfig, dict[str, np.ndarray]]:
    file = path / GEMMA_SCOPE_FILE if path.is_dir() else path
    if path.is_dir() and not file.exists():
        candidates = sorted(path.glob("*.npz")) + sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise MlxscanError(f"{path} holds no SAE: expected cfg.json + {WEIGHTS_FILE} (SAELens) or one "
                               f"params.npz (Gemma Scope); found {[p.name for p in candidates] or 'nothing'}")
        file = candidates[0]
    weights = _read_tensors(file)
    if "W_enc" not in weights or np.ndim(weights["W_enc"]) != 2:
        raise MlxscanError(f"{file} has no 2-d W_enc [d_in, d_sae]; it is not an SAE in a supported layout")
    d_in, d_sae = weights["W_enc"].shape
    site, layer = _site_from_path(file)
    config = SaeConfig(d_in=int(d_in), d_sae=int(d_sae),
                       architecture="jumprelu" if "threshold" in weights else "relu",
                       apply_b_dec_to_input=False, site=site, layer=layer, layout="gemma-scope")
    return config, weights


def _site_from_path(file: Path) -> tuple[str | None, int | None]:
    """Gemma Scope's folder names: .../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz."""
    text = file.resolve().as_posix()
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"gemma-scope-[^/]*-(res|mlp|att)(?:-[^/]*)?/", text)
    site = _GEMMA_SCOPE_KINDS.get(kind.group(1)) if kind else None
    return site, int(layer.group(1)) if layer else None
