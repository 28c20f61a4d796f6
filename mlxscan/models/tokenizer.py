"""The tokenizer transformers would build for a model, without transformers on the runtime path.

transformers is the reference for token ids, but importing its tokenizer classes imports torch
whenever torch is installed, and building a tokenizer from GGUF metadata takes seconds. So
transformers builds it once, in a child process that cannot see torch, and saves it; we cache the
files and load `tokenizer.json` with the `tokenizers` library (a fraction of a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import MlxscanError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt")


def cache_dir() -> Path:
    return Path(os.environ.get("MLXSCAN_CACHE") or Path.home() / ".cache" / "mlxscan")


@dataclass
class Tokenizer:
    """Token ids exactly as transformers' tokenizer for the same model gives them."""

    backend: "tokenizers.Tokenizer"  # noqa: F821 (imported lazily)
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    adds_bos: bool
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; a text that already starts with the BOS token does not get a second one."""
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text` (special tokens get (0, 0))."""
        add_special = not (self.adds_bos and self.bos_token and text.startswith(self.bos_token))
        encoding = self.backend.encode(text, add_special_tokens=add_special)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_saved(cls, folder: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(folder / "tokenizer.json"))
        settings = json.loads((folder / "tokenizer_config.json").read_text())
        probe = json.loads((folder / "mlxscan_probe.json").read_text())
        if backend.encode(probe["text"]).ids != probe["ids"]:
            raise MlxscanError(f"the cached tokenizer in {folder} disagrees with transformers; delete that folder")

        def token_text(value):
            return value.get("content") if isinstance(value, dict) else value

        bos, eos = token_text(settings.get("bos_token")), token_text(settings.get("eos_token"))
        return cls(
            backend=backend,
            bos_token=bos,
            eos_token=eos,
            bos_token_id=backend.token_to_id(bos) if bos else None,
            eos_token_id=backend.token_to_id(eos) if eos else None,
            adds_bos=probe["adds_bos"],
            chat_template=settings.get("chat_template"),
        )


def load_tokenizer(source: Path, gguf_file: str | None = None) -> Tokenizer:
    """The tokenizer of a Hugging Face folder, or of `source/gguf_file`, through the cache."""
    key = _cache_key(source, gguf_file)
    folder = cache_dir() / "tokenizers" / key
    if not (folder / "mlxscan_probe.json").exists():
        _export_with_transformers(source, gguf_file, folder)
    return Tokenizer.from_saved(folder)


def _cache_key(source: Path, gguf_file: str | None) -> str:
    files = [source / gguf_file] if gguf_file else [source / name for name in _TOKENIZER_FILES]
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    if not stamp:
        raise MlxscanError(f"{source} has no tokenizer files (tokenizer.json or tokenizer.model); add the model's tokenizer")
    stamp.append(metadata.version("transformers"))
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]


def _export_with_transformers(source: Path, gguf_file: str | None, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=folder.parent, prefix=".building-")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mlxscan.models._export_tokenizer", str(source), gguf_file or "", scratch],
            capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise MlxscanError(f"transformers could not build the tokenizer of {source}: {last}")
        if not folder.exists():  # another process may have finished the same export first
            os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
