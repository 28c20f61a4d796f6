"""From a step's saved files to its claims: one adapter per analysis, reading only the step's folder
(json/npz) and the study's copy of the stimuli. `study verify` reruns them on the same files.

Each adapter states hypotheses the seed study made (or their nulls), so a study directory carries the
seed's battery as claims the gate decides. NumPy only: no mlx, no click.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..claims import Claim, file_record, sha256_of, untestable_claim
from ..errors import MlxscanError
from .evidence import P_FLOOR, Evidence, grouped_evidence, prediction_p, weighted_mean


@dataclass(frozen=True)
class StepContext:
    study_dir: Path
    name: str            # the step's name: claim ids start with it
    command: str
    options: dict        # the step's command options, as the study file gave them
    settings: dict       # the step's `claims` table
    stimuli_path: Path | None
    step_folder: Path | None = None  # where the step's files are, when not study_dir/steps/name (a command's --out)

    @property
    def folder(self) -> Path:
        return self.step_folder if self.step_folder is not None else self.study_dir / "steps" / self.name

    def json(self, filename: str) -> dict:
        path = self.folder / filename
        if not path.is_file():
            raise MlxscanError(f"step {self.name}: {path} is missing; rerun the study to remake the step")
        return json.loads(path.read_text())

    def npz(self, filename: str) -> dict:
        path = self.folder / filename
        if not path.is_file():
            raise MlxscanError(f"step {self.name}: {path} is missing; rerun the study to remake the step")
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def files(self, *filenames: str, stimuli: bool = False) -> list[dict]:
        """data_files records: the step's files (and the stimuli copy) with their sha256."""
        records = [file_record(self.folder / name, self.study_dir) for name in filenames]
        if stimuli:  # a command's stimuli may lie outside its --out folder: then their absolute path
            inside = Path(self.stimuli_path).resolve().is_relative_to(Path(self.study_dir).resolve())
            records.append(file_record(self.stimuli_path, self.study_dir) if inside else
                           {"path": str(Path(self.stimuli_path).resolve()), "sha256": sha256_of(self.stimuli_path)})
        return records

    def option(self, name: str, default):
        return self.options.get(name, self.options.get(name.replace("-", "_"), default))

    def stimuli(self):
        from ..stimuli import load_stimuli

        if self.stimuli_path is None:
            raise MlxscanError(f"step {self.name}: its claims need the stimuli it ran on")
        return load_stimuli(self.stimuli_path)


def claim(ctx: StepContext, suffix: str, evidence: Evidence, *, hypothesis: str, statistic: str, value: float,
          control: str, control_value: float, data_files: list[dict], **extra) -> Claim:
    return Claim(id=f"{ctx.name}.{suffix}", analysis=ctx.command, hypothesis=hypothesis, statistic=statistic,
                 value=float(value), control=control, control_value=float(control_value), effect=evidence.effect,
                 ci=evidence.ci, p=evidence.p, test=evidence.test, replication=evidence.replication,
                 data_files=data_files, **extra)


def null_tail(observed: float, null) -> float:
    """One-sided p of `observed` against null draws: the Student-t prediction test (exact for any number of
    normal draws, as the probe's p), floored at P_FLOOR. NaN for a degenerate null (fewer than 2 finite
    draws, or all equal), which the gate reports as untestable: it once returned 1e-16 there."""
    p = prediction_p(float(observed), null)
    return p if math.isnan(p) else float(max(p, P_FLOOR))


DEGENERATE_NULL = "the null is degenerate (fewer than 2 finite draws, or no spread): p is undefined"


def _testable(made: Claim, reason: str = DEGENERATE_NULL) -> Claim:
    """The claim as made, or marked untestable when its p is NaN."""
    return untestable_claim(made, reason) if math.isnan(made.p) and not made.untestable else made


