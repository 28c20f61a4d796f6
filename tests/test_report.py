"""The study report: one self-contained HTML page built from a study directory.

1. A synthetic study made here (study.json with done / failed / pending steps, claims.json with supported,
   null and failed-control claims, PNGs from mlxscan.plots): every claim is in the one ledger, every
   number links to its data file with the recorded sha256, figures are embedded byte for byte, failed and
   figureless steps say so, changed or missing data files are flagged.
2. read_png against images with planted pixels and every PNG row filter.
3. `mlxscan report` (CliRunner): --json, --out elsewhere (links still resolve), exit 2 on bad input with
   nothing written.
4. Headless Chromium: the page opens with zero console errors and every figure decoded, the screenshot is a
   non-blank PNG of the viewport's size; and the checker itself catches planted errors.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from click.testing import CliRunner

from mlxscan.cli import main
from mlxscan.errors import MlxscanError
from mlxscan.plots import heatmap, line_plot, write_png
from mlxscan.report import build_html, check_page, find_chromium, read_study, write_report
from mlxscan.report.study import sha256_of
from png_reader import read_png

VERDICT_OF = {"probe.decodable.L12": "supported", "cka.twin_gap": "null", "steer.dimensionality": "failed-control"}
VIEWPORT = (1100, 800)


def _figures(folder: Path) -> None:
    layers = np.arange(30)
    trained = 0.95 + 0.02 * np.sin(layers / 5)
    line_plot(folder / "probe.png", layers, {"trained": (trained, (trained - 0.02, trained + 0.02)),
              "untrained twin": (np.full(30, 0.11), None)}, title="category decoding by layer", xlabel="layer",
              ylabel="accuracy", hlines={"chance": 0.1})


def _claim(claim_id: str, analysis: str, value: float, control_value: float, p: float, files: list[dict], *,
           passed: bool = True) -> dict:
    effect = value - control_value
    return {"id": claim_id, "analysis": analysis, "hypothesis": f"{claim_id} holds beyond its control",
            "statistic": "word-grouped CV accuracy", "value": value, "control": "untrained twin",
            "control_value": control_value, "effect": effect, "ci": [effect - 0.05, effect + 0.05], "p": p,
            "test": "permutation, 1000 word shuffles", "replication": {"kind": "split-half", "value": 0.8, "passed": passed},
            "data_files": files, "two_sided": False, "p_corrected": min(1.0, 3 * p), "correction": "holm over 3 tests",
            "verdict": VERDICT_OF[claim_id], "reason": f"verdict {VERDICT_OF[claim_id]} for a planted reason"}


def make_study(root: Path) -> Path:
    """A study of four steps: probe (figure), cka (figure), steer (no figure), ablate (failed), ica (pending)."""
    (root / "steps/probe").mkdir(parents=True)
    (root / "steps/cka").mkdir(parents=True)
    (root / "steps/steer").mkdir(parents=True)
    _figures(root / "steps/probe")
    heatmap(root / "steps/cka/cka.png", np.eye(6) * 0.5 + 0.5, title="debiased CKA", xlabel="layer", ylabel="layer")
    np.savez(root / "steps/probe/probe_arrays.npz", accuracy=np.linspace(0.9, 0.98, 30))
    np.savez(root / "steps/cka/cka.npz", cka=np.eye(6))
    (root / "steps/steer/steering.json").write_text(json.dumps({"r": -0.2}))
    line_plot(root / "claims.png", [0, 1, 2], {"-log10 corrected p": ([2.5, 0.03, 2.9], None)}, title="claims",
              xlabel="claim", ylabel="-log10 p")  # a figure of the whole study, beside study.json
    (root / "steps/probe/probe.txt").write_text("layer  accuracy\n   12     0.953 <best>\n")  # what the command printed

    def record(path: str) -> dict:
        return {"path": path, "sha256": sha256_of(root / path)}

    steps = [{"name": name, "analysis": analysis, "params": {"layers": "all"}, "status": status,
              "command": f"mlxscan {analysis} --json --out steps/{name}", "started": "2026-11-23T10:00:00+00:00",
              "finished": "2026-11-23T10:01:30+00:00", "out_dir": f"steps/{name}", "error": error}
             for name, analysis, status, error in [
                 ("probe", "probe", "done", None), ("cka", "cka", "done", None), ("steer", "steer", "done", None),
                 ("ablate", "ablate", "failed", "MlxscanError: --layer 99 is outside the model's 30 layers"),
                 ("ica", "ica", "pending", None)]]
    study = {"name": "fmri <synthetic>", "toml": "[study]\nname = 'fmri'\n",
             "versions": {"mlxscan": "0.1.0", "numpy": np.__version__},
             "model": {"ref": "bundled:SmolLM2-135M-Instruct", "sha256": "ab" * 32},
             "stimuli": {"path": "stimuli/categories.jsonl", "sha256": "cd" * 32},
             "machine": {"platform": "Linux", "cpu": "x86_64", "cores": 2, "memory_gb": 8},
             "started": "2026-11-23T10:00:00+00:00", "finished": "2026-11-23T10:06:00+00:00", "steps": steps}
    claims = [_claim("probe.decodable.L12", "probe", 0.953, 0.112, 0.001, [record("steps/probe/probe_arrays.npz")]),
              _claim("cka.twin_gap", "cka", 0.412, 0.398, 0.31, [record("steps/cka/cka.npz"), record("steps/cka/cka.png")]),
              _claim("steer.dimensionality", "steer", 0.45, 0.52, 0.0004, [record("steps/steer/steering.json")],
                     passed=False)]
    (root / "study.json").write_text(json.dumps(study))
    (root / "claims.json").write_text(json.dumps({"thresholds": {"alpha": 0.05, "correction": "holm", "min_effect": 0.0,
                                                                 "require_replication": True}, "n_tests": 3, "claims": claims}))
    return root


class _Page(HTMLParser):
    """Links (href, title, text), images (src) and table rows (id, cell texts, cell links) of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.links, self.images, self.rows, self._link, self._row = [], [], {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self._link = [attrs.get("href"), attrs.get("title"), ""]
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "tr" and attrs.get("id", "").startswith("claim-"):
            self._row = self.rows.setdefault(attrs["id"][len("claim-"):], {"links": [], "html_tags": []})
        if self._row is not None:
            self._row["html_tags"].append((tag, attrs.get("class")))

    def handle_endtag(self, tag):
        if tag == "a" and self._link is not None:
            self.links.append(tuple(self._link))
            if self._row is not None:
                self._row["links"].append(tuple(self._link))
            self._link = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._link is not None:
            self._link[2] += data


@pytest.fixture()
def study(tmp_path) -> Path:
    return make_study(tmp_path / "study")


# ----------------------------------------------------------------------------------------------------
# 1. The page


def _between(text: str, start: str, end: str | None) -> str:
    begin = text.index(start)
    return text[begin:text.index(end, begin) if end else len(text)]


def test_ledger_holds_every_claim_and_every_number_links_to_its_data_file(study):
    page = build_html(read_study(study), study)
    parsed = _Page(page)
    assert set(parsed.rows) == set(VERDICT_OF)
    claims = {claim["id"]: claim for claim in json.loads((study / "claims.json").read_text())["claims"]}
    for claim_id, row in parsed.rows.items():
        first = claims[claim_id]["data_files"][0]
        texts = {text for _, _, text in row["links"]}
        value, control, effect, p = (claims[claim_id][key] for key in ("value", "control_value", "effect", "p"))
        assert {f"{value:.3f}", f"{control:.3f}", f"{effect:+.3f}", f"{p:.3g}", f"{3 * p:.3g}"} <= texts, texts
        for href, title, text in row["links"]:
            if text[:1].isdigit() or text[:1] in "+-[":  # a number: its claim's first data file, sha256 on hover
                assert href == first["path"] and f"sha256 {first['sha256']}" in title, (claim_id, text, href)
                assert sha256_of(study / unquote(href)) == first["sha256"]
        assert f'class="badge v-{VERDICT_OF[claim_id]}"' in page
    # Nulls as prominent as positives: one table, and verdict styles differ only in their background colour.
    ledger = _between(page, 'id="ledger"', 'id="steps"')
    assert ledger.count("<table>") == 1 and all(f'id="claim-{claim_id}"' in ledger for claim_id in VERDICT_OF)
    # What a run of claims shares (analysis, statistic, control, test) is said once, in a group row.
    assert ledger.count('class="group"') == 3 and ledger.count("word-grouped CV accuracy") == 3
    by_analysis = _between(ledger, 'class="compact"', "</table>")
    assert all(f'href="#claim-{claim_id}"' in by_analysis for claim_id in VERDICT_OF)
    for verdict in ("supported", "null", "failed-control"):
        rule = _between(page, f".v-{verdict}{{", "}")
        assert rule.split("{")[1].startswith("background:#") and ";" not in rule, rule
    assert "correction holm, alpha 0.05" in page


def test_figures_are_embedded_byte_for_byte_and_the_page_needs_no_network(study):
    page = build_html(read_study(study), study)
    parsed = _Page(page)
    figures = sorted(study.rglob("*.png"))
    assert len(parsed.images) == len(figures) == 3
    embedded = {base64.b64decode(image["src"].split(",", 1)[1]) for image in parsed.images}
    assert embedded == {path.read_bytes() for path in figures}
    for image in parsed.images:
        assert image["src"].startswith("data:image/png;base64,")
        width, height = struct.unpack(">II", base64.b64decode(image["src"].split(",", 1)[1])[16:24])
        assert (image["width"], image["height"]) == (str(width), str(height))
    assert "<script" not in page and "http://" not in page and "https://" not in page
    for href, _, _ in parsed.links:
        assert href.startswith("#") or (study / unquote(href)).is_file(), href
    anchors = {href[1:] for href, _, _ in parsed.links if href.startswith("#")}
    assert all(f'id="{anchor}"' in page for anchor in anchors)


def test_failed_pending_and_figureless_steps_say_so(study):
    page = build_html(read_study(study), study)
    for name in ("probe", "cka", "steer", "ablate", "ica"):
        assert f"<pre>mlxscan {name} --json --out steps/{name}</pre>" in page  # the command that reproduces it
    ablate = _between(page, 'id="step-ablate"', "</section>")
    assert "This step failed" in ablate and "--layer 99 is outside the model&#x27;s 30 layers" in ablate
    assert "No output folder" in ablate
    assert "1 step failed" in _between(page, "<main>", 'id="ledger"')
    assert "saved no figure" in _between(page, 'id="step-steer"', "</section>")
    assert "has not finished" in _between(page, 'id="step-ica"', "</section>")
    probe = _between(page, 'id="step-probe"', "</section>")
    assert "<img" in probe and "claim-probe.decodable.L12" in probe and "90 s" in probe
    assert "   12     0.953 &lt;best&gt;" in probe
    assert "fmri &lt;synthetic&gt;" in page and "<synthetic>" not in page  # text is escaped


def test_changed_and_missing_data_files_are_flagged(study):
    np.savez(study / "steps/cka/cka.npz", cka=np.zeros((6, 6)))  # rewritten after the gate recorded its sha256
    (study / "steps/steer/steering.json").unlink()
    read = read_study(study)
    assert read.problems == ("steps/cka/cka.npz: changed", "steps/steer/steering.json: missing")
    page = build_html(read, study)
    row = _Page(page).rows["cka.twin_gap"]
    assert any("ON DISK NOW" in title and href == "steps/cka/cka.npz" for href, title, _ in row["links"])
    assert "(changed)" in page and "(missing)" in page and "steps/cka/cka.npz: changed" in page


def test_a_study_the_gate_has_not_judged_still_renders(study):
    (study / "claims.json").unlink()
    read = read_study(study)
    page = build_html(read, study)
    assert read.gate is None and read.claims == ()
    result = CliRunner().invoke(main, ["report", str(study)])
    assert result.exit_code == 0 and "claims: none yet (no claims.json: the gate has not run)" in result.output
    assert "the verification gate has not run" in page and 'id="step-probe"' in page


@pytest.mark.parametrize("change, message", [
    (lambda claims: claims[0].pop("p"), "lacks p"),
    (lambda claims: claims[1]["data_files"].append({"sha256": "x"}), "data file without a path"),
])
def test_malformed_claims_are_refused(study, change, message):
    ledger = json.loads((study / "claims.json").read_text())
    change(ledger["claims"])
    (study / "claims.json").write_text(json.dumps(ledger))
    with pytest.raises(MlxscanError, match=message):
        read_study(study)


def test_a_data_file_outside_the_study_is_never_read(study, tmp_path):
    (tmp_path / "secret.txt").write_text("not part of the study")
    ledger = json.loads((study / "claims.json").read_text())
    ledger["claims"][0]["data_files"] = [{"path": "../secret.txt", "sha256": sha256_of(tmp_path / "secret.txt")}]
    (study / "claims.json").write_text(json.dumps(ledger))
    assert read_study(study).claims[0].data_files[0].status == "missing"


# ----------------------------------------------------------------------------------------------------
# 2. PNG reading (the screenshot check decodes Chromium's PNGs, which use every row filter)


def _paeth(left, up, corner):
    estimate = left + up - corner
    distances = np.stack([np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - corner)])
    return np.choose(np.argmin(distances, axis=0), [left, up, corner])  # argmin keeps the first on ties: a, b, c


