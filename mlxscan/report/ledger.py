"""The report's building blocks (links, numbers, badges) and the claims ledger.

Every claim sits in one table whatever its verdict, in the same font, so a null reads exactly as loud as a
positive. Every number links to the file it came from, relative to where the page is written, with that
file's sha256 in the link's title.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from urllib.parse import quote

from .study import ClaimRow, DataFile, Study, is_number

# What each analysis' figures show, as the section's subtitle.
ANALYSIS_TITLES = {
    "probe": "decoding by layer, against the untrained twin",
    "selectivity": "unit selectivity maps",
    "directions": "concept directions",
    "ablate": "ablation arms: top-k units against one direction",
    "steer": "steering curves",
    "invariance": "norm invariance",
    "connectome": "connectome graph",
    "wiring": "wiring",
    "cka": "layer x layer CKA",
    "rsa": "representational similarity",
    "ica": "ICA functional networks",
    "inhibit": "inhibiting functional networks",
}
VERDICTS = ("supported", "null", "failed-control", "not judged")
LEDGER_COLUMNS = ("verdict", "claim", "value", "control", "effect, 95% CI", "p", "replication", "data")

_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;background:#fff;margin:0}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:0 0 6px}h3{font-size:16px;margin:18px 0 6px}
.sub{color:#555;margin:0 0 14px}.mono,code,pre{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace}
pre{background:#f4f5f7;border:1px solid #dde0e4;border-radius:4px;padding:8px 10px;white-space:pre-wrap;
word-break:break-all;font-size:13px;margin:6px 0}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{border-bottom:1px solid #e1e4e8;padding:6px 8px;text-align:left;vertical-align:top}
th{background:#f4f5f7;font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
a{color:#0b57a4;text-decoration:none}a:hover{text-decoration:underline}
.badge{display:inline-block;min-width:96px;text-align:center;padding:2px 8px;border-radius:3px;font-weight:700;
font-size:13px;color:#fff;white-space:nowrap}
.v-supported{background:#1f6f3f}.v-null{background:#3d4f7a}.v-failed-control{background:#9a4d00}
.v-not-judged{background:#666}.s-done{background:#1f6f3f}.s-failed{background:#a12626}.s-pending{background:#666}
.s-running{background:#8a6d00}pre.printed{max-height:360px;overflow:auto;word-break:normal;white-space:pre}
.claim-id{font-weight:600}.reason{color:#444;font-size:13px}
.counts{display:flex;gap:10px;flex-wrap:wrap;margin:8px 0 16px}.counts span{font-size:14px}
.alert{border:1px solid #c77;background:#fff3f3;border-radius:4px;padding:8px 12px;margin:10px 0}
.note{border:1px solid #ccd;background:#f6f7fb;border-radius:4px;padding:8px 12px;margin:10px 0}
.bad{color:#a12626;font-weight:700}td.data{overflow-wrap:anywhere;min-width:150px}
tr.group td{background:#eef1f5;border-top:2px solid #c9ced6;font-size:13px}
table.compact{width:auto;margin-bottom:14px}table.compact td,table.compact th{padding:3px 10px}
section.step{border-top:2px solid #d5d9de;margin-top:30px;padding-top:16px}
figure{margin:10px 0 18px;display:inline-block;max-width:100%;vertical-align:top}
figure img{max-width:100%;height:auto;border:1px solid #e1e4e8}figcaption{font-size:13px;color:#555}
details summary{cursor:pointer;color:#0b57a4}
"""


def fmt(value, *, signed: bool = False) -> str:
    """A number for the ledger: 3 decimals, scientific when tiny or huge, 'n/a' when missing or not finite."""
    if not is_number(value):
        return "n/a"
    size = abs(value)
    if size and (size < 1e-3 or size >= 1e5):
        return f"{value:+.2e}" if signed else f"{value:.2e}"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def fmt_p(value) -> str:
    return f"{value:.3g}" if is_number(value) else "n/a"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))


