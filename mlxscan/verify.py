"""The reference check: the same weights and tokens through MLX and through transformers.

transformers runs in a child process (mlxscan.reference), so torch never enters this one. Both
sides see the same token ids (ours, which the tests hold equal to transformers' tokenizer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MlxscanError
from .stimuli import read_texts  # noqa: F401  (verify --texts reads texts the way scans do)

DEFAULT_TEXTS = (
    "The capital of France is",
    "A robin is a kind of bird, and a hammer is a kind of tool.",
    "She counted seven red apples, then gave three of them to her brother.",
    "def add(a, b):\n    return a + b",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Naïve café owners rarely expect 42 customers before 9 o'clock!",
)
TOLERANCE = 1e-4  # relative error allowed in float32, logits and every layer


@dataclass(frozen=True)
class VerifyReport:
    model: str
    n_texts: int
    n_tokens: int
    logits_rel_err: float
    hidden_rel_err: list[float]  # per layer (resid_post), worst text
    embed_rel_err: float
    final_norm_rel_err: float
    top1_agree: float  # fraction of positions whose argmax token agrees
    tolerance: float
    ok: bool
    quantized_drift: dict | None  # the packed quantized MLX path against the dequantized float32 one
    blas: str
    versions: dict
    # The arrays the numbers come from: per-text errors (`hidden_rel_err_per_text` is [texts, layers]) and
    # the token ids (-1 padded). Saved by `--out`, left out of the JSON record.
    arrays: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "arrays"}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _reference_source(model, scratch: Path) -> dict:
    """Where transformers should read the same weights: the GGUF itself, the folder, or an export."""
    if model.path.suffix == ".gguf":
        return {"folder": str(model.path.parent), "gguf_file": model.path.name}
    raw = json.loads((model.path / "config.json").read_text())
    if "quantization" not in raw and "quantization_config" not in raw:
        return {"folder": str(model.path)}
    # An MLX-quantized folder: transformers cannot read it, so hand it our dequantized float32 weights.
    import mlx.core as mx
    from mlx.utils import tree_flatten

    export = scratch / "dequantized"
    export.mkdir()
    mx.save_safetensors(str(export / "model.safetensors"), dict(tree_flatten(model.module.parameters())),
                        metadata={"format": "pt"})
    clean = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
    (export / "config.json").write_text(json.dumps(clean))
    return {"folder": str(export)}


def run_reference(model, token_lists: list[list[int]]) -> list[dict[str, np.ndarray]]:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        spec = {**_reference_source(model, scratch), "tokens": token_lists}
        (scratch / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "MLXSCAN_BLAS": "bundled", "TRANSFORMERS_VERBOSITY": "error"}
        result = subprocess.run([sys.executable, "-m", "mlxscan.reference", str(scratch / "spec.json"),
                                 str(scratch / "out.npz")], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise MlxscanError(f"the transformers reference failed: {last}")
        with np.load(scratch / "out.npz") as data:
            return [{key: data[f"{key}_{n}"] for key in ("embed", "resid_post", "final_norm", "logits")}
                    for n in range(len(token_lists))]


def per_text_errors(ours, theirs) -> dict[str, np.ndarray]:
    """Relative errors per text: logits/embed/final_norm [texts], hidden (resid_post) [texts, layers]."""
    pairs = list(zip(ours, theirs))
    return {
        "logits_rel_err": np.array([relative_error(a["logits"], b["logits"]) for a, b in pairs]),
        "embed_rel_err": np.array([relative_error(a["embed"], b["embed"]) for a, b in pairs]),
        "final_norm_rel_err": np.array([relative_error(a["final_norm"], b["final_norm"]) for a, b in pairs]),
        "hidden_rel_err": np.array([[relative_error(x, y) for x, y in zip(a["resid_post"], b["resid_post"])]
                                    for a, b in pairs]),
        "top1_agree": np.array([float((a["logits"].argmax(-1) == b["logits"].argmax(-1)).mean()) for a, b in pairs]),
    }


def _summarize(errors: dict[str, np.ndarray], ours) -> dict:
    """Worst text for every error; top-1 agreement over all positions."""
    lengths = np.array([len(a["logits"]) for a in ours])
    return {
        "logits_rel_err": float(errors["logits_rel_err"].max()),
        "hidden_rel_err": [float(value) for value in errors["hidden_rel_err"].max(axis=0)],
        "embed_rel_err": float(errors["embed_rel_err"].max()),
        "final_norm_rel_err": float(errors["final_norm_rel_err"].max()),
        "top1_agree": float((errors["top1_agree"] * lengths).sum() / lengths.sum()),
    }


def _record_mlx(model, token_lists) -> list[dict[str, np.ndarray]]:
    recording = model.run(token_lists, sites=["embed", "resid_post", "final_norm"], logits=True)
    return [{site: recording.unpadded(site, n) for site in ("embed", "resid_post", "final_norm", "logits")}
            for n in range(len(token_lists))]


def verify(ref=None, texts=None, *, dtype: str | None = None, tolerance: float = TOLERANCE,
           progress: Callable[[str], None] = lambda message: None) -> VerifyReport:
    """Compare MLX (dequantized, float32) with transformers (float32) on `texts`.

    For a quantized model, also measure how far the packed quantized MLX path (in `dtype`) drifts
    from the dequantized float32 one, layer by layer: what 4-bit costs.
    """
    from . import _blas
    from .models import load

    texts = list(texts or DEFAULT_TEXTS)
    progress("loading the model in MLX (float32, dequantized)")
    model = load(ref, dtype="float32", dequantize=True)
    token_lists = model.token_lists(texts)
    ours = _record_mlx(model, token_lists)
    progress("running the same weights through transformers (torch, float32) in a child process")
    theirs = run_reference(model, token_lists)
    per_text = per_text_errors(ours, theirs)
    errors = _summarize(per_text, ours)
    worst = max([errors["logits_rel_err"], *errors["hidden_rel_err"]])

    drift = None
    quantized = load(ref, dtype=dtype, dequantize=False) if ref is None or _has_quantized_weights(model) else None
    if quantized is not None and quantized.quantized:
        progress(f"measuring the quantized MLX path ({quantized.dtype}) against the dequantized one")
        drift_per_text = per_text_errors(_record_mlx(quantized, token_lists), ours)
        per_text.update({f"quantized_{key}": value for key, value in drift_per_text.items()})
        drift = {"dtype": quantized.dtype, **_summarize(drift_per_text, ours)}
    versions = {name: _version(name) for name in ("mlxscan", "mlx", "mlx-lm", "transformers", "torch")}
    arrays = {**{f"{key}_per_text": value for key, value in per_text.items()}, "token_ids": _ragged(token_lists)}
    return VerifyReport(
        model=model.ref, n_texts=len(texts), n_tokens=sum(map(len, token_lists)), tolerance=tolerance,
        ok=bool(worst <= tolerance), quantized_drift=drift, blas=_blas.describe(), versions=versions,
        arrays=arrays, **errors,
    )


def _ragged(token_lists) -> np.ndarray:
    width = max(map(len, token_lists))
    return np.array([tokens + [-1] * (width - len(tokens)) for tokens in token_lists], dtype=np.int64)


def _has_quantized_weights(model) -> bool:
    if model.path.suffix == ".gguf":
        return True  # GGUF matrices may be packed; loading again tells
    raw = json.loads((model.path / "config.json").read_text())
    return "quantization" in raw


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
