"""sha256 of weight files, remembered by (path, size, mtime) so large models are hashed once."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .tokenizer import cache_dir


def sha256_of(path: Path) -> str:
    """A file's sha256, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(files: list[Path]) -> str:
    """One hash for several files: their own sha256s, in order, hashed together (or the file's own if one)."""
    known_path = cache_dir() / "hashes.json"
    try:
        known = json.loads(known_path.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    hashes = []
    for file in files:
        stat = file.stat()
        key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in known:
            known[key] = sha256_of(file)
        hashes.append(known[key])
    try:
        known_path.parent.mkdir(parents=True, exist_ok=True)
        known_path.write_text(json.dumps(known))
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not stop a scan
    return hashes[0] if len(hashes) == 1 else hashlib.sha256("".join(hashes).encode()).hexdigest()