def chosen_layers(ctx: StepContext, available: list[int]) -> list[int]:
    wanted = ctx.settings.get("layers")
    if wanted is None:
        return list(available)
    missing = [layer for layer in wanted if layer not in available]
    if missing:
        raise MlxscanError(f"step {ctx.name}: claims.layers {missing} were not analysed (layers {available})")
    return list(wanted)


# ---------------------------------------------------------------------------------------------
# probe


def probe_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("probe.json"), ctx.npz("probe_arrays.npz")
    stimuli = ctx.stimuli()
    labels, layers = arrays["labels"], arrays["layers"].tolist()
    if len(labels) != len(stimuli):
        raise MlxscanError(f"step {ctx.name}: probe_arrays.npz has {len(labels)} stimuli, the study's stimuli "
                           f"{len(stimuli)}; the step did not run on the study's stimuli")
    groups, twin = stimuli.groups, "twin_oof_probabilities" in arrays
    files = ctx.files("probe.json", "probe_arrays.npz", stimuli=True)
    rows = {row["layer"]: row for row in record["layers"]}
    claims = []
    for layer in chosen_layers(ctx, layers):
        position = layers.index(layer)
        correct = (arrays["trained_oof_probabilities"][position].argmax(axis=1) == labels).astype(np.float64)
        if twin:
            control = (arrays["twin_oof_probabilities"][position].argmax(axis=1) == labels).astype(np.float64)
            control_name = "the untrained architecture-matched twin, probed the same way"
        else:
            control = np.full(len(labels), record["chance"])
            control_name = "chance (1 / number of classes)"
        evidence = grouped_evidence(weighted_mean(correct - control), groups, strata=labels, seed=layer)
        claims.append(claim(
            ctx, f"decodable.L{layer}", evidence, data_files=files,
            hypothesis=f"The {record['target']} is linearly decodable from {record['site']} at layer {layer} "
                       f"beyond {'the untrained twin' if twin else 'chance'}",
            statistic="word-grouped cross-validated accuracy of a multinomial logistic probe",
            value=correct.mean(), control=control_name, control_value=control.mean(),
            chance_p=rows[layer]["p"]))  # against labels shuffled across words: beats chance, maybe not the twin
    return claims


# ---------------------------------------------------------------------------------------------
# selectivity


def selectivity_claims(ctx: StepContext) -> list[Claim]:
    """Do the top-k units of a category replicate across word halves more than without categories?"""
    record, arrays = ctx.json("selectivity.json"), ctx.npz("selectivity.npz")
    layers = arrays["layers"].tolist()
    files = ctx.files("selectivity.json", "selectivity.npz")
    claims = []
    for layer in chosen_layers(ctx, layers):
        position = layers.index(layer)
        overlaps, shuffled = arrays["overlaps"][position], arrays["shuffled_overlaps"][position]  # [H, K]
        evidence = _halving_evidence(overlaps, shuffled, seed=layer)
        claims.append(_testable(claim(
            ctx, f"units_replicate.L{layer}", evidence, data_files=files,
            hypothesis=f"A category's top-{record['k']} most selective units at layer {layer} are found again on "
                       "the other half of its words, more than when categories are shuffled across words",
            statistic=f"mean |A∩B|/k of top-{record['k']} {record['site']} units over {len(overlaps)} word halvings "
                      "and all categories",
            value=overlaps.mean(), control="the same halvings with categories shuffled across words",
            control_value=shuffled.mean())))
    return claims


