"""What a study directory records about where its numbers came from: versions, model, stimuli, machine."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from ..store.scan_store import now  # noqa: F401 (study.json's times, as a scan's manifest writes them)

PACKAGES = ("mlxscan", "mlx", "mlx-lm", "mlx-cpu", "numpy", "scipy", "scikit-learn", "networkx", "click")


def versions() -> dict:
    """Installed versions of the packages the numbers depend on (None where one is not installed)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name.replace("-", "_")] = None
    return found


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": _cpu_name(),
            "cores": os.cpu_count(), "memory_gb": _memory_gb()}


def model_record(model_ref: str | None) -> dict:
    """The model's reference and weight hash (loads the model's weights once; the hash is cached)."""
    from ..models import load

    model = load(model_ref)
    return {"ref": model.ref, "sha256": model.weights_sha256(), "n_layers": model.n_layers,
            "d_model": model.d_model, "d_mlp": model.d_mlp}
