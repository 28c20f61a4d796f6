"""The report's per-step sections (figures, command, files, the step's claims) and its provenance."""

from __future__ import annotations

import base64
import json
import struct
from datetime import datetime
from html import escape
from pathlib import Path

from .ledger import ANALYSIS_TITLES, _badge, _Linker, fmt, slug
from .study import ClaimRow, DataFile, Step, Study, is_number


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when the bytes are not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _seconds(start, end) -> float | None:
    try:
        began = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        ended = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
        return (ended - began).total_seconds()
    except (TypeError, ValueError):
        return None


def _duration(record: dict) -> str:
    seconds = record.get("seconds")
    if not is_number(seconds):
        seconds = _seconds(record.get("started"), record.get("finished"))
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def claims_of_step(step: Step, claims: tuple[ClaimRow, ...]) -> list[ClaimRow]:
    """The claims computed from this step's files (a data file under its folder)."""
    out_dir = str(step.record.get("out_dir") or f"steps/{step.name}").rstrip("/") + "/"
    return [claim for claim in claims if any(f.path.startswith(out_dir) for f in claim.data_files)]


def _figure(figure: DataFile, root: Path, link: _Linker) -> str:
    data = (root / figure.path).read_bytes()
    size = png_size(data)
    name = Path(figure.path).name
    caption = link.file(figure, name)
    if size is None:
        return f'<p class="alert">{escape(name)} is not a PNG file; not shown. {caption}</p>'
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" width="{size[0]}" height="{size[1]}" alt="{escape(name)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def study_figures(study: Study, link: _Linker) -> str:
    if not study.figures:
        return ""
    return "<h3>Figures of the whole study</h3>" + "".join(_figure(figure, study.root, link) for figure in study.figures)


def _step_claims(step: Step, claims: list[ClaimRow], link: _Linker) -> str:
    if not claims:
        return ""
    rows = "".join(
        f'<li>{_badge("v", claim.verdict)} <a class="mono" href="#claim-{escape(slug(claim["id"]))}">'
        f'{escape(str(claim["id"]))}</a>: effect {link.number(fmt(claim["effect"], signed=True), claim.data_files)}'
        f" ({escape(str(claim['statistic']))})</li>" for claim in claims)
    return f"<h3>Claims from this step</h3><ul>{rows}</ul>"


def _printed(step: Step, root: Path) -> str:
    """The tables the step's command printed (the study runner saves them as <command>.txt)."""
    texts = [f for f in step.files if f.path.endswith(".txt") and f.size]
    return "".join(f"<h3>Printed by the command <span class=\"sub mono\">{escape(Path(f.path).name)}</span></h3>"
                   f'<pre class="printed">{escape((root / f.path).read_text(errors="replace"))}</pre>' for f in texts)


def _files_table(step: Step, link: _Linker) -> str:
    if not step.files:
        return ""
    rows = "".join(f'<tr><td>{link.file(f, f.path)}</td><td class="num">{f.size:,} B</td>'
                   f'<td class="mono" title="{escape(f.actual_sha256 or "")}">{escape((f.actual_sha256 or "")[:16])}</td></tr>'
                   for f in step.files)
    count = f"{len(step.files)} file{'s' if len(step.files) > 1 else ''}"
    return (f"<details><summary>{count} in {escape(step.files[0].path.rsplit('/', 1)[0])}</summary>"
            f"<table><tr><th>file</th><th>size</th><th>sha256 (first 16)</th></tr>{rows}</table></details>")


def step_section(step: Step, study: Study, link: _Linker) -> str:
    analysis = str(step.record.get("analysis", "?"))
    title = ANALYSIS_TITLES.get(analysis, analysis)
    parts = [f'<section class="step" id="step-{escape(slug(step.name))}">',
             f"<h2>{escape(step.name)} <span class=\"sub\">{escape(title)}</span></h2>",
             f'<p>{_badge("s", step.status)} analysis <code>{escape(analysis)}</code> {escape(_duration(step.record))}</p>',
             "<h3>Reproduce</h3>", f"<pre>{escape(str(step.record.get('command') or 'no command recorded'))}</pre>"]
    if step.record.get("error"):
        parts.append(f'<div class="alert"><b>This step failed:</b><pre>{escape(str(step.record["error"]))}</pre></div>')
    elif step.status != "done":
        parts.append(f'<p class="note">This step is {escape(step.status)}: it has not finished, so it has no results.</p>')
    parts.append(_step_claims(step, claims_of_step(step, study.claims), link))
    if step.figures:
        parts.append("<h3>Figures</h3>" + "".join(_figure(figure, study.root, link) for figure in step.figures))
    elif step.folder is None:
        folder = step.record.get("out_dir") or f"steps/{step.name}"
        parts.append(f'<p class="note">No output folder ({escape(str(folder))}).</p>')
    else:
        parts.append('<p class="note">This step saved no figure.</p>')
    parts.append(_printed(step, study.root))
    params = step.record.get("params")
    if params:
        shown = escape(json.dumps(params, indent=1, default=str))
        parts.append(f"<details><summary>parameters</summary><pre>{shown}</pre></details>")
    parts.append(_files_table(step, link))
    return "".join(parts) + "</section>"


def steps_overview(study: Study) -> str:
    if not study.steps:
        return '<p class="note">study.json lists no steps.</p>'
    rows = "".join(f'<tr><td><a href="#step-{escape(slug(step.name))}">{escape(step.name)}</a></td>'
                   f'<td><code>{escape(str(step.record.get("analysis", "?")))}</code></td><td>{_badge("s", step.status)}</td>'
                   f'<td class="num">{escape(_duration(step.record))}</td><td class="num">{len(step.figures)}</td></tr>'
                   for step in study.steps)
    return ('<h2 id="steps">Steps</h2><table><tr><th>step</th><th>analysis</th><th>status</th><th>time</th>'
            f"<th>figures</th></tr>{rows}</table>")


def _pairs(record: dict) -> str:
    return "".join(f"<tr><th>{escape(str(key))}</th><td class=\"mono\">{escape(str(value))}</td></tr>"
                   for key, value in record.items())


def provenance_section(study: Study) -> str:
    record = study.provenance
    parts = ['<section class="step" id="provenance"><h2>Provenance</h2>']
    for key in ("model", "stimuli", "machine", "versions"):
        if isinstance(record.get(key), dict) and record[key]:
            parts.append(f"<h3>{key}</h3><table>{_pairs(record[key])}</table>")
    times = {key: record[key] for key in ("started", "finished") if record.get(key)}
    if times:
        parts.append(f"<h3>time</h3><table>{_pairs(times)}</table>")
    if record.get("toml"):
        parts.append(f"<details><summary>the study file</summary><pre>{escape(str(record['toml']))}</pre></details>")
    return "".join(parts) + "</section>"
