"""Claim records and the verification gate (NumPy and the standard library only).

Every analysis of a study states what it found as `Claim`s: one hypothesis, the statistic beside its
control, the effect with a 95% interval, an uncorrected p-value, a replication check and the files the
numbers came from. `judge` then decides each claim under explicit thresholds: `supported` only when
it beats its control after correction for every test in the study *and* replicates; otherwise `null`
(or `failed-control`, when the statistic beats chance but not its control), reported alike. A claim
whose test cannot be run (its null is degenerate or too small, or its readout never beat chance, so
there is nothing to remove) has p = NaN and `untestable` set to the reason: it is `untestable`, listed
with that reason, and left out of the correction's family (it is no test).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MlxscanError
from .models.hashing import sha256_of

__all__ = ["Claim", "GateThresholds", "VERDICTS", "CORRECTIONS", "judge", "correct", "file_record", "sha256_of",
           "claims_record", "claims_to_json", "claims_from_json", "thresholds_from_dict", "is_testable",
           "untestable_claim", "claims_lines"]

VERDICTS = ("supported", "null", "failed-control", "untestable")
CORRECTIONS = ("holm", "bonferroni", "none")
REPLICATION_KEYS = ("kind", "value", "passed")


@dataclass
class Claim:
    """One tested statement of a study. The gate fills the last five fields."""

    id: str                    # unique within a study, e.g. "probe.decodable.L12"
    analysis: str              # "probe", "selectivity", "ablate", ...
    hypothesis: str            # one sentence
    statistic: str             # what `value` is
    value: float
    control: str               # what the control is
    control_value: float
    effect: float              # the effect size tested, normally value - control_value
    ci: tuple[float, float]    # 95% confidence interval of `effect`
    p: float                   # uncorrected p of effect > 0 (effect != 0 when two_sided)
    test: str                  # how p was computed
    replication: dict          # {"kind": ..., "value": float, "passed": bool}
    data_files: list[dict]     # [{"path": relative to the study dir, "sha256": hex}]
    two_sided: bool = False
    p_corrected: float | None = None
    correction: str | None = None
    verdict: str | None = None
    reason: str = ""
    # Optional: p of the statistic against chance (not its control). Where given and significant after
    # the same correction, a claim that fails its control is `failed-control` rather than `null`.
    chance_p: float | None = None
    # Why the claim cannot be tested (empty when it can): the gate then says `untestable` with this reason.
    untestable: str = ""
    # Claims that hold for any direction (norm invariance, additivity) do not depend on the labels: a
    # negative-control study lists them apart instead of counting them against the labels.
    label_free: bool = False

    def __post_init__(self):
        if not self.id or not isinstance(self.id, str):
            raise MlxscanError("a claim needs a non-empty string id")
        for name in ("value", "control_value", "effect", "p"):
            setattr(self, name, _float(getattr(self, name)))
        if len(tuple(self.ci)) != 2:
            raise MlxscanError(f"claim {self.id}: ci must be (low, high), got {self.ci!r}")
        self.ci = (_float(self.ci[0]), _float(self.ci[1]))
        if self.ci[0] > self.ci[1]:
            raise MlxscanError(f"claim {self.id}: ci low {self.ci[0]} is above high {self.ci[1]}")
        if not (math.isnan(self.p) or 0.0 <= self.p <= 1.0):
            raise MlxscanError(f"claim {self.id}: p must lie in [0, 1] (or be NaN when undefined), got {self.p}")
        missing = [key for key in REPLICATION_KEYS if key not in self.replication]
        if missing:
            raise MlxscanError(f"claim {self.id}: replication lacks {', '.join(missing)}; give kind, value and passed")
        self.replication = {**self.replication, "value": _float(self.replication["value"]),
                            "passed": bool(self.replication["passed"])}
        for record in self.data_files:
            if set(record) < {"path", "sha256"}:
                raise MlxscanError(f"claim {self.id}: each data file needs path and sha256, got {record!r}")
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise MlxscanError(f"claim {self.id}: verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")
        if self.chance_p is not None:
            self.chance_p = _float(self.chance_p)

    def to_dict(self) -> dict:
        """JSON-ready: NaN becomes None (JSON has no NaN), the interval a list."""
        record = dataclasses.asdict(self)
        return _nan_to_none(record)


@dataclass(frozen=True)
class GateThresholds:
    """What `supported` means, explicitly: corrected p below alpha, the CI clear of 0 on the claimed side,
    |effect| at least min_effect, and (by default) a passed replication."""

    alpha: float = 0.05
    correction: str = "holm"          # over every claim of the study: holm, bonferroni or none
    min_effect: float = 0.0
    require_replication: bool = True

    def __post_init__(self):
        if not 0.0 < self.alpha < 1.0:
            raise MlxscanError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.correction not in CORRECTIONS:
            raise MlxscanError(f"correction {self.correction!r} is unknown; use one of {', '.join(CORRECTIONS)}")
        if not (math.isfinite(self.min_effect) and self.min_effect >= 0):
            raise MlxscanError(f"min_effect must be a finite number >= 0, got {self.min_effect}")


def thresholds_from_dict(record: dict) -> GateThresholds:
    """GateThresholds from a mapping (a study file's [gate] table); unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(GateThresholds)}
    unknown = sorted(set(record) - known)
    if unknown:
        raise MlxscanError(f"unknown gate setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return GateThresholds(**record)


def correct(pvalues, method: str = "holm") -> np.ndarray:
    """Family-wise corrected p-values (NaN, an undefined test, counts as p = 1)."""
    p = np.nan_to_num(np.asarray(pvalues, dtype=np.float64), nan=1.0)
    m = len(p)
    if method == "none" or m == 0:
        return p.copy()
    if method == "bonferroni":
        return np.minimum(1.0, p * m)
    if method != "holm":
        raise MlxscanError(f"correction {method!r} is unknown; use one of {', '.join(CORRECTIONS)}")
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])  # Holm's step-down, kept monotone
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted


