"""`mlxscan study run`: run a study's steps into one directory, resumably, then judge their claims.

Each step is an ordinary mlxscan command run in-process with --out pointing into the study, so the
command line recorded in study.json reproduces it exactly. A step writes into steps/.NAME.partial and
is renamed to steps/NAME only when its command succeeded; study.json is rewritten (atomically) after
every change of state, so a killed study resumes at the first step not marked done. Scans are reused
through the scan cache (MLXSCAN_CACHE), and a scan step resumes its own partial folder batch by batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from ..claims import Claim, claims_record, judge, sha256_of
from ..errors import MlxscanError
from ..outputs import write_outputs
from . import provenance
from .spec import StepSpec, StudySpec

STUDY_FILE, CLAIMS_FILE, INPUTS = "study.json", "claims.json", "inputs"
Say = Callable[[str], None]


@dataclass
class StudyRun:
    folder: Path
    record: dict
    claims: list[Claim]

    @property
    def failed(self) -> list[str]:
        return [step["name"] for step in self.record["steps"] if step["status"] != "done"]


def _command(name: str) -> click.Command:
    from ..cli import main

    return main.commands[name]


def study_commands() -> set[str]:
    """Commands a step may run: everything but the study machinery itself and the reference check."""
    from ..cli import main

    return set(main.commands) - {"study", "report", "verify"}


def _option(command: click.Command, name: str) -> click.Option | None:
    flag = "--" + name.replace("_", "-")
    return next((p for p in command.params if isinstance(p, click.Option) and flag in p.opts), None)


def check_options(spec: StudySpec) -> None:
    """Every step's options exist on its command: refused before anything runs."""
    for step in spec.steps:
        command = _command(step.command)
        for name in step.options:
            if _option(command, name) is None:
                known = sorted(o.lstrip("-") for p in command.params if isinstance(p, click.Option) for o in p.opts
                               if o.startswith("--") and o not in ("--out", "--json"))
                raise MlxscanError(f"[steps.{step.name}]: `mlxscan {step.command}` has no option --{name}; "
                                   f"it has {', '.join(known)}")


def step_argv(spec: StudySpec, step: StepSpec, folder: Path, out: Path) -> list[str]:
    """The command's arguments (absolute paths) for one step, study-level model and stimuli filled in."""
    command = _command(step.command)
    argv = [step.command]
    if step.input:
        argv.append(str(folder / "steps" / step.input))
    options = dict(step.options)
    if spec.model and _option(command, "model") and "model" not in options and not step.input:
        options["model"] = spec.model
    if (_option(command, "stimuli") and not step.input and not {"stimuli", "texts"} & set(options)
            and step.command not in ("inhibit",)):
        options["stimuli"] = str(folder / INPUTS / spec.stimuli.name)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            continue
        else:
            if isinstance(value, list):
                value = ",".join(str(item) for item in value)
            elif isinstance(_option(command, name).type, click.Path) and not Path(str(value)).is_absolute():
                value = (spec.path.parent / str(value)).resolve()  # relative to the study file, as stimuli are
            argv += [flag, str(value)]
    return argv + ["--out", str(out)]


def display_command(argv: list[str], folder: Path) -> str:
    """The command line as run from the study folder (paths inside it made relative)."""
    root = str(folder.resolve()) + "/"
    shown = [item.replace(root, "") for item in argv]
    return "mlxscan " + " ".join(shlex.quote(item) for item in shown)


def _save_record(folder: Path, record: dict) -> None:
    write_outputs(folder, {STUDY_FILE: record})


def _start(spec: StudySpec, folder: Path, say: Say) -> dict:
    """study.json as found (resuming) or new; refuses a folder that holds something else."""
    existing = folder / STUDY_FILE
    if existing.exists():
        record = json.loads(existing.read_text())
        if record.get("toml") != spec.text:
            raise MlxscanError(f"{folder} holds a study made from another study file; give another --out "
                               "(or delete the folder to start again)")
        done = sum(step["status"] == "done" for step in record["steps"])
        say(f"resuming {folder}: {done} of {len(record['steps'])} steps done")
        record.setdefault("resumed", []).append({"at": provenance.now(), "versions": provenance.versions()})
        return record
    if folder.exists() and any(folder.iterdir()):
        raise MlxscanError(f"{folder} is not empty and holds no study.json; give an empty or new --out folder")
    say(f"hashing the model's weights ({spec.model or 'bundled default'})")
    model = provenance.model_record(spec.model)  # a model that cannot load fails here, before any file is made
    (folder / INPUTS).mkdir(parents=True, exist_ok=True)
    copy = folder / INPUTS / spec.stimuli.name
    shutil.copyfile(spec.stimuli, copy)  # the study keeps the very stimuli its numbers came from
    return {"name": spec.name, "description": spec.description, "toml": spec.text, "study_file": str(spec.path),
            "versions": provenance.versions(), "model": model,
            "stimuli": {"path": f"{INPUTS}/{copy.name}", "source": str(spec.stimuli), "sha256": sha256_of(copy)},
            "machine": provenance.machine(), "gate": dataclasses.asdict(spec.gate), "started": provenance.now(),
            "finished": None, "steps": [_step_record(spec, step, folder) for step in spec.steps]}


