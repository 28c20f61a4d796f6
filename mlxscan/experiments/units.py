"""`mlxscan selectivity` and `mlxscan directions`: from a scan (or a cached scan made now) to saved results.

Both read one site of a word-pooled scan, layer by layer, with the stimuli's categories as labels and
their words as the unit every shuffle and split moves. The CLI only parses options and prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import MlxscanError

SELECTIVITY_CONTROL = (
    "null: categories re-drawn as random sets of whole words (labels shuffled across words); a unit's p is "
    "the fraction of shuffles whose best unit (over all units) reaches its d' (maxT, corrected for units). "
    "replicability: each category's words split in two at random; chance is the overlap of two random "
    "k-sets of the units (hypergeometric, k / n_units), and its 95th percentile; shuffled: the same halvings "
    "of categories shuffled across words (what word structure gives without any category)."
)
DIRECTIONS_CONTROL = (
    "split_half_cosine: cosine of a category's mean-difference direction found on two word-disjoint halves "
    "of its words; split_half_cosine_shuffled: the same with labels shuffled across words (about 0 when no "
    "direction is shared by the category's words)."
)


def scan_for(*, scan=None, model_ref=None, stimuli_path: Path | None = None, site: str = "resid_post",
             pool: str = "word", say: Callable[[str], None] = lambda message: None, scan_progress=None):
    """The scan to analyse: the one given, or a cached scan of every layer made now (shared with `probe`)."""
    from ..capture.sites import LAYER_SITES

    if site not in LAYER_SITES:
        raise MlxscanError(f"unknown site {site!r}; choose a per-layer site: {', '.join(LAYER_SITES)}")
    if scan is None:
        from ..capture.scan import ScanSettings, cached_scan
        from ..models import load
        from ..stimuli import load_stimuli

        stimuli = load_stimuli(stimuli_path)
        model = load(model_ref)
        say(f"scanning {model.ref} on {len(stimuli)} stimuli ({site}, pool {pool}; cached)")
        scan = cached_scan(model, stimuli, ScanSettings(sites=(site,), pool=pool), progress=scan_progress)
    if scan.pool == "all":
        raise MlxscanError(f"{scan.folder} is a token-level scan (--pool all); selectivity and directions need one "
                           "vector per stimulus: scan with --pool word, last or mean")
    if site not in scan.sites:
        raise MlxscanError(f"the scan has no site {site!r} (it has {', '.join(scan.sites)}); pass --site")
    return scan


def layer_positions(scan, layers: Sequence[int] | None) -> list[int]:
    """Positions along the scan's layer axis of the requested model layers (all when None)."""
    if layers is None:
        return list(range(len(scan.layers)))
    missing = [layer for layer in layers if layer not in scan.layers]
    if missing:
        raise MlxscanError(f"layers {missing} were not recorded; this scan has layers {scan.layers}")
    return [scan.layers.index(layer) for layer in dict.fromkeys(layers)]


def _provenance(scan, site: str, positions: list[int]) -> dict:
    from .. import __version__
    from ..store.scan_store import now

    manifest = scan.manifest
    return {"scan": str(scan.folder), "model": {"ref": manifest["model"]["ref"], "sha256": manifest["model"]["sha256"]},
            "stimuli": {"sha256": manifest["stimuli"]["sha256"], "n": len(scan),
                        "n_words": int(len(np.unique(scan.groups))), "path": manifest["stimuli"]["path"]},
            "site": site, "pool": scan.pool, "layers": [scan.layers[p] for p in positions],
            "categories": list(scan.stimuli.categories), "created": now(), "mlxscan_version": __version__}


def _name_classes(record: dict, categories: list[str]) -> None:
    """Class indices (the scan's labels) to category names, in place."""
    record["classes"] = [categories[int(c)] for c in record["classes"]]
    for layer in record["layers"]:
        layer["best"]["class"] = categories[int(layer["best"]["class"])]
        for row in layer["classes"]:
            row["class"] = categories[int(row["class"])]


# ---------------------------------------------------------------------------------------------
# Selectivity


@dataclass(frozen=True, eq=False)
class SelectivityOutcome:
    provenance: dict
    report: object  # analysis.selectivity_report.SelectivityReport

    @property
    def layer_numbers(self) -> list[int]:
        return self.provenance["layers"]

    def to_dict(self) -> dict:
        record = self.report.to_dict()
        _name_classes(record, self.provenance["categories"])
        for row, number in zip(record["layers"], self.layer_numbers):
            row["layer"] = number  # model layer, not the position along the scan's axis
        width = int(self.report.layers[0].selectivity.shape[1])
        return {**self.provenance, "width": width, **record, "control": SELECTIVITY_CONTROL,
                "notes": "d': (mean of the category - mean of the rest) / pooled sd, per unit; a preference is d' > 0. "
                         "overlap: |top-k(half A) ∩ top-k(half B)| / k per category, its ci the 2.5-97.5 percentiles "
                         "over halvings. selective_holm: the layer's p (best unit of any category, maxT over "
                         "categories and units) survives Holm correction over layers at 0.05."}

    def arrays(self) -> dict[str, np.ndarray]:
        return {**self.report.arrays(), "layers": np.asarray(self.layer_numbers),
                "categories": np.asarray(self.provenance["categories"])}