def judge(claims: list[Claim], thresholds: GateThresholds | None = None) -> list[Claim]:
    """New Claims with p_corrected, correction, verdict and reason set; the family is all of `claims`."""
    thresholds = thresholds or GateThresholds()
    ids = [claim.id for claim in claims]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise MlxscanError(f"claim ids must be unique within a study; repeated: {', '.join(duplicates)}")
    testable = [i for i, claim in enumerate(claims) if is_testable(claim)]
    corrected = dict(zip(testable, correct([claims[i].p for i in testable], thresholds.correction)))
    with_chance = [i for i in testable if claims[i].chance_p is not None]
    chance_corrected = dict(zip(with_chance, correct([claims[i].chance_p for i in with_chance],
                                                     thresholds.correction)))
    label = f"{thresholds.correction} over {len(testable)} tests"
    judged = []
    for i, claim in enumerate(claims):
        if i not in corrected:
            reason = claim.untestable or "p is undefined (the null is degenerate or too small)"
            judged.append(dataclasses.replace(claim, p=math.nan, p_corrected=math.nan, correction=label,
                                              verdict="untestable", reason=f"untestable: {reason}",
                                              untestable=reason))
            continue
        verdict, reason = _verdict(claim, float(corrected[i]), chance_corrected.get(i), thresholds)
        judged.append(dataclasses.replace(claim, p_corrected=float(corrected[i]), correction=label,
                                          verdict=verdict, reason=reason))
    return judged


def is_testable(claim: Claim) -> bool:
    """A claim is a test when nothing marks it untestable and its p is a number."""
    return not claim.untestable and math.isfinite(claim.p)


def untestable_claim(claim: Claim, reason: str) -> Claim:
    """The same claim, marked untestable (p NaN) for `reason`."""
    return dataclasses.replace(claim, p=math.nan, untestable=reason)


def _verdict(claim: Claim, p_corrected: float, chance_corrected: float | None,
             thresholds: GateThresholds) -> tuple[str, str]:
    """The verdict and one line saying why (the first condition that fails, or all that hold)."""
    low, high = claim.ci
    side = "exclude 0" if claim.two_sided else "lie above 0"
    control_failures = []
    if not p_corrected < thresholds.alpha:
        control_failures.append(f"corrected p {p_corrected:.3g} >= alpha {thresholds.alpha:g}")
    if not _ci_clear(claim):
        control_failures.append(f"CI [{low:.3g}, {high:.3g}] of the effect does not {side}")
    size = abs(claim.effect) if claim.two_sided else claim.effect
    if not size >= thresholds.min_effect:
        control_failures.append(f"effect {claim.effect:.3g} is below min_effect {thresholds.min_effect:g}")
    replication = claim.replication
    if control_failures:
        if chance_corrected is not None and chance_corrected < thresholds.alpha:
            return "failed-control", (f"beats chance (corrected p {chance_corrected:.3g}) but not {claim.control}: "
                                      + "; ".join(control_failures))
        return "null", f"does not beat {claim.control}: " + "; ".join(control_failures)
    if thresholds.require_replication and not replication["passed"]:
        return "null", (f"beats {claim.control} (effect {claim.effect:.3g}, corrected p {p_corrected:.3g}) but does "
                        f"not replicate ({replication['kind']}: {replication['value']:.3g})")
    return "supported", (f"effect {claim.effect:.3g} [{low:.3g}, {high:.3g}] over {claim.control}, corrected p "
                         f"{p_corrected:.3g} < {thresholds.alpha:g}; replicates ({replication['kind']}: "
                         f"{replication['value']:.3g})")


