"""The study report: one self-contained HTML page built from a study directory (NumPy/stdlib only, no mlx).

    from mlxscan.report import write_report, check_page
    result = write_report("studies/fmri")            # studies/fmri/report.html
    check = check_page(result.path)                 # headless Chromium: console errors and a screenshot
"""

from .browser import PageCheck, check_page, find_chromium
from .page import ReportResult, build_html, write_report
from .study import ClaimRow, DataFile, Step, Study, read_study

__all__ = ["ClaimRow", "DataFile", "PageCheck", "ReportResult", "Step", "Study", "build_html", "check_page",
           "find_chromium", "read_study", "write_report"]