class _Linker:
    """Relative hrefs from the page's folder into the study, so the page works wherever both are moved together."""

    def __init__(self, study_root: Path, page_dir: Path):
        prefix = os.path.relpath(Path(study_root).resolve(), Path(page_dir).resolve())
        self.prefix = "" if prefix == "." else Path(prefix).as_posix() + "/"

    def href(self, relative: str) -> str:
        return quote(self.prefix + relative)

    def title(self, data: DataFile) -> str:
        recorded = data.recorded_sha256 or "not recorded"
        text = f"{data.path}\nsha256 {recorded}"
        if data.status == "changed":
            text += f"\nON DISK NOW {data.actual_sha256}: the file changed after the study"
        elif data.status == "missing":
            text += "\nMISSING from the study folder"
        return text

    def number(self, text: str, files: tuple[DataFile, ...]) -> str:
        """The number linked to the first data file of its claim (the file it was computed from)."""
        if not files:
            return f'<span title="no data file recorded">{escape(text)}</span>'
        data = files[0]
        mark = "" if data.status in ("ok", "unrecorded") else ' <span class="bad">!</span>'
        return (f'<a href="{escape(self.href(data.path))}" title="{escape(self.title(data))}">{escape(text)}</a>'
                + mark)

    def file(self, data: DataFile, label: str | None = None) -> str:
        shown = escape(label or data.path)
        status = "" if data.status in ("ok", "unrecorded") else f' <span class="bad">({data.status})</span>'
        return f'<a class="mono" href="{escape(self.href(data.path))}" title="{escape(self.title(data))}">{shown}</a>{status}'


def _badge(kind: str, text: str) -> str:
    return f'<span class="badge {kind}-{slug(text)}">{escape(text)}</span>'


def _ci(claim: ClaimRow) -> str:
    ci = claim["ci"]
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return "n/a"
    return f"[{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]"


def _replication(claim: ClaimRow) -> str:
    replication = claim["replication"] if isinstance(claim["replication"], dict) else {}
    if not replication:
        return "none"
    passed = replication.get("passed")
    outcome = "passed" if passed is True else ("failed" if passed is False else "not tested")
    rule = f' title="{escape(str(replication["rule"]))}"' if replication.get("rule") else ""
    return (f"<span{rule}>{escape(str(replication.get('kind', '?')))}: {fmt(replication.get('value'))} "
            f"<b>{outcome}</b></span>")


def _ledger_row(claim: ClaimRow, link: _Linker) -> str:
    files = claim.data_files
    p = claim["p"]
    corrected = claim["p_corrected"]
    p_text = link.number(fmt_p(p), files) + (f"<br>corr. {link.number(fmt_p(corrected), files)}"
                                               if corrected is not None else "")
    if claim["chance_p"] is not None:  # the statistic against chance, beside the test against its control
        p_text += f"<br>vs chance {link.number(fmt_p(claim['chance_p']), files)}"
    data = "<br>".join(link.file(f, Path(f.path).name) for f in files) or "none recorded"
    sided = "two-sided" if claim["two_sided"] else "one-sided"
    return (f'<tr id="claim-{escape(slug(claim["id"]))}"><td>{_badge("v", claim.verdict)}</td>'
            f'<td><span class="claim-id mono">{escape(str(claim["id"]))}</span><br>{escape(str(claim["hypothesis"]))}'
            f'<br><span class="reason">{escape(claim["reason"] or "")}</span></td>'
            f'<td class="num">{link.number(fmt(claim["value"]), files)}</td>'
            f'<td class="num">{link.number(fmt(claim["control_value"]), files)}</td>'
            f'<td class="num">{link.number(fmt(claim["effect"], signed=True), files)}<br>{link.number(_ci(claim), files)}</td>'
            f'<td class="num">{p_text}<br><span class="reason">{sided}</span></td>'
            f'<td>{_replication(claim)}</td><td class="data">{data}</td></tr>')


