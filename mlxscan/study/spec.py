"""A study file (TOML): the model, the stimuli, the gate's thresholds and an ordered list of steps.

    name = "fmri"
    stimuli = "../stimuli/categories.jsonl"      # relative to the study file
    [gate]                                       # optional; GateThresholds' fields
    alpha = 0.05
    [steps.probe]                                # steps run in the order written
    command = "probe"                            # an mlxscan command
    options = {permutations = 3, layers = "0-29"}  # its options, without the leading --
    input = "scan_mlp"                           # optional: an earlier step whose folder is the command's argument
    claims = {layers = [0, 15, 29]}              # optional: what the adapter makes claims about

Unknown keys anywhere are an error naming the key and the keys allowed, so a typo cannot silently
turn a setting off.
"""

from __future__ import annotations

import re
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..claims import GateThresholds, thresholds_from_dict
from ..errors import MlxscanError

STUDY_KEYS = {"name", "description", "model", "stimuli", "gate", "steps"}
STEP_KEYS = {"command", "options", "input", "claims"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # step names become folder names


@dataclass(frozen=True)
class StepSpec:
    name: str
    command: str
    options: dict = field(default_factory=dict)
    input: str | None = None
    claims: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    model: str | None            # None: the bundled default
    stimuli: Path                # resolved against the study file's folder
    gate: GateThresholds
    steps: tuple[StepSpec, ...]
    text: str                    # the study file as written (kept in study.json)
    path: Path


def _unknown(where: str, record: dict, allowed: set[str]) -> None:
    unknown = sorted(set(record) - allowed)
    if unknown:
        raise MlxscanError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _step(name: str, record, earlier: list[str], commands: set[str]) -> StepSpec:
    where = f"[steps.{name}]"
    if not isinstance(record, dict):
        raise MlxscanError(f"{where} must be a table with command = \"...\"")
    _unknown(where, record, STEP_KEYS)
    if not NAME.match(name):
        raise MlxscanError(f"{where}: a step name may hold letters, digits, - and _ only (it names a folder)")
    command = record.get("command")
    if command not in commands:
        raise MlxscanError(f"{where}: command {command!r} is not a study command; use one of {', '.join(sorted(commands))}")
    for key in ("options", "claims"):
        if not isinstance(record.get(key, {}), dict):
            raise MlxscanError(f"{where}: {key} must be a table, e.g. {key} = {{seed = 0}}")
    for option in record.get("options", {}):
        if option in ("out", "json") or option.startswith("-"):
            raise MlxscanError(f"{where}: option {option!r} is set by the study itself (or has a leading -); "
                               "write options without dashes and leave out out/json")
    source = record.get("input")
    if source is not None and source not in earlier:
        raise MlxscanError(f"{where}: input {source!r} is not an earlier step (earlier: {', '.join(earlier) or 'none'})")
    return StepSpec(name=name, command=command, options=dict(record.get("options", {})), input=source,
                    claims=dict(record.get("claims", {})))


def parse_study(path: Path, commands: set[str]) -> StudySpec:
    """Read and validate a study file; `commands` are the mlxscan commands a step may run."""
    path = Path(path)
    try:
        text = path.read_text()
        record = tomllib.loads(text)
    except OSError as error:
        raise MlxscanError(f"cannot read the study file {path}: {error.strerror}") from error
    except tomllib.TOMLDecodeError as error:
        raise MlxscanError(f"{path} is not valid TOML: {error}") from error
    _unknown(str(path), record, STUDY_KEYS)
    for key in ("name", "stimuli"):
        if not isinstance(record.get(key), str) or not record[key]:
            raise MlxscanError(f"{path}: {key} = \"...\" is required")
    steps = record.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise MlxscanError(f"{path}: declare at least one step as [steps.NAME] with command = \"...\"")
    parsed: list[StepSpec] = []
    for name, step in steps.items():
        parsed.append(_step(name, step, [s.name for s in parsed], commands))
    gate = record.get("gate", {})
    if not isinstance(gate, dict):
        raise MlxscanError(f"{path}: [gate] must be a table")
    stimuli = (path.parent / record["stimuli"]).resolve()
    if not stimuli.is_file():
        raise MlxscanError(f"{path}: stimuli {record['stimuli']!r} not found (looked for {stimuli})")
    model = record.get("model") or None
    if model is not None and not Path(model).is_absolute() and (path.parent / model).exists():
        model = str((path.parent / model).resolve())
    return StudySpec(name=record["name"], description=str(record.get("description", "")), model=model,
                     stimuli=stimuli, gate=thresholds_from_dict(gate), steps=tuple(parsed), text=text,
                     path=path.resolve())
