"""The scan store.

DIR/
  manifest.json     what was recorded, from what, by what; `status` is "complete" only once every
                    array is flushed (written last, atomically): a store is never left looking
                    complete when it is not
  progress.json     how many stimuli are finished (updated after each batch is flushed)
  stimuli.jsonl     a copy of the stimuli
  <site>.npy        pooled: [n_stimuli, n_layers, width]; pool "all": [n_tokens, n_layers, width]
  offsets.npy       pool "all" only: [n_stimuli + 1], stimulus i owns rows offsets[i]:offsets[i+1]
  token_ids.npy     pool "all" only: [n_tokens]
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import MlxscanError
from ..stimuli import StimulusSet, load_stimuli, load_texts

FORMAT = "mlxscan-scan/1"
POOLS = ("last", "mean", "word", "all")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, value) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        json.dump(value, stream, indent=2)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def read_manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MlxscanError(f"{path} is damaged ({error}); rerun the scan with --overwrite") from error


def _reserve(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    """A new .npy of this shape, its disk space reserved now, so a full disk fails here and not mid-scan."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as stream:
            try:
                os.posix_fallocate(stream.fileno(), 0, os.path.getsize(path))
            except OSError as error:
                raise MlxscanError(f"not enough disk space for {path.name} "
                                   f"({os.path.getsize(path) / 1e9:.2f} GB): {error.strerror}") from error
    return array


class ScanWriter:
    """Creates or resumes a store and writes finished batches into it.

    Each batch opens the memory maps, writes, flushes and closes them again, so written pages leave
    the process: peak memory follows the batch, not the size of the scan.
    """

    def __init__(self, folder: Path, manifest: dict, stimuli: StimulusSet, widths: dict[str, int], n_rows: int):
        self.folder = Path(folder)
        self.manifest = manifest
        progress = self.folder / "progress.json"
        resuming = progress.exists() and (self.folder / "manifest.json").exists()
        self.done = json.loads(progress.read_text())["done"] if resuming else 0
        created = []
        try:
            for site, width in widths.items():
                path = self.folder / f"{site}.npy"
                if not (resuming and path.exists()):
                    created.append(path)
                    _reserve(path, (n_rows, len(manifest["layers"]), width), manifest["store_dtype"]).flush()
        except (MlxscanError, OSError):
            for path in created:  # leave no half-made store behind: the same command can run again later
                path.unlink(missing_ok=True)
            raise
        if not resuming:
            (self.folder / "stimuli.jsonl").write_text(stimuli.to_jsonl())
            write_json_atomic(self.folder / "manifest.json", manifest)
            write_json_atomic(progress, {"done": 0})

    def write(self, rows: dict[str, list[tuple[int, np.ndarray]]], *, done: int) -> None:
        """rows[site] = [(first row, values), ...]; afterwards the first `done` stimuli count as finished."""
        for site, pieces in rows.items():
            array = np.load(self.folder / f"{site}.npy", mmap_mode="r+")
            for first, values in pieces:
                array[first:first + len(values)] = values
            array.flush()
            del array
        self.done = done
        write_json_atomic(self.folder / "progress.json", {"done": done})

    def finish(self) -> dict:
        self.manifest = {**self.manifest, "status": "complete", "finished": now()}
        write_json_atomic(self.folder / "manifest.json", self.manifest)
        return self.manifest


class Scan:
    """A finished scan: memory-mapped arrays (read-only NumPy views) with the stimuli table beside them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise MlxscanError(f"{self.folder} is not a scan (no manifest.json); create one with `mlxscan scan --out {self.folder}`")
        if manifest.get("format") != FORMAT:
            raise MlxscanError(f"{self.folder} holds a scan of format {manifest.get('format')!r}; this mlxscan reads {FORMAT}")
        if manifest.get("status") != "complete":
            done = json.loads((self.folder / "progress.json").read_text())["done"] if (self.folder / "progress.json").exists() else 0
            raise MlxscanError(f"the scan in {self.folder} is incomplete ({done} of {manifest['stimuli']['n']} stimuli); "
                               "run the same `mlxscan scan` command again to resume it")
        self.manifest = manifest
        loader = load_texts if manifest["stimuli"].get("kind") == "texts" else load_stimuli
        self.stimuli = loader(self.folder / "stimuli.jsonl")
        if self.stimuli.sha256 != manifest["stimuli"]["sha256"]:
            raise MlxscanError(f"{self.folder / 'stimuli.jsonl'} was changed after the scan; "
                               "rerun the scan with --overwrite")
        self._arrays: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Scan({str(self.folder)!r}, model={m['model']['ref']!r}, stimuli={m['stimuli']['n']}, "
                f"sites={m['sites']}, layers={len(m['layers'])}, pool={m['pool']!r})")

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def pool(self) -> str:
        return self.manifest["pool"]

    @property
    def labels(self) -> np.ndarray:
        return self.stimuli.labels

    @property
    def groups(self) -> np.ndarray:
        return self.stimuli.groups

    def __len__(self) -> int:
        return len(self.stimuli)

    def __getitem__(self, site: str) -> np.ndarray:
        """[n_stimuli, n_layers, width] (pool "all": [n_tokens, n_layers, width]), memory-mapped, read-only."""
        if site not in self.manifest["sites"]:
            raise MlxscanError(f"site {site!r} is not in this scan; it has {', '.join(self.sites)}")
        if site not in self._arrays:
            self._arrays[site] = np.load(self.folder / f"{site}.npy", mmap_mode="r")
        return self._arrays[site]

    def layer(self, site: str, layer: int) -> np.ndarray:
        """One model layer of a site: [n_stimuli, width]."""
        if layer not in self.manifest["layers"]:
            raise MlxscanError(f"layer {layer} was not recorded; this scan has layers {self.layers}")
        return self[site][:, self.manifest["layers"].index(layer)]

    @property
    def offsets(self) -> np.ndarray:
        """Pool "all": stimulus i's tokens are rows offsets[i]:offsets[i + 1]."""
        if self.pool != "all":
            raise MlxscanError("offsets exist only for token-level scans (--pool all)")
        return np.load(self.folder / "offsets.npy")

    def tokens_of(self, site: str, item: int) -> np.ndarray:
        """Pool "all": one stimulus' token-level array [length, n_layers, width]."""
        offsets = self.offsets
        return self[site][offsets[item]:offsets[item + 1]]


def open_scan(folder) -> Scan:
    """Open a finished scan; its arrays are memory-mapped NumPy views."""
    return Scan(Path(folder))