def _step_record(spec: StudySpec, step: StepSpec, folder: Path) -> dict:
    argv = step_argv(spec, step, folder, folder / "steps" / step.name)
    return {"name": step.name, "analysis": step.command, "params": step.options, "input": step.input,
            "claims_params": step.claims, "command": display_command(argv, folder), "status": "pending",
            "started": None, "finished": None, "seconds": None, "out_dir": f"steps/{step.name}", "error": None}


def _run_command(argv: list[str]) -> tuple[str, str | None]:
    """(stdout, error or None) of one in-process mlxscan command."""
    from ..cli import main

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            main.main(argv, prog_name="mlxscan", standalone_mode=False)
    except click.ClickException as error:
        return captured.getvalue(), error.format_message()
    except SystemExit as error:
        if error.code not in (0, None):
            return captured.getvalue(), f"exited with status {error.code}"
    return captured.getvalue(), None


def _run_step(spec: StudySpec, step: StepSpec, folder: Path, record: dict, entry: dict, say: Say) -> None:
    final, partial = folder / "steps" / step.name, folder / "steps" / f".{step.name}.partial"
    if partial.exists() and step.command != "scan":  # a scan resumes its own batches; the rest start clean
        shutil.rmtree(partial)
    entry.update(status="running", started=provenance.now(), error=None)
    _save_record(folder, record)  # whoever watches the study sees which step runs
    started = time.perf_counter()
    say(f"step {step.name}: {entry['command']}")
    output, error = _run_command(step_argv(spec, step, folder, partial))
    entry["seconds"] = round(time.perf_counter() - started, 1)
    entry["finished"] = provenance.now()
    if error is not None:
        entry.update(status="failed", error=error.strip().splitlines()[0] if error.strip() else "failed")
        say(f"step {step.name} FAILED after {entry['seconds']} s: {entry['error']}")
        return
    # The table the command printed, naming the folder it will have.
    write_outputs(partial, {f"{step.command}.txt": output.replace(str(partial), str(final))})
    if final.exists():
        shutil.rmtree(final)  # left by a run that died between rename and record
    partial.rename(final)
    entry["status"] = "done"
    say(f"step {step.name} done in {entry['seconds']} s")


def run_study(spec: StudySpec, folder: Path, *, say: Say = lambda message: None) -> StudyRun:
    """Run every step not yet done, then make and judge the claims of every done step."""
    check_options(spec)
    folder = Path(folder).resolve()
    record = _start(spec, folder, say)
    _save_record(folder, record)
    for step, entry in zip(spec.steps, record["steps"]):
        if entry["status"] == "done" and (folder / entry["out_dir"]).is_dir():
            continue
        source = next((e for e in record["steps"] if e["name"] == step.input), None)
        if source is not None and source["status"] != "done":
            entry.update(status="failed", error=f"its input step {step.input} did not finish")
            _save_record(folder, record)
            continue
        _run_step(spec, step, folder, record, entry, say)
        _save_record(folder, record)
    claims = judge_study(folder, record, spec.gate, say)
    record["finished"] = provenance.now()
    _save_record(folder, record)
    return StudyRun(folder=folder, record=record, claims=claims)


def study_claims(folder: Path, record: dict, say: Say = lambda message: None) -> list[Claim]:
    """Every done step's claims, recomputed from its files (no gate applied)."""
    from .adapters import claims_of_step

    claims = []
    for entry in record["steps"]:
        if entry["status"] != "done":
            continue
        try:
            made = claims_of_step(folder, record, entry)
        except MlxscanError as error:  # the step's files cannot give its claims: say so, judge the rest
            entry.update(n_claims=0, claims_error=str(error))
            say(f"claims of {entry['name']}: none ({error})")
            continue
        entry.update(n_claims=len(made), claims_error=None)
        claims.extend(made)
        say(f"claims of {entry['name']}: {len(made)}")
    return claims


def judge_study(folder: Path, record: dict, gate, say: Say = lambda message: None) -> list[Claim]:
    judged = judge(study_claims(folder, record, say), gate)
    write_outputs(folder, {CLAIMS_FILE: claims_record(judged, gate)})
    return judged
