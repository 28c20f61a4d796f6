"""`mlxscan study verify`: recompute every claim from its data files and list what no longer matches.

Three checks: every data file a claim names still has the sha256 recorded; the study's stimuli copy
too; and the adapters, rerun on the files as they are now and judged under the recorded thresholds,
give every recorded number again (value, control, effect, CI, p, corrected p, replication, verdict).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..claims import Claim, claims_from_json, judge, sha256_of, thresholds_from_dict
from ..errors import MlxscanError
from .runner import CLAIMS_FILE, STUDY_FILE, study_claims

RTOL, ATOL = 1e-9, 1e-12  # recomputation is seeded and deterministic: anything beyond rounding is a change
NUMBERS = ("value", "control_value", "effect", "p", "p_corrected")


@dataclass
class VerifyReport:
    folder: Path
    n_claims: int = 0
    n_files: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"study_dir": str(self.folder), "ok": self.ok, "n_claims": self.n_claims, "n_files": self.n_files,
                "problems": self.problems}


def _read(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise MlxscanError(f"{folder} has no {name}: is it a study directory made by `mlxscan study run`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MlxscanError(f"{path} is not valid JSON ({error.msg}); the study directory is damaged") from error


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL)


def _differences(recorded: Claim, fresh: Claim) -> list[str]:
    pairs = [(name, getattr(recorded, name), getattr(fresh, name)) for name in NUMBERS]
    pairs += [("ci low", recorded.ci[0], fresh.ci[0]), ("ci high", recorded.ci[1], fresh.ci[1]),
              ("replication value", recorded.replication["value"], fresh.replication["value"])]
    found = [f"{recorded.id}: {name} recorded {a!r}, recomputed {b!r}" for name, a, b in pairs if not _same(a, b)]
    for name in ("verdict",):
        if getattr(recorded, name) != getattr(fresh, name):
            found.append(f"{recorded.id}: {name} recorded {getattr(recorded, name)!r}, recomputed "
                         f"{getattr(fresh, name)!r}")
    if recorded.replication["passed"] != fresh.replication["passed"]:
        found.append(f"{recorded.id}: replication passed recorded {recorded.replication['passed']}, recomputed "
                     f"{fresh.replication['passed']}")
    return found


def _check_files(folder: Path, record: dict, claims: list[Claim], report: VerifyReport) -> None:
    seen = {record["stimuli"]["path"]: record["stimuli"]["sha256"]}
    for item in claims:
        for data_file in item.data_files:
            seen.setdefault(data_file["path"], data_file["sha256"])
            if seen[data_file["path"]] != data_file["sha256"]:
                report.problems.append(f"{item.id}: {data_file['path']} is recorded with two different sha256s")
    report.n_files = len(seen)
    for path, digest in seen.items():
        full = folder / path
        if not full.is_file():
            report.problems.append(f"{path}: missing")
        elif sha256_of(full) != digest:
            report.problems.append(f"{path}: sha256 {sha256_of(full)[:12]}… differs from the recorded {digest[:12]}…")


def verify_study(folder: Path) -> VerifyReport:
    folder = Path(folder).resolve()
    record, claims_record = _read(folder, STUDY_FILE), _read(folder, CLAIMS_FILE)
    recorded = claims_from_json(claims_record)
    report = VerifyReport(folder, n_claims=len(recorded))
    _check_files(folder, record, recorded, report)
    try:
        fresh = judge(study_claims(folder, record), thresholds_from_dict(claims_record["thresholds"]))
    except MlxscanError as error:
        report.problems.append(f"recomputing the claims failed: {error}")
        return report
    by_id = {item.id: item for item in fresh}
    for item in recorded:
        if item.id not in by_id:
            report.problems.append(f"{item.id}: recorded, but the data files no longer give this claim")
            continue
        report.problems.extend(_differences(item, by_id.pop(item.id)))
    report.problems.extend(f"{name}: recomputed, but not recorded in {CLAIMS_FILE}" for name in by_id)
    return report
