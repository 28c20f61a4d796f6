"""Reading a study directory (study.json, claims.json, steps/<name>/) for the report.

The reader is lenient where a study is legitimately unfinished (no claims.json yet, a failed step with no
output folder) and strict where the files are broken (not JSON, a claim without its numbers): a report
must show an incomplete study as incomplete, never invent what is missing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..claims import sha256_of
from ..errors import MlxscanError

# The fields a claim record must carry for the ledger to show its numbers (see mlxscan/claims.py).
CLAIM_FIELDS = ("id", "analysis", "hypothesis", "statistic", "value", "control", "control_value", "effect", "ci",
                "p", "test", "replication", "data_files")


@dataclass(frozen=True)
class DataFile:
    """A file a number came from: its path inside the study, the sha256 recorded and what is on disk now."""

    path: str  # relative to the study dir, forward slashes
    recorded_sha256: str | None
    actual_sha256: str | None  # None when the file is missing
    size: int | None

    @property
    def status(self) -> str:
        """'ok', 'missing', 'changed' (sha256 differs from the record) or 'unrecorded' (no sha256 in the record)."""
        if self.actual_sha256 is None:
            return "missing"
        if self.recorded_sha256 is None:
            return "unrecorded"
        return "ok" if self.actual_sha256 == self.recorded_sha256 else "changed"


@dataclass(frozen=True)
class ClaimRow:
    """One claim of claims.json, as the ledger shows it."""

    record: dict  # the claim as stored (all fields of mlxscan.claims.Claim)
    data_files: tuple[DataFile, ...]

    def __getitem__(self, key: str):
        return self.record.get(key)

    @property
    def verdict(self) -> str:
        return self.record.get("verdict") or "not judged"


@dataclass(frozen=True)
class Step:
    """One step of study.json and the files its --out folder holds."""

    record: dict
    folder: Path | None  # steps/<name> when it exists
    figures: tuple[DataFile, ...]  # the PNGs among files
    files: tuple[DataFile, ...]  # every file in the folder (figures included)

    @property
    def name(self) -> str:
        return str(self.record.get("name", "?"))

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "pending")


@dataclass(frozen=True)
class Study:
    root: Path
    provenance: dict  # study.json
    steps: tuple[Step, ...]
    claims: tuple[ClaimRow, ...]
    gate: dict | None  # claims.json without its claims ({"thresholds", "n_tests"}); None when the gate has not run
    problems: tuple[str, ...] = field(default=())  # what the reader noticed: missing or changed data files
    figures: tuple[DataFile, ...] = field(default=())  # PNGs of the whole study, beside study.json (claims.png)

    @property
    def name(self) -> str:
        return str(self.provenance.get("name") or self.root.name)



class _Hasher:
    """sha256 of files inside the study, each read once however many claims cite it."""

    def __init__(self, root: Path):
        self.root, self.known = root.resolve(), {}

    def data_file(self, relative: str, recorded: str | None) -> DataFile:
        relative = relative.replace("\\", "/")
        if relative not in self.known:
            path = (self.root / relative).resolve()
            inside = path == self.root or self.root in path.parents  # a link must not lead out of the study
            if inside and path.is_file():
                self.known[relative] = (sha256_of(path), path.stat().st_size)
            else:
                self.known[relative] = (None, None)
        actual, size = self.known[relative]
        return DataFile(relative, recorded, actual, size)


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MlxscanError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); {what}") from error
    except UnicodeDecodeError as error:
        raise MlxscanError(f"{path} is not a text file; {what}") from error


def _claim(record, index: int, hasher: _Hasher, path: Path) -> ClaimRow:
    if not isinstance(record, dict):
        raise MlxscanError(f"{path}: claim {index} is not an object; rerun `mlxscan study run`")
    missing = [name for name in CLAIM_FIELDS if name not in record]
    if missing:
        raise MlxscanError(f"{path}: claim {record.get('id', index)!r} lacks {', '.join(missing)}; rerun `mlxscan study run`")
    files = []
    for entry in record["data_files"] or []:
        if not isinstance(entry, dict) or "path" not in entry:
            raise MlxscanError(f"{path}: claim {record['id']!r} has a data file without a path; rerun `mlxscan study run`")
        files.append(hasher.data_file(str(entry["path"]), entry.get("sha256")))
    return ClaimRow(record, tuple(files))


def _step(record, root: Path, hasher: _Hasher) -> Step:
    if not isinstance(record, dict):
        raise MlxscanError(f"{root / 'study.json'}: a step is not an object; rerun `mlxscan study run`")
    out_dir = record.get("out_dir") or f"steps/{record.get('name', '')}"
    folder = (root / out_dir) if (root / out_dir).is_dir() else None
    if folder is None:
        return Step(record, None, (), ())
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = tuple(hasher.data_file(p.relative_to(root).as_posix(), None) for p in paths)
    return Step(record, folder, tuple(f for f in files if f.path.lower().endswith(".png")), files)


def read_study(root) -> Study:
    """Read STUDY_DIR: study.json is required; claims.json is optional (the gate may not have run yet)."""
    root = Path(root)
    if not root.is_dir():
        raise MlxscanError(f"{root} is not a folder; give the folder `mlxscan study run` wrote")
    if not (root / "study.json").is_file():
        raise MlxscanError(f"{root} has no study.json, so it is not a study folder; make one with `mlxscan study run`")
    provenance = _read_json(root / "study.json", "rerun `mlxscan study run`")
    if not isinstance(provenance, dict) or not isinstance(provenance.get("steps", []), list):
        raise MlxscanError(f"{root / 'study.json'} is not a study record (no list of steps); rerun `mlxscan study run`")
    hasher = _Hasher(root)
    steps = tuple(_step(record, root, hasher) for record in provenance.get("steps", []))
    claims, gate = (), None
    if (root / "claims.json").is_file():
        ledger = _read_json(root / "claims.json", "rerun `mlxscan study run`")
        if not isinstance(ledger, dict) or not isinstance(ledger.get("claims"), list):
            raise MlxscanError(f"{root / 'claims.json'} has no list of claims; rerun `mlxscan study run`")
        claims = tuple(_claim(record, i, hasher, root / "claims.json") for i, record in enumerate(ledger["claims"]))
        gate = {key: value for key, value in ledger.items() if key != "claims"}
    problems = tuple(f"{f.path}: {f.status}" for claim in claims for f in claim.data_files
                     if f.status in ("missing", "changed"))
    figures = tuple(hasher.data_file(path.name, None) for path in sorted(root.glob("*.png")) if path.is_file())
    return Study(root, provenance, steps, claims, gate, tuple(dict.fromkeys(problems)), figures)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