def _ci_clear(claim: Claim) -> bool:
    """Is the interval clear of 0 on the claimed side (above 0, or either side when two-sided)?"""
    low, high = claim.ci
    if not claim.two_sided:
        return low > 0 and claim.effect > 0
    return (low > 0 and claim.effect > 0) or (high < 0 and claim.effect < 0)


# ---------------------------------------------------------------------------------------------
# Data files and JSON


def file_record(path, root) -> dict:
    """{"path": path relative to root (POSIX), "sha256": hex} of a file inside root."""
    path, root = Path(path).resolve(), Path(root).resolve()
    try:
        relative = path.relative_to(root)
    except ValueError as error:
        raise MlxscanError(f"data file {path} lies outside the study folder {root}") from error
    if not path.is_file():
        raise MlxscanError(f"data file {path} does not exist")
    return {"path": relative.as_posix(), "sha256": sha256_of(path)}


def claims_record(claims: list[Claim], thresholds: GateThresholds | None = None) -> dict:
    """claims.json's content, JSON-ready (NaN as None): {"thresholds", "n_tests", "claims"}."""
    return {"thresholds": dataclasses.asdict(thresholds or GateThresholds()), "n_tests": len(claims),
            "claims": [claim.to_dict() for claim in claims]}


def claims_lines(claims: list[Claim]) -> list[str]:
    """A judged claim table for a terminal: id, effect, CI, p, corrected p, verdict; untestable ones with why."""
    if not claims:
        return []
    width = max(len(claim.id) for claim in claims)
    lines = [f"claims (default gate, {claims[0].correction or 'not judged'} within this command):",
             f"  {'claim':<{width}}  {'effect':>9}  {'95% CI':>21}  {'p':>8}  {'p corr':>8}  verdict"]
    for claim in claims:
        low, high = claim.ci
        p_corrected = math.nan if claim.p_corrected is None else claim.p_corrected
        line = (f"  {claim.id:<{width}}  {claim.effect:>9.3g}  [{low:>9.3g}, {high:>9.3g}]  {claim.p:>8.2g}  "
                f"{p_corrected:>8.2g}  {claim.verdict or 'not judged'}")
        if claim.verdict == "untestable":
            line += f" ({claim.untestable})"
        lines.append(line)
    return lines


def claims_to_json(claims: list[Claim], thresholds: GateThresholds | None = None) -> str:
    """claims.json's text."""
    return json.dumps(claims_record(claims, thresholds), indent=2) + "\n"


def claims_from_json(source) -> list[Claim]:
    """Claims from claims.json: its text, its parsed dict, or its path. None fields read back as NaN."""
    if isinstance(source, (str, bytes)) and source.lstrip()[:1] in ("{", b"{"):
        record = json.loads(source)
    elif isinstance(source, (str, os.PathLike)):
        record = json.loads(Path(source).read_text())
    else:
        record = source
    try:
        rows = record["claims"]
    except (KeyError, TypeError) as error:
        raise MlxscanError("not a claims record: expected {\"claims\": [...]}") from error
    known = {f.name for f in dataclasses.fields(Claim)}
    claims = []
    for row in rows:
        unknown = sorted(set(row) - known)
        if unknown:
            raise MlxscanError(f"claim {row.get('id')!r} has unknown field(s) {', '.join(unknown)}")
        row = dict(row)
        for name in ("value", "control_value", "effect", "p"):
            row[name] = _none_to_nan(row.get(name))
        row["ci"] = tuple(_none_to_nan(v) for v in row["ci"])
        row["replication"] = {**row["replication"], "value": _none_to_nan(row["replication"].get("value"))}
        claims.append(Claim(**row))
    return claims


def _float(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise MlxscanError(f"expected a number, got {value!r}") from error


def _none_to_nan(value):
    return math.nan if value is None else value


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(item) for item in value]
    return value
