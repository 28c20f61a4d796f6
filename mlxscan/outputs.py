"""Writing a command's --out folder: each file appears whole or not at all."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import MlxscanError


def _encode(name: str, value) -> bytes:
    if name.endswith(".json"):
        return (json.dumps(value, indent=2, default=str) + "\n").encode()
    if name.endswith(".npz"):
        buffer = io.BytesIO()
        np.savez(buffer, **value)
        return buffer.getvalue()
    if name.endswith(".npy"):
        buffer = io.BytesIO()
        np.save(buffer, value)
        return buffer.getvalue()
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        return value
    raise TypeError(f"cannot write {name}: unknown kind of output")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_outputs(out_dir: Path, files: dict[str, object]) -> list[Path]:
    """Write every file into out_dir through a temporary name and an atomic rename.

    All contents are encoded before anything touches the disk, so a failure leaves no partial file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MlxscanError(f"--out {out_dir} is a file; give a folder")
    payloads = {name: _encode(name, value) for name, value in files.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, payload in payloads.items():
        handle, temporary = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes files private; outputs are ordinary files
        os.replace(temporary, out_dir / name)
        written.append(out_dir / name)
    return written
