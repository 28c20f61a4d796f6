"""`mlxscan invariance`: does the model care how long the residual is, or only where it points?

At layer L (resid_post, every token position), for each factor s:
  whole    the whole residual times s;
  concept  only its component along the stimulus' own category direction u_c times s
           (x + (s - 1)(x . u_c) u_c), each category's stimuli with their own direction.
The output change is KL(clean || scaled) of the last token's next-token distribution (and how often
the most likely token stays); the concept readout change is the concept shift toward the stimulus'
own category at R and the readout probe's change of P(own category) (see causal.Baseline).

A pre-norm block adds its output to the residual it was given, so scaling the residual at L also
rescales everything earlier layers wrote against everything later layers will write: it is not
expected to be invisible. One case is exact by construction: the last residual feeds only the
final RMSNorm, so scaling it changes nothing but the norm's epsilon term. `exact_check` runs that
case and the command fails (exit 1) when the logits move by more than the tolerance: it tests the
intervention machinery itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import MlxscanError
from .causal import SITE, Baseline, Say, check_finite, jsonable, mean_with_ci, quiet, run_all, run_groups

DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
TOLERANCE = 1e-5
CHECK_STIMULI = 32  # the exact check needs only a few stimuli: it is all or nothing


@dataclass(frozen=True)
class ScaledArm:
    """One factor applied one way (whole residual or concept component)."""

    kl: float
    kl_ci: tuple[float, float]
    top1_agreement: float
    shift: float  # toward the own category at R, in units of its clean separation
    shift_ci: tuple[float, float]
    probability_change: float  # of P(own category)
    probability_change_ci: tuple[float, float]


@dataclass(frozen=True)
class InvarianceRow:
    factor: float
    whole: ScaledArm
    concept: ScaledArm


@dataclass(frozen=True)
class ExactCheck:
    """Scaling the last layer's residual (the final norm's input): logits must not move."""

    layer: int
    factors: tuple[float, ...]
    max_relative_logit_change: tuple[float, ...]  # per factor: max |Δlogit| / max |logit|
    max_kl: tuple[float, ...]
    tolerance: float
    n_stimuli: int

    @property
    def ok(self) -> bool:
        return max(self.max_relative_logit_change, default=0.0) <= self.tolerance


@dataclass(eq=False)
class InvarianceResult:
    setup: dict
    rows: tuple[InvarianceRow, ...]
    exact: ExactCheck
    concept_monotonic: bool  # does the concept shift grow with the factor?
    arrays_: dict

    @property
    def ok(self) -> bool:
        return self.exact.ok

    def to_dict(self) -> dict:
        exact = {**self.exact.__dict__, "ok": self.exact.ok}
        return jsonable({
            "experiment": "invariance", **self.setup,
            "rows": [{"factor": row.factor, "whole": row.whole.__dict__, "concept": row.concept.__dict__}
                     for row in self.rows],
            "concept_monotonic": self.concept_monotonic, "exact_check": exact, "ok": self.ok,
            "control": "factor 1 (the clean run); the exact check scales the last residual, before the final "
                       "norm, where the output cannot change",
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays_)


def _scaled_arm(model, baseline: Baseline, run) -> tuple[ScaledArm, dict]:
    from .runs import next_token_change

    own = baseline.y
    kl, same = next_token_change(model, baseline.final_norm, run.final_norm)
    shift = baseline.concept_shift(run.readout, own)
    change = baseline.probability_change(run.readout, own)
    weights = baseline.weights
    (kl_mean, kl_ci), (shift_mean, shift_ci) = mean_with_ci(kl, weights), mean_with_ci(shift, weights)
    change_mean, change_ci = mean_with_ci(change, weights)
    arm = ScaledArm(kl=kl_mean, kl_ci=kl_ci, top1_agreement=float(same.mean()), shift=shift_mean, shift_ci=shift_ci,
                    probability_change=change_mean, probability_change_ci=change_ci)
    return arm, {"kl": kl, "shift": shift, "probability_change": change}


def _unchanged(n: int) -> tuple[ScaledArm, dict]:
    zeros = np.zeros(n)
    return (ScaledArm(kl=0.0, kl_ci=(0.0, 0.0), top1_agreement=1.0, shift=0.0, shift_ci=(0.0, 0.0),
                      probability_change=0.0, probability_change_ci=(0.0, 0.0)),
            {"kl": zeros, "shift": zeros, "probability_change": zeros})


def exact_check(model, baseline: Baseline, factors, tolerance: float = TOLERANCE) -> ExactCheck:
    """Scale resid_post of the last layer on a few stimuli and compare the logits with the clean run's."""
    import mlx.core as mx

    from ..capture.interventions import Scale
    from .runs import next_token_change, run_stimuli

    last = model.n_layers - 1
    rows = np.arange(min(CHECK_STIMULI, len(baseline.stimuli)))
    stimuli = replace(baseline.stimuli, path=None, stimuli=baseline.stimuli.stimuli[:len(rows)])
    reference = baseline.final_norm[rows]
    clean_logits = np.array(model.lm_head(mx.array(reference)).astype(mx.float32))
    changes, kls = [], []
    for factor in (f for f in factors if f != 1.0):
        run = run_stimuli(model, stimuli, sites=(), interventions=[Scale(SITE, last, factor=factor)],
                          next_token=True, batch_size=baseline.batch_size)
        logits = np.array(model.lm_head(mx.array(run.last_final_norm)).astype(mx.float32))
        changes.append(float(np.max(np.abs(logits - clean_logits)) / np.max(np.abs(clean_logits))))
        kls.append(float(next_token_change(model, reference, run.last_final_norm)[0].max()))
        baseline.passes += 1
    return ExactCheck(layer=last, factors=tuple(f for f in factors if f != 1.0),
                      max_relative_logit_change=tuple(changes), max_kl=tuple(kls), tolerance=tolerance,
                      n_stimuli=len(rows))


