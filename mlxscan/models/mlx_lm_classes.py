"""mlx-lm's model classes, imported without importing mlx-lm's package `__init__`.

`import mlx_lm.models.llama` first runs `mlx_lm/__init__.py`, which imports its generation and
conversion code and through them transformers, which imports torch whenever it is installed. The
model files themselves need only mlx, so we mount mlx-lm's `models/` folder under a private package
name and import the files from there: the runtime path stays free of torch and transformers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types

from ..errors import MlxscanError

_ALIAS = "mlxscan._mlx_lm_models"


def _mount() -> str:
    if _ALIAS not in sys.modules:
        spec = importlib.util.find_spec("mlx_lm")  # locates the package without executing it
        if spec is None or not spec.submodule_search_locations:
            raise MlxscanError("mlx-lm is not installed: run `pip install mlx-lm`")
        models_dir = [f"{location}/models" for location in spec.submodule_search_locations]
        package = types.ModuleType(_ALIAS)
        package.__path__ = models_dir
        package.__spec__ = importlib.machinery.ModuleSpec(_ALIAS, None, is_package=True)
        package.__spec__.submodule_search_locations = models_dir
        sys.modules[_ALIAS] = package
    return _ALIAS


def model_module(model_type: str) -> types.ModuleType:
    """The module `mlx_lm.models.<model_type>` (ModelArgs, Model, ...)."""
    return importlib.import_module(f"{_mount()}.{model_type}")
