"""`mlxscan probe`: layer-wise decoding of a stimulus label, against the untrained twin.

Scans (cached) the trained model and its twin on the same stimuli, probes every layer of both the
same way, and asks the seed study's depth questions at the trained model's best layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MlxscanError

TARGETS = ("category", "frame")


@dataclass
class ProbeOutcome:
    """Everything `mlxscan probe` reports, with the arrays the numbers came from."""

    model: str
    site: str
    target: str
    classes: list[str]
    trained: object  # analysis.probes.ProbeReport
    twin: object | None
    span_trained: float
    span_twin: float | None
    depth: dict
    scans: dict[str, str]
    layer_numbers: list[int]  # model layer of each probed position (scans may hold a subset of layers)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        twin_layers = {item.layer: item for item in self.twin.layers} if self.twin else {}
        layers = []
        for item in self.trained.layers:
            twin_item = twin_layers.get(item.layer)
            layers.append({
                "layer": self.layer_numbers[item.layer], "accuracy": item.accuracy, "ci": list(item.accuracy_ci), "auc": item.auc,
                "auc_ci": list(item.auc_ci), "p": item.p_gaussian, "p_empirical": item.p_empirical,
                "permutations_run": item.permutations_run, "settled_early": item.settled_early,
                "twin_accuracy": twin_item.accuracy if twin_item else None,
                "twin_ci": list(twin_item.accuracy_ci) if twin_item else None,
                "twin_p": twin_item.p_gaussian if twin_item else None,
                "twin_permutations_run": twin_item.permutations_run if twin_item else None,
                "twin_settled_early": twin_item.settled_early if twin_item else None,
            })
        return {
            "model": self.model, "site": self.site, "target": self.target, "classes": self.classes,
            "chance": self.trained.chance, "majority_rate": self.trained.majority_rate,
            "folds": self.trained.folds, "permutations": self.trained.permutations,
            "first_look": self.trained.first_look, "early_stop": self.trained.early_stop,
            "layers": layers, "span_trained": self.span_trained, "span_twin": self.span_twin,
            "depth": self.depth, "scans": self.scans,
            "notes": "p: Student-t prediction p of the accuracy under a normal null fitted to the permutations "
                     "(labels shuffled across word groups, each shuffle with its own word-grouped folds); a layer "
                     "runs all permutations unless its first first_look settle it (settled_early); span: fraction "
                     "of layers with Holm-corrected p < 0.05.",
        }


def labels_for(scan, target: str) -> tuple[np.ndarray, list[str]]:
    if target == "category":
        return scan.labels, list(scan.stimuli.categories)
    if target == "frame":
        frames = [s.frame for s in scan.stimuli]
        if any(frame is None for frame in frames):
            raise MlxscanError("--target frame needs a frame field on every stimulus")
        names = sorted(set(frames))
        return np.array([names.index(frame) for frame in frames]), names
    raise MlxscanError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")


def depth_questions(X_layer: np.ndarray, y, groups, *, folds: int, seed: int, classes: list[str]) -> dict:
    """Rank-1, retention and the nonlinear gap at one layer, as JSON-able numbers."""
    from ..analysis.probe_depth import concept_rank, mlp_gap, retention

    rank = concept_rank(X_layer, y, groups, folds=folds, seed=seed)
    kept = retention(X_layer, y, groups, folds=folds, seed=seed)
    gap = mlp_gap(X_layer, y, groups, folds=folds, seed=seed)
    return {"rank": _plain(rank, classes), "retention": _plain(kept, classes), "mlp_gap": _plain(gap, classes)}


def _plain(result, classes) -> dict:
    """A result dataclass as JSON-able values (arrays to lists, per-category arrays keyed by class)."""
    out = {}
    for key, value in (result.to_dict() if hasattr(result, "to_dict") else vars(result)).items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if key == "classes":
            value = [classes[int(index)] for index in value]
        out[key] = value
    return out


def _model_of(scan):
    """The model a scan was made with, loaded as it was then; refuses if its weights have changed since."""
    from ..models import load

    recorded = scan.manifest["model"]
    ref = None if recorded["ref"].startswith("bundled:") else recorded["path"]
    model = load(ref, dtype=recorded["dtype"], dequantize=not recorded["quantized"])
    if model.weights_sha256() != recorded["sha256"]:
        raise MlxscanError(f"the model of {scan.folder} ({recorded['path']}) has changed since the scan; "
                           "rescan it, or pass --no-twin")
    return model


def run_probe(*, scan=None, model_ref=None, stimuli_path: Path | None = None, site: str = "resid_post",
              target: str = "category", folds: int = 5, permutations: int = 20, early_stop: bool = True,
              twin: bool = True, seed: int = 0,
              pool: str = "word", say: Callable[[str], None] = lambda message: None, scan_progress=None,
              probe_progress=None) -> ProbeOutcome:
    """Probe every layer of a scan (or of a cached scan made now) and of the untrained twin's scan."""
    from ..analysis.probes import FIRST_LOOK, decodable_span, probe_layers
    from ..capture.scan import ScanSettings, cached_scan
    from ..models import load
    from ..models.twin import make_twin
    from ..stimuli import load_stimuli

    model = None
    if scan is None:
        stimuli = load_stimuli(stimuli_path)
        model = load(model_ref)
        say(f"scanning {model.ref} on {len(stimuli)} stimuli ({site}, pool {pool}; cached)")
        scan = cached_scan(model, stimuli, ScanSettings(sites=(site,), pool=pool), progress=scan_progress)
    if scan.pool == "all":
        raise MlxscanError(f"{scan.folder} is a token-level scan (--pool all); probes need one vector per "
                           "stimulus: scan with --pool word, last or mean")
    if site not in scan.sites:
        raise MlxscanError(f"the scan has no site {site!r} (it has {', '.join(scan.sites)}); pass --site")
    y, classes = labels_for(scan, target)
    groups = scan.groups
    say(f"probing {len(scan.layers)} layers ({folds} group folds by word, {permutations} permutations"
        + (f"; {FIRST_LOOK} where they settle the verdict)" if early_stop and permutations > FIRST_LOOK else ")"))
    # probe_layers indexes positions along the scan's layer axis; layer_numbers maps them back.
    trained = probe_layers(scan[site], y, groups, folds=folds, permutations=permutations, early_stop=early_stop,
                           seed=seed, progress=probe_progress)
    twin_report, twin_scan = None, None
    if twin:
        if model is None:
            model = _model_of(scan)
        twin_model = make_twin(model, seed=seed)
        settings = ScanSettings(sites=(site,), layers=tuple(scan.layers), pool=scan.pool)
        say(f"scanning the untrained twin (seed {seed}; cached)")
        twin_scan = cached_scan(twin_model, scan.stimuli, settings, progress=scan_progress)
        say("probing the twin the same way")
        twin_report = probe_layers(twin_scan[site], y, groups, folds=folds, permutations=permutations,
                                   early_stop=early_stop, seed=seed, progress=probe_progress)
    best = scan.layers[max(trained.layers, key=lambda item: item.accuracy).layer]
    say(f"depth questions at the best layer ({best})")
    depth = {"layer": best, **depth_questions(np.asarray(scan.layer(site, best), np.float64), y, groups,
                                               folds=folds, seed=seed, classes=classes)}
    arrays = {f"trained_{k}": v for k, v in trained.arrays().items()}
    if twin_report is not None:
        arrays.update({f"twin_{k}": v for k, v in twin_report.arrays().items()})
    arrays["labels"], arrays["layers"] = np.asarray(y), np.asarray(scan.layers)
    return ProbeOutcome(
        model=scan.manifest["model"]["ref"], site=site, target=target, classes=classes, trained=trained,
        twin=twin_report, span_trained=decodable_span([item.p_gaussian for item in trained.layers]),
        span_twin=None if twin_report is None else decodable_span([item.p_gaussian for item in twin_report.layers]),
        depth=depth, scans={"trained": str(scan.folder), "twin": str(twin_scan.folder) if twin_scan else None},
        layer_numbers=list(scan.layers), arrays=arrays,
    )
