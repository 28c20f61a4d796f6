"""`mlxscan study run` and `mlxscan study verify`: declared studies, their claims and the gate."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from .claims import VERDICTS
from .cli import _BadInput, _Group, _progress, main


@main.group(cls=_Group)
def study():
    """Run a declared study into one directory, judge its claims, and verify them later."""


@study.command("run")
@click.argument("study_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Study directory (default: study_<name> in the current folder). Rerun to resume.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record (steps and judged claims).")
def run(study_file, out_dir, as_json):
    """Run STUDY_FILE's steps (skipping those already done), then judge every claim under its gate.

    Exits 1 when a step failed (the others still run, and their claims are judged).
    """
    from .study.runner import check_options, run_study, study_commands
    from .study.spec import parse_study

    if not study_file.is_file():
        raise _BadInput(f"study file {study_file} not found; give a .toml file such as studies/fmri.toml")
    spec = parse_study(study_file, study_commands())
    check_options(spec)
    folder = out_dir or Path(f"study_{spec.name}")
    result = run_study(spec, folder, say=_progress(as_json))
    _save_plot(result)
    if as_json:
        click.echo(json.dumps({"study_dir": str(result.folder), "steps": result.record["steps"],
                               "claims": [item.to_dict() for item in result.claims]}))
    else:
        _print_run(result)
    sys.exit(1 if result.failed else 0)


def _save_plot(result) -> None:
    from .plots import line_plot

    claims = [item for item in result.claims if item.p_corrected is not None]
    if not claims:
        return
    alpha = json.loads((result.folder / "claims.json").read_text())["thresholds"]["alpha"]
    strength = [-math.log10(max(item.p_corrected, 1e-16)) for item in claims]
    line_plot(result.folder / "claims.png", list(range(len(claims))),
              {"-log10 corrected p": (strength, None)}, hlines={f"alpha {alpha:g}": -math.log10(alpha)},
              title=f"study {result.record['name']}: {len(claims)} claims", xlabel="claim (order of claims.json)",
              ylabel="-log10 corrected p")


def _print_run(result) -> None:
    record = result.record
    click.echo(f"study {record['name']}: {record['model']['ref']} (sha256 {record['model']['sha256'][:12]}…), "
               f"stimuli {record['stimuli']['path']} (sha256 {record['stimuli']['sha256'][:12]}…)")
    click.echo(f"{'step':<16} {'command':<12} {'status':<8} {'seconds':>8}  claims")
    for step in record["steps"]:
        seconds = "-" if step["seconds"] is None else f"{step['seconds']:.0f}"
        click.echo(f"{step['name']:<16} {step['analysis']:<12} {step['status']:<8} {seconds:>8}  "
                   f"{step.get('n_claims', '-')}" + (f"  {step['error']}" if step["error"] else "")
                   + (f"  claims failed: {step['claims_error']}" if step.get("claims_error") else ""))
    _print_claims(result.claims)
    click.echo(f"saved study.json, claims.json and claims.png in {result.folder}")


def claim_families(claims) -> dict[str, list]:
    """Claims grouped by what they claim: the id less its layer, factor, N or graph suffix, in order."""
    import re

    families: dict[str, list] = {}
    for item in claims:
        families.setdefault(re.sub(r"\.(L\d+|x[0-9.]+|N\d+|layer\d+)$", "", item.id), []).append(item)
    return families


def family_verdict(members) -> str:
    """supported when any member is; else failed-control, null, untestable in that order of precedence."""
    for verdict in ("supported", "failed-control", "null", "untestable"):
        if any(item.verdict == verdict for item in members):
            return verdict
    return "not judged"


def _print_claims(claims) -> None:
    if not claims:
        click.echo("no claims")
        return
    click.echo(f"gate: {claims[0].correction}; every claim is listed, supported or not")
    click.echo(f"{'claim':<34} {'verdict':<15} {'value':>8} {'control':>8} {'effect':>8}  {'95% CI':<19} "
               f"{'p':>8} {'p corr':>8}  replicates")
    for item in claims:
        click.echo(f"{item.id:<34} {item.verdict:<15} {item.value:>8.3f} {item.control_value:>8.3f} "
                   f"{item.effect:>+8.3f}  [{item.ci[0]:+.3f}, {item.ci[1]:+.3f}] {item.p:>8.1e} "
                   f"{item.p_corrected:>8.1e}  {'yes' if item.replication['passed'] else 'no'} "
                   f"({item.replication['value']:+.3f})")
    for item in claims:
        if item.verdict == "untestable":
            click.echo(f"  {item.id}: {item.reason}")
    counts = {verdict: sum(item.verdict == verdict for item in claims) for verdict in VERDICTS}
    click.echo("per claim: " + ", ".join(f"{name}: {count}" for name, count in counts.items()))
    families = claim_families(claims)
    click.echo(f"per claim family ({len(families)} families; one fact at many layers counts once, with its span):")
    for name, members in families.items():
        verdicts = {verdict: sum(item.verdict == verdict for item in members) for verdict in VERDICTS}
        supported = verdicts["supported"]
        summary = ", ".join(f"{verdict} {count}" for verdict, count in verdicts.items() if count)
        span = f"  supported at {supported}/{len(members)}" if len(members) > 1 else ""
        free = "  (label-free: holds for any direction)" if all(item.label_free for item in members) else ""
        click.echo(f"  {name:<32} {family_verdict(members):<15} {summary}{span}{free}")


@study.command("verify")
@click.argument("study_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the list.")
def verify(study_dir, as_json):
    """Recompute every claim of STUDY_DIR from its data files; exit 1 if any number or file changed."""
    from .study.verify import verify_study

    if not study_dir.is_dir():
        raise _BadInput(f"{study_dir} is not a folder; give the --out folder of `mlxscan study run`")
    report = verify_study(study_dir)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for problem in report.problems:
            click.echo(f"MISMATCH {problem}")
        click.echo(f"{'OK' if report.ok else 'FAILED'}: {report.n_claims} claims recomputed from {report.n_files} "
                   f"data files; {len(report.problems)} mismatches")
    sys.exit(0 if report.ok else 1)