def _group_key(claim: ClaimRow) -> tuple[str, ...]:
    return tuple(str(claim[key]) for key in ("analysis", "statistic", "control", "test"))


def _group_row(claim: ClaimRow) -> str:
    """What a run of claims shares, said once: they differ only in their numbers (layers, doses, ...)."""
    analysis, statistic, control, test = (escape(part) for part in _group_key(claim))
    return (f'<tr class="group"><td colspan="{len(LEDGER_COLUMNS)}"><b>{analysis}</b>: <b>value</b> is the '
            f"{statistic}; <b>control</b> is {control}; <b>test</b>: {test}</td></tr>")


def _ledger_rows(study: Study, link: _Linker) -> str:
    rows, previous = [], None
    for claim in study.claims:
        if _group_key(claim) != previous:
            rows.append(_group_row(claim))
            previous = _group_key(claim)
        rows.append(_ledger_row(claim, link))
    return "".join(rows)


def _by_analysis(study: Study) -> str:
    """Verdicts per analysis, so a null among many positives is found at a glance."""
    table: dict[str, dict[str, int]] = {}
    first: dict[str, str] = {}
    for claim in study.claims:
        name = str(claim["analysis"])
        counts = table.setdefault(name, {verdict: 0 for verdict in VERDICTS})
        counts[claim.verdict] = counts.get(claim.verdict, 0) + 1
        first.setdefault(name, slug(claim["id"]))
    shown = [v for v in VERDICTS if any(counts.get(v) for counts in table.values()) or v != "not judged"]
    header = "<tr><th>analysis</th>" + "".join(f"<th>{_badge('v', v)}</th>" for v in shown) + "</tr>"
    rows = "".join(f'<tr><td><a href="#claim-{escape(first[name])}">{escape(name)}</a></td>'
                   + "".join(f'<td class="num">{counts.get(v, 0)}</td>' for v in shown) + "</tr>"
                   for name, counts in table.items())
    return f'<table class="compact">{header}{rows}</table>'



def verdict_counts(study: Study) -> dict[str, int]:
    counts = {verdict: 0 for verdict in VERDICTS}
    for claim in study.claims:
        counts[claim.verdict] = counts.get(claim.verdict, 0) + 1
    return counts


def _ledger(study: Study, link: _Linker) -> str:
    parts = ['<h2 id="ledger">Claims ledger</h2>']
    if study.gate is None:
        return "".join(parts) + ('<p class="note">No claims.json: the verification gate has not run on this study, so '
                                 "there are no claims to judge yet. Run <code>mlxscan study run</code> to finish it.</p>")
    gate = study.gate
    thresholds = gate.get("thresholds") or {}
    parts.append(f'<p class="sub">{len(study.claims)} claims; {escape(str(gate.get("n_tests", "?")))} tests; '
                 f'correction {escape(str(thresholds.get("correction", "?")))}, '
                 f'alpha {escape(str(thresholds.get("alpha", "?")))}, '
                 f'min effect {escape(str(thresholds.get("min_effect", "?")))}, replication required: '
                 f'{escape(str(thresholds.get("require_replication", "?")))}. Every number links to its data file '
                 "(sha256 on hover).</p>")
    counts = verdict_counts(study)
    parts.append('<div class="counts">' + "".join(f"<span>{_badge('v', verdict)} {count}</span>"
                                                  for verdict, count in counts.items() if count or verdict != "not judged")
                 + "</div>")
    if not study.claims:
        return "".join(parts) + '<p class="note">The gate ran and recorded no claims.</p>'
    header = "<tr>" + "".join(f"<th>{name}</th>" for name in LEDGER_COLUMNS) + "</tr>"
    return "".join(parts) + _by_analysis(study) + f"<h3>Every claim</h3><table>{header}{_ledger_rows(study, link)}</table>"