def run_invariance(model, baseline: Baseline, *, factors=DEFAULT_FACTORS, tolerance: float = TOLERANCE,
                   say: Say = quiet) -> InvarianceResult:
    """Scale the whole residual and only the concept component at L by each factor (module docstring)."""
    from ..capture.interventions import Scale

    factors = tuple(sorted(set(check_finite(factors, "--factors", positive=True))))
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise MlxscanError(f"--tolerance must be a positive number, got {tolerance}")
    n_classes, n = len(baseline.classes), len(baseline.stimuli)
    rows, saved = [], {}
    for number, factor in enumerate(factors, start=1):
        say(f"factor {factor:g} ({number}/{len(factors)})")
        if factor == 1.0:
            (whole, whole_arrays), (concept, concept_arrays) = _unchanged(n), _unchanged(n)
        else:
            whole, whole_arrays = _scaled_arm(model, baseline, run_all(
                model, baseline, [Scale(SITE, baseline.layer, factor=factor)], next_token=True))
            groups = [group for c in range(n_classes) for group in baseline.by_fold(  # cross-fitted directions
                np.flatnonzero(baseline.y == c),
                lambda fold, c=c: [Scale(SITE, baseline.layer, factor=factor, direction=baseline.fold_directions[fold, c])])]
            concept, concept_arrays = _scaled_arm(model, baseline, run_groups(model, baseline, groups, next_token=True))
        rows.append(InvarianceRow(factor=factor, whole=whole, concept=concept))
        for name, values in (("whole", whole_arrays), ("concept", concept_arrays)):
            for key, value in values.items():
                saved.setdefault(f"{name}_{key}", []).append(value)
    say("exact check: scaling the last residual before the final norm")
    exact = exact_check(model, baseline, factors, tolerance)
    shifts = [row.concept.shift for row in rows]
    arrays = {name: np.stack(values) for name, values in saved.items()}  # [factors, n]
    arrays.update({"factors": np.array(factors), "labels": baseline.y, "directions": baseline.directions,
                   "testable": baseline.testable, "clean_auc_ci": baseline.clean_auc_ci, "fold_of": baseline.fold_of,
                   "exact_factors": np.array(exact.factors),
                   "exact_relative_logit_change": np.array(exact.max_relative_logit_change)})
    return InvarianceResult(setup=baseline.describe(), rows=tuple(rows), exact=exact,
                            concept_monotonic=bool(np.all(np.diff(shifts) > 0)), arrays_=arrays)