def _encode_png(pixels: np.ndarray, filters: np.ndarray) -> bytes:
    """An RGB(A) PNG whose rows use the given filter types (the forward filters, one row at a time)."""
    height, width, channels = pixels.shape
    original = pixels.astype(np.int32)
    previous = np.zeros((width, channels), np.int32)
    rows = []
    for r in range(height):
        left = np.vstack([np.zeros((1, channels), np.int32), original[r, :-1]])
        corner = np.vstack([np.zeros((1, channels), np.int32), previous[:-1]])
        prediction = [0, left, previous, (left + previous) // 2, _paeth(left, previous, corner)][filters[r]]
        rows.append(bytes([filters[r]]) + ((original[r] - prediction) % 256).astype(np.uint8).tobytes())
        previous = original[r]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, {3: 2, 4: 6}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
def test_read_png_undoes_every_row_filter(channels):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (37, 53, channels), dtype=np.uint8)
    pixels[10:20] = pixels[10:20, :1]  # flat runs, where filters predict exactly
    filters = np.tile(np.arange(5), 8)[:37]
    assert np.array_equal(read_png(_encode_png(pixels, filters)), pixels)


def test_read_png_reads_what_plots_write(tmp_path):
    canvas = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(read_png(write_png(tmp_path / "a.png", canvas).read_bytes()), canvas)
    with pytest.raises(MlxscanError, match="not a PNG"):
        read_png(b"GIF89a" + bytes(40))


