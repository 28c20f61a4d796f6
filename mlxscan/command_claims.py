"""Claims on every command: the study's adapters run on the files a command wrote, judged within it.

A command that makes claims (probe, selectivity, ablate, steer, invariance, connectome, cka, ica) saves
its arrays, then `command_claims` turns them into judged claims exactly as a study step would, and
saves `claims.json` beside them. The family of the correction is the command's own claims, so the
verdicts a command prints may be less strict than the same claims inside a larger study.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from .claims import Claim, GateThresholds, claims_lines, claims_record, judge
from .outputs import write_outputs

CLAIMS_FILE = "claims.json"


@contextlib.contextmanager
def output_folder(out_dir: Path | None):
    """The command's --out folder, or a temporary one (removed afterwards) when it was not given:
    claims are always made from saved files."""
    if out_dir is not None:
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="mlxscan-claims-") as folder:
        yield Path(folder)


def command_claims(command: str, folder: Path, options: dict, *, stimuli_path: Path | None = None,
                   settings: dict | None = None, thresholds: GateThresholds | None = None) -> tuple[list[Claim], dict]:
    """(judged claims, claims.json's record) of one command's folder; claims.json is written there."""
    from .study.adapters import claims_of_folder

    thresholds = thresholds or GateThresholds()
    judged = judge(claims_of_folder(command, folder, options, stimuli_path, settings), thresholds)
    record = claims_record(judged, thresholds)
    write_outputs(folder, {CLAIMS_FILE: record})
    return judged, record


__all__ = ["CLAIMS_FILE", "command_claims", "output_folder", "claims_lines"]