def _halving_evidence(overlaps: np.ndarray, shuffled: np.ndarray, seed: int) -> Evidence:
    """Effect = mean overlap - mean shuffled overlap; p: Student-t prediction test among the shuffled halvings' means;
    CI: 2.5-97.5 percentiles over halvings of the paired difference; replication: two halves of the categories."""
    def numbers(columns):
        observed, control = overlaps[:, columns].mean(axis=1), shuffled[:, columns].mean(axis=1)  # [H]
        effect = float(observed.mean() - control.mean())
        p = null_tail(observed.mean(), control)
        if math.isnan(p) and len(control):  # every shuffled halving alike: only the rank is known, (r+1)/(H+1)
            p = float((np.sum(control >= observed.mean()) + 1) / (len(control) + 1))
        return effect, p, np.percentile(observed - control, [2.5, 97.5])

    n_classes = overlaps.shape[1]
    effect, p, (low, high) = numbers(np.arange(n_classes))
    half = np.random.default_rng([seed, 78]).permutation(n_classes)[: n_classes // 2]
    halves = [numbers(np.sort(half)), numbers(np.setdiff1d(np.arange(n_classes), half))]
    passed = all(h[0] > 0 and h[1] < 0.05 for h in halves)
    return Evidence(effect=effect, ci=(float(low), float(high)), p=p,
                    test=f"one-sided: Student-t prediction test of the mean overlap among {len(shuffled)} halvings with "
                         "categories shuffled across words; CI: percentiles over halvings of the paired difference",
                    replication={"kind": "split-half over categories", "value": float(min(h[0] for h in halves)),
                                 "passed": bool(passed), "halves": [float(h[0]) for h in halves],
                                 "p_halves": [float(h[1]) for h in halves],
                                 "rule": "the effect on each half of the categories alone, > 0 with p < 0.05"})


# ---------------------------------------------------------------------------------------------
# cka


def cka_claims(ctx: StepContext) -> list[Claim]:
    """Representations drift gradually with depth: a layer is more like its neighbour than a layer `gap` on."""
    record, arrays = ctx.json("cka.json"), ctx.npz("cka.npz")
    matrix = arrays["cka_debiased"]
    gap = int(ctx.settings.get("gap", 5))
    n = len(matrix)
    if record.get("scan_b") is not None or n <= gap:
        raise MlxscanError(f"step {ctx.name}: the CKA claim needs one scan with more than {gap} layers")
    rows = np.arange(n - gap)
    differences = matrix[rows, rows + 1] - matrix[rows, rows + gap]  # one per starting layer
    effect = float(differences.mean())
    low, high = (float(v) for v in arrays["gradual_ci"]) if "gradual_ci" in arrays else (effect, effect)
    evidence = Evidence(effect=effect, ci=(low, high), p=math.nan,
                        test="none: a measurement (CI: bootstrap over stimuli, or words when the scan has word "
                             "groups, when cka.npz has it)",
                        replication={"kind": "none", "value": math.nan, "passed": False})
    made = claim(ctx, "gradual_depth", evidence, data_files=ctx.files("cka.json", "cka.npz"),
                 hypothesis=f"Each layer's representation is more similar to the next layer's than to the one "
                            f"{gap} layers on (gradual change with depth)",
                 statistic="debiased linear CKA with the next layer (mean over layers)",
                 value=matrix[rows, rows + 1].mean(), control=f"debiased CKA with the layer {gap} on",
                 control_value=matrix[rows, rows + gap].mean())
    return [untestable_claim(made, GRADUAL_MEASUREMENT)]


GRADUAL_MEASUREMENT = "a measurement: neighbouring layers share the residual stream, so no null here can fail"


# ---------------------------------------------------------------------------------------------
# ica


def ica_claims(ctx: StepContext) -> list[Claim]:
    """The functional networks recur when ICA is fitted on two disjoint halves of the texts."""
    record, arrays = ctx.json("ica.json"), ctx.npz("ica.npz")
    if "split_correlation" not in arrays or arrays["split_correlation"].ndim != 1:
        raise MlxscanError(f"step {ctx.name}: the ICA claim needs one side-by-side fit with its split-half "
                           "consistency (leave out --per-layer and --no-split-half)")
    r, null = arrays["split_correlation"], arrays["null_correlation"]  # [k], [P, k]
    networks = np.arange(len(r))
    files = ctx.files("ica.json", "ica.npz")
    hypothesis = ("ICA functional networks of MLP neurons found on one half of the texts are found again on the "
                  "other half")
    statistic = f"mean |r| of matched spatial maps over {len(r)} networks (Hungarian matching)"
    surrogate = arrays.get("surrogate_correlation")
    if surrogate is None or surrogate.ndim != 2 or len(surrogate) == 0:
        made = claim(ctx, "networks_recur", Evidence(float(r.mean() - null.mean()), (math.nan, math.nan), math.nan,
                                                     "none", {"kind": "none", "value": math.nan, "passed": False}),
                     data_files=files, hypothesis=hypothesis, statistic=statistic, value=r.mean(),
                     control="the same matching after shuffling neurons in one half (a null any low-rank "
                             "Gaussian data beats)", control_value=null.mean())
        return [untestable_claim(made, "no covariance-matched Gaussian surrogates in ica.npz (rerun with "
                                       "--surrogates >= 2): the neuron-shuffled null cannot fail")]
    boot = grouped_evidence(weighted_mean(r - surrogate.mean(axis=0)), networks.astype(str), seed=0,
                            unit="networks")
    replication = {"kind": "none", "value": math.nan, "passed": False,
                   "rule": "a second, independent split of the texts beats its own surrogates, p < 0.05"}
    second, second_surrogate = arrays.get("second_correlation"), arrays.get("second_surrogate_correlation")
    if second is not None and second_surrogate is not None:
        p_second = null_tail(second.mean(), second_surrogate.mean(axis=1))
        value = float(second.mean() - second_surrogate.mean())
        replication = {"kind": "second split of the texts, everything refit", "value": value,
                       "passed": bool(value > 0 and p_second < 0.05), "p": p_second, "rule": replication["rule"]}
    evidence = Evidence(float(r.mean() - surrogate.mean()), boot.ci, null_tail(r.mean(), surrogate.mean(axis=1)),
                        f"one-sided: Student-t prediction p of the mean |r| among {len(surrogate)} covariance-"
                        "matched Gaussian surrogates (same shape, same split, same ICA); CI: bootstrap over networks",
                        replication)
    return [_testable(claim(ctx, "networks_recur", evidence, data_files=files, hypothesis=hypothesis,
                            statistic=statistic, value=r.mean(),
                            control="the same ICA and matching on Gaussian rows with the signals' covariance (the neuron-shuffled "
                                    f"null, which any low-rank Gaussian beats, scored {null.mean():.3f})",
                            control_value=surrogate.mean()))]


def _registry() -> dict[str, Callable[[StepContext], list[Claim]]]:
    from .adapters_causal import ablate_claims, invariance_claims, steer_claims
    from .adapters_networks import connectome_claims

    return {"probe": probe_claims, "selectivity": selectivity_claims, "cka": cka_claims, "ica": ica_claims,
            "ablate": ablate_claims, "steer": steer_claims, "invariance": invariance_claims,
            "connectome": connectome_claims}


def claims_of_folder(command: str, folder: Path, options: dict, stimuli_path: Path | None = None,
                     settings: dict | None = None) -> list[Claim]:
    """The claims of one command's --out folder, ids prefixed with the command's name (no gate applied).

    What a command prints under `claims`: the same adapters a study uses, on the files the command wrote,
    so a command and a study step with the same options make the same claims."""
    adapter = _registry().get(command)
    if adapter is None:
        return []
    folder = Path(folder)
    ctx = StepContext(study_dir=folder, name=command, command=command, options=dict(options),
                      settings=dict(settings or {}), stimuli_path=None if stimuli_path is None else Path(stimuli_path),
                      step_folder=folder)
    return adapter(ctx)


def claims_of_step(study_dir: Path, record: dict, entry: dict) -> list[Claim]:
    """The claims of one done step (none for steps that only prepare, like scans)."""
    adapter = _registry().get(entry["analysis"])
    if adapter is None:
        return []
    ctx = StepContext(study_dir=Path(study_dir), name=entry["name"], command=entry["analysis"],
                      options=entry.get("params") or {}, settings=entry.get("claims_params") or {},
                      stimuli_path=Path(study_dir) / record["stimuli"]["path"])
    return adapter(ctx)
