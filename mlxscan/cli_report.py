"""`mlxscan report STUDY_DIR`: the study report, one self-contained HTML page."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from .cli import _BadInput, main


def _viewport(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", size)
    if not match or not (320 <= int(match[1]) <= 4096 and 200 <= int(match[2]) <= 16384):
        raise _BadInput(f"--size {size!r} is not WIDTHxHEIGHT in pixels (320-4096 x 200-16384), for example 1280x900")
    return int(match[1]), int(match[2])


@main.command()
@click.argument("study_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="The HTML file to write, or a folder for report.html (default: STUDY_DIR/report.html).")
@click.option("--screenshot", type=click.Path(path_type=Path), default=None,
              help="Also open the page in headless Chromium and save a PNG of it here; exits 1 on any console "
                   "error or figure that does not decode.")
@click.option("--size", default="1280x900", show_default=True, help="Viewport of --screenshot, WIDTHxHEIGHT pixels.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record instead of the summary.")
def report(study_dir, out_path, screenshot, size, as_json):
    """Write the study report: the claims ledger, each step's figures and command, the provenance.

    STUDY_DIR is the folder `mlxscan study run` wrote. The page needs no network: figures are embedded,
    and every number links to its data file in STUDY_DIR (keep the page beside the study, or move both).
    """
    from .report import check_page, find_chromium, write_report

    width, height = _viewport(size)
    if screenshot is not None:
        if screenshot.suffix.lower() != ".png":
            raise _BadInput(f"--screenshot {screenshot} must end in .png")
        if not find_chromium():
            raise _BadInput("--screenshot needs chromium: apt-get install chromium (Debian), or set MLXSCAN_CHROMIUM")
    result = write_report(study_dir, out_path)
    record = result.to_dict()
    check = None
    if screenshot is not None:
        from .outputs import write_outputs

        check = check_page(result.path, width=width, height=height)
        write_outputs(screenshot.parent, {screenshot.name: check.screenshot})
        record["browser"] = {"console_errors": list(check.console_errors), "images": check.n_images,
                             "broken_images": check.broken_images, "screenshot": str(screenshot),
                             "viewport": [width, height], "page_size": list(check.content_size)}
    if as_json:
        click.echo(json.dumps(record))
    else:
        _print_report(record)
    if check is not None and (check.console_errors or check.broken_images):
        sys.exit(1)


def _print_report(record: dict) -> None:
    verdicts = ", ".join(f"{count} {name}" for name, count in record["verdicts"].items() if count) or "none"
    if not record["gate_ran"]:
        verdicts = "none yet (no claims.json: the gate has not run)"
    steps = ", ".join(f"{count} {status}" for status, count in record["steps"].items()) or "none"
    click.echo(f"wrote {record['report']} ({record['bytes'] / 1024:.0f} KiB): claims: {verdicts}; steps: {steps}; "
               f"{record['figures']} figures embedded")
    for problem in record["problems"]:
        click.echo(f"warning: data file {problem} (the page marks it)")
    browser = record.get("browser")
    if browser:
        errors = browser["console_errors"]
        click.echo(f"chromium: {len(errors)} console errors, {browser['images'] - browser['broken_images']}/"
                   f"{browser['images']} figures decoded, page {browser['page_size'][0]}x{browser['page_size'][1]}; "
                   f"screenshot {browser['screenshot']} ({browser['viewport'][0]}x{browser['viewport'][1]})")
        for error in errors:
            click.echo(f"  console error: {error}")
