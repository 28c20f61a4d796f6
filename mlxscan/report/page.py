"""The study report as one self-contained HTML page: inline CSS, figures as data URIs, no JavaScript.

Layout: the claims ledger first, then the steps at a glance, one section per step (its figures, the command
that reproduces it, its files), and the provenance last. Nothing on the page is fetched from a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from ..errors import MlxscanError
from ..outputs import write_outputs
from .ledger import _CSS, _Linker, _ledger, slug, verdict_counts
from .sections import provenance_section, step_section, steps_overview, study_figures
from .study import Study, read_study


@dataclass(frozen=True)
class ReportResult:
    path: Path  # the HTML file written
    n_bytes: int
    verdicts: dict[str, int]  # claims per verdict
    steps: dict[str, int]  # steps per status
    n_figures: int
    problems: tuple[str, ...]  # data files missing or changed since the study recorded them
    gate_ran: bool  # claims.json exists

    def to_dict(self) -> dict:
        return {"report": str(self.path), "bytes": self.n_bytes, "verdicts": self.verdicts, "steps": self.steps,
                "figures": self.n_figures, "problems": list(self.problems), "gate_ran": self.gate_ran}


def _header(study: Study) -> str:
    record = study.provenance
    model = record.get("model") if isinstance(record.get("model"), dict) else {}
    stimuli = record.get("stimuli") if isinstance(record.get("stimuli"), dict) else {}
    facts = [f"model <b>{escape(str(model.get('ref', '?')))}</b>"
             + (f' <span class="mono" title="sha256 {escape(str(model["sha256"]))}">'
                f"({escape(str(model['sha256'])[:12])})</span>" if model.get("sha256") else ""),
             f"stimuli <span class=\"mono\">{escape(str(stimuli.get('path', '?')))}</span>",
             f"{escape(str(record.get('started', '?')))} to {escape(str(record.get('finished') or 'unfinished'))}"]
    description = f"<p>{escape(str(record['description']))}</p>" if record.get("description") else ""
    return (f"<h1>{escape(study.name)}</h1><p class=\"sub\">mlxscan study report: {' &middot; '.join(facts)}</p>"
            + description)


def _problems(study: Study) -> str:
    failed = [step.name for step in study.steps if step.status == "failed"]
    parts = []
    if failed:
        parts.append(f'<div class="alert"><b>{len(failed)} step{"s" if len(failed) > 1 else ""} failed:</b> '
                     + ", ".join(f'<a href="#step-{escape(slug(name))}">{escape(name)}</a>' for name in failed)
                     + ". Their claims are missing from the ledger, not null.</div>")
    if study.problems:
        parts.append('<div class="alert"><b>Data files that do not match the study\'s record:</b><ul>'
                     + "".join(f"<li class=\"mono\">{escape(problem)}</li>" for problem in study.problems)
                     + "</ul></div>")
    return "".join(parts)


def build_html(study: Study, page_dir: Path) -> str:
    """The whole page; links are relative to page_dir, the folder the page will be written to."""
    link = _Linker(study.root, page_dir)
    body = [_header(study), _problems(study), _ledger(study, link), study_figures(study, link), steps_overview(study),
            *(step_section(step, study, link) for step in study.steps), provenance_section(study)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            '<link rel="icon" href="data:,">'  # no favicon request, hence no failed load in the console
            f"<title>{escape(study.name)}: mlxscan study report</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(body)}</main></body></html>\n")


def default_report_path(study_dir) -> Path:
    return Path(study_dir) / "report.html"


def write_report(study_dir, out_path=None) -> ReportResult:
    """Read STUDY_DIR and write its report (default STUDY_DIR/report.html) whole or not at all."""
    study = read_study(study_dir)
    path = Path(out_path) if out_path is not None else default_report_path(study_dir)
    if path.is_dir():
        path = path / "report.html"
    if path.suffix.lower() not in (".html", ".htm"):
        raise MlxscanError(f"--out {path} must be an .html file or a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    page = build_html(study, path.parent).encode("utf-8")
    write_outputs(path.parent, {path.name: page})  # whole or not at all
    steps: dict[str, int] = {}
    for step in study.steps:
        steps[step.status] = steps.get(step.status, 0) + 1
    return ReportResult(path, len(page), verdict_counts(study), steps,
                        len(study.figures) + sum(len(step.figures) for step in study.steps), study.problems,
                        study.gate is not None)