# ----------------------------------------------------------------------------------------------------
# 3. The command


def test_report_command_writes_the_page_and_one_json_record(study):
    result = CliRunner().invoke(main, ["report", str(study), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["report"] == str(study / "report.html") and (study / "report.html").is_file()
    assert record["verdicts"] == {"supported": 1, "null": 1, "failed-control": 1, "not judged": 0}
    assert record["steps"] == {"done": 3, "failed": 1, "pending": 1} and record["figures"] == 3
    assert record["bytes"] == (study / "report.html").stat().st_size and record["problems"] == [] and record["gate_ran"]
    summary = CliRunner().invoke(main, ["report", str(study)])
    assert summary.exit_code == 0 and "1 supported, 1 null, 1 failed-control" in summary.output


def test_links_resolve_from_a_page_written_elsewhere(study, tmp_path):
    page = tmp_path / "elsewhere" / "deeper" / "fmri.html"
    result = CliRunner().invoke(main, ["report", str(study), "--out", str(page)])
    assert result.exit_code == 0, result.output
    hrefs = [href for href, _, _ in _Page(page.read_text()).links if not href.startswith("#")]
    assert hrefs and all(href.startswith("../../study/") for href in hrefs)
    assert all((page.parent / unquote(href)).resolve().is_file() for href in hrefs)


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a folder"),
    (["{empty}"], "has no study.json"),
    (["{study}", "--out", "{tmp}/report.txt"], "must be an .html file"),
    (["{study}", "--size", "big"], "--size 'big' is not WIDTHxHEIGHT"),
    (["{study}", "--screenshot", "{tmp}/shot.jpg"], "must end in .png"),
    (["{broken}"], "is not valid JSON"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(study, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    broken = make_study(tmp_path / "broken")
    (broken / "claims.json").write_text("{not json")
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "study": study, "tmp": tmp_path,
             "broken": broken}
    before = sorted(p for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["report", *(arg.format(**names) for arg in args)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, no temporary file left


def test_screenshot_without_chromium_is_refused_before_writing(study, monkeypatch):
    monkeypatch.delenv("MLXSCAN_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(study))  # no chromium on it
    result = CliRunner().invoke(main, ["report", str(study), "--screenshot", str(study / "shot.png")])
    assert result.exit_code == 2 and "--screenshot needs chromium" in result.output
    assert not (study / "report.html").exists() and not (study / "shot.png").exists()
    monkeypatch.setenv("MLXSCAN_CHROMIUM", "/bin/false")  # a browser that dies at once: one line, exit 2
    result = CliRunner().invoke(main, ["report", str(study), "--screenshot", str(study / "shot.png")])
    assert result.exit_code == 2 and "chromium" in result.output and not (study / "shot.png").exists()


def test_claims_not_yet_judged_are_counted_as_such(study):
    ledger = json.loads((study / "claims.json").read_text())
    for claim in ledger["claims"]:
        claim.update(verdict=None, p_corrected=None, correction=None, reason="")
    (study / "claims.json").write_text(json.dumps(ledger))
    record = write_report(study).to_dict()
    assert record["verdicts"] == {"supported": 0, "null": 0, "failed-control": 0, "not judged": 3}
    ledger = _between((study / "report.html").read_text(), 'id="ledger"', 'id="steps"')
    assert ledger.count('class="badge v-not-judged"') == 5  # 3 rows, the count and the by-analysis header


def test_report_help():
    result = CliRunner().invoke(main, ["report", "--help"])
    assert result.exit_code == 0 and "STUDY_DIR" in result.output and "--screenshot" in result.output


# ----------------------------------------------------------------------------------------------------
# 4. Headless Chromium

needs_browser = pytest.mark.skipif(
    find_chromium() is None and not os.environ.get("MLXSCAN_REQUIRE_BROWSER"),
    reason="chromium is not installed (python3 scripts/bootstrap.py --test installs Debian's package; "
           "set MLXSCAN_REQUIRE_BROWSER=1 to fail instead of skipping)")

VERDICT_COLOURS = {"supported": (0x1F, 0x6F, 0x3F), "null": (0x3D, 0x4F, 0x7A), "failed-control": (0x9A, 0x4D, 0x00)}


@needs_browser
def test_report_opens_in_chromium_with_no_console_errors(study, tmp_path):
    shot = tmp_path / "shots" / "report.png"
    result = CliRunner().invoke(main, ["report", str(study), "--screenshot", str(shot),
                                       "--size", f"{VIEWPORT[0]}x{VIEWPORT[1]}", "--json"])
    assert result.exit_code == 0, result.output
    browser = json.loads(result.output)["browser"]
    assert browser["console_errors"] == [] and browser["images"] == 3 and browser["broken_images"] == 0
    assert browser["page_size"][1] > VIEWPORT[1]  # the whole page is taller than one screen
    pixels = read_png(shot.read_bytes())[..., :3]
    assert pixels.shape[:2] == (VIEWPORT[1], VIEWPORT[0])
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert (pixels != 255).any(axis=2).mean() > 0.02 and len(colours) > 50  # not a blank page
    present = {tuple(colour) for colour in colours.tolist()}
    assert all(colour in present for colour in VERDICT_COLOURS.values())  # the ledger's verdicts are on screen


@needs_browser
def test_the_browser_check_catches_console_errors_and_broken_figures(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img src="missing.png"><img src="data:image/png;base64,AAAA">'
                    '<script>console.error("planted error"); throw new Error("planted exception");</script>'
                    "</body></html>")
    check = check_page(page, width=400, height=300)
    errors = "\n".join(check.console_errors)
    assert len(check.console_errors) == 3, errors
    assert "planted error" in errors and "planted exception" in errors and "missing.png" in errors
    assert check.n_images == 2 and check.broken_images == 2
    assert read_png(check.screenshot).shape[:2] == (300, 400)
    result = CliRunner().invoke(main, ["report", str(make_study(tmp_path / "s")), "--out", str(page),
                                       "--screenshot", str(tmp_path / "ok.png")])
    assert result.exit_code == 0 and "0 console errors, 3/3 figures decoded" in result.output, result.output