def run_selectivity(*, scan=None, model_ref=None, stimuli_path: Path | None = None, site: str = "resid_post",
                    layers: Sequence[int] | None = None, k: int = 20, halvings: int = 100, permutations: int = 1000,
                    seed: int = 0, say: Callable[[str], None] = lambda message: None, scan_progress=None,
                    progress: Callable[[int, int], None] | None = None) -> SelectivityOutcome:
    """Selectivity, its null and split-half replicability of every (requested) layer of a site."""
    from ..analysis.selectivity_report import layer_selectivity

    if k < 1 or halvings < 1 or permutations < 1:
        raise MlxscanError(f"--k, --halvings and --permutations must be at least 1; "
                           f"got {k}, {halvings}, {permutations}")
    scan = scan_for(scan=scan, model_ref=model_ref, stimuli_path=stimuli_path, site=site, say=say,
                    scan_progress=scan_progress)
    positions = layer_positions(scan, layers)
    width = scan[site].shape[2]
    if k > width:
        raise MlxscanError(f"--k {k} is larger than the width of {site} ({width} units); choose k <= {width}")
    say(f"selectivity of {len(positions)} layers ({permutations} word shuffles, {halvings} halvings, k={k})")
    report = layer_selectivity(scan[site], scan.labels, scan.groups, layers=positions, k=k, halvings=halvings,
                               permutations=permutations, seed=seed, progress=progress)
    return SelectivityOutcome(provenance=_provenance(scan, site, positions), report=report)


def save_selectivity(out_dir: Path, outcome: SelectivityOutcome, record: dict | None = None) -> list[Path]:
    """selectivity.json, selectivity.npz and selectivity.png (overlap by layer against chance)."""
    from ..outputs import write_outputs
    from ..plots import line_plot

    record = outcome.to_dict() if record is None else record
    written = write_outputs(out_dir, {"selectivity.json": record, "selectivity.npz": outcome.arrays()})
    rows = record["layers"]
    chance = [row["overlap"]["chance"] for row in rows]
    q95 = [row["overlap"]["chance_q95"] for row in rows]
    series = {f"top-{record['k']} overlap, mean over categories": _with_band(rows, "mean", "ci"),
              "categories shuffled across words": _with_band(rows, "shuffled_mean", "shuffled_ci")}
    hlines = {}
    if len(set(chance)) == 1:  # the same pool of units at every layer: one line each
        hlines = {"chance (random k-sets)": chance[0], "chance, 95th percentile": q95[0]}
    else:
        series.update({"chance (random k-sets)": (chance, None), "chance, 95th percentile": (q95, None)})
    top = max([row["overlap"]["ci"][1] for row in rows] + [row["overlap"]["shuffled_ci"][1] for row in rows] + q95)
    model = Path(record["model"]["ref"].removeprefix("bundled:")).name
    path = Path(out_dir) / "selectivity.png"
    line_plot(path, [row["layer"] for row in rows], series, hlines=hlines, ylim=(0, min(1.0, top * 1.2 + 0.01)),
              title=f"top-{record['k']} overlap, word halves: {model} {record['site']}",
              xlabel="layer", ylabel=f"overlap of top-{record['k']} sets")
    return written + [path]


def _with_band(rows: list[dict], mean: str, interval: str) -> tuple:
    """A line_plot series: the rows' overlap[mean] with the band overlap[interval]."""
    return ([row["overlap"][mean] for row in rows],
            ([row["overlap"][interval][0] for row in rows], [row["overlap"][interval][1] for row in rows]))


# ---------------------------------------------------------------------------------------------
# Directions


@dataclass(frozen=True, eq=False)
class DirectionsOutcome:
    provenance: dict
    directions: object  # analysis.directions.ConceptDirections

    def to_dict(self) -> dict:
        summary = self.directions.to_dict()
        categories = self.provenance["categories"]
        for row, number in zip(summary["layers"], self.provenance["layers"]):
            row["layer"] = number
        return {**self.provenance, "classes": [categories[int(c)] for c in summary["classes"]],
                "shape": list(self.directions.mean.shape), "axes": ["layer", "class", "unit"],
                "method": {"mean": "mean(category) - mean(rest), unit length, raw coordinates",
                           "probe": f"one-vs-rest class-balanced logistic regression (C={self.directions.C}) on "
                                    "standardized features, weights / std (raw coordinates), unit length"},
                "files": {"mean": "directions_mean.npy", "probe": "directions_probe.npy",
                          "control": "directions_control.npz"},
                "control": DIRECTIONS_CONTROL, "halvings": summary["halvings"], "layers_summary": summary["layers"]}


def run_directions(*, scan=None, model_ref=None, stimuli_path: Path | None = None, site: str = "resid_post",
                   layers: Sequence[int] | None = None, C: float = 1.0, seed: int = 0,
                   say: Callable[[str], None] = lambda message: None, scan_progress=None,
                   progress: Callable[[int, int], None] | None = None) -> DirectionsOutcome:
    """Class-mean and probe directions of every category at every (requested) layer of a site."""
    from ..analysis.directions import concept_directions

    scan = scan_for(scan=scan, model_ref=model_ref, stimuli_path=stimuli_path, site=site, say=say,
                    scan_progress=scan_progress)
    positions = layer_positions(scan, layers)
    say(f"directions of {len(scan.stimuli.categories)} categories at {len(positions)} layers")
    directions = concept_directions(scan[site], scan.labels, scan.groups, layers=positions, C=C, seed=seed,
                                    progress=progress)
    return DirectionsOutcome(provenance=_provenance(scan, site, positions), directions=directions)


def save_directions(out_dir: Path, outcome: DirectionsOutcome, record: dict | None = None) -> list[Path]:
    """directions_mean.npy and directions_probe.npy [n_layers, n_classes, width], the control, directions.json."""
    from ..outputs import write_outputs

    return write_outputs(out_dir, {
        "directions_mean.npy": outcome.directions.mean, "directions_probe.npy": outcome.directions.probe,
        "directions_control.npz": outcome.directions.arrays(),
        "directions.json": outcome.to_dict() if record is None else record,
    })
