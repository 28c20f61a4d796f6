"""Adapters of the causal experiments (ablate, steer, invariance).

The causal experiments run on a seeded word subsample of the stimuli; its words (the resampling unit)
are recomputed from the study's stimuli with the step's --per-category, --frames and --seed, and checked
against the labels the step saved.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..analysis.probes import _weighted_ovr_auc  # the project's one weighted-AUC implementation
from ..claims import Claim, untestable_claim
from ..errors import MlxscanError
from ..experiments.causal import subsample_words
from .adapters import StepContext, claim
from .evidence import Evidence, grouped_evidence, prediction_p, weighted_mean

DEFAULT_MARGIN = 0.1  # equivalence margin of "equal" claims (ratio within 1 ± 0.1; KL below 0.1 nats)


def _subsample_groups(ctx: StepContext, labels: np.ndarray) -> np.ndarray:
    per_category, frames = int(ctx.option("per-category", 3)), int(ctx.option("frames", 4))
    chosen = subsample_words(ctx.stimuli(), per_category or None, int(ctx.option("seed", 0)), frames or None)
    if len(chosen) != len(labels) or not np.array_equal(chosen.labels, labels):
        raise MlxscanError(f"step {ctx.name}: its stimuli do not match the study's subsample "
                           f"(--per-category {per_category}, --frames {frames}); was the step run on other stimuli?")
    return chosen.groups


# ---------------------------------------------------------------------------------------------
# ablate


CHANCE = 0.5  # one-vs-rest AUC of a readout that knows nothing


def _above_chance(auc: np.ndarray) -> np.ndarray:
    """Decodability above chance: AUC - 0.5, or 0 where the AUC is at or below chance (nothing to lose)."""
    return np.maximum(np.asarray(auc) - CHANCE, 0.0)


def _arm_losses(arrays: dict, name: str, y: np.ndarray, weights: np.ndarray, testable: np.ndarray) -> np.ndarray:
    """[runs, B] mean over testable categories of the above-chance decodability an arm removed:
    (clean AUC - 0.5)+ - (ablated AUC - 0.5)+ under word weights [B, n]. Per-category arms (one run per
    category) give one row, the category's own AUC; random arms one row per draw, every category's AUC."""
    clean = _above_chance(_weighted_ovr_auc(y, arrays["clean_probabilities"], weights))  # [B, K]
    runs = arrays[f"{name}_probabilities"]  # [runs, n, K]
    if name in ("top_units", "direction"):
        ablated = np.stack([_weighted_ovr_auc(y, runs[c], weights)[:, c] for c in range(clean.shape[1])], axis=1)
        losses = (clean - _above_chance(ablated))[None]
    else:
        losses = np.stack([clean - _above_chance(_weighted_ovr_auc(y, run, weights)) for run in runs])
    with warnings.catch_warnings():  # a resample holding one category has no AUC at all: NaN, skipped later
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(losses[:, :, testable], axis=2)


def _testable(ctx: StepContext, arrays: dict) -> tuple[np.ndarray, str]:
    """(bool [K] categories whose held-out clean readout beats chance, the reason when none does)."""
    if "testable" not in arrays:
        raise MlxscanError(f"step {ctx.name}: its arrays predate cross-fitting (no 'testable'); rerun the step")
    testable = arrays["testable"].astype(bool)
    reason = "" if testable.any() else ("no category's held-out clean readout beats chance (every AUC's 95% word-"
                                        "bootstrap interval reaches 0.5): there is no category to remove or move")
    return testable, reason


ABLATION_CLAIMS = (
    ("direction_vs_random", "direction", "random_direction",
     "Projecting out a category's own (cross-fitted) direction removes more of its above-chance readout than "
     "random directions",
     "random directions projected out ({draws} draws)"),
    ("units_vs_random", "top_units", "random_units",
     "Ablating a category's {k} most selective units (cross-fitted) removes more of its above-chance readout than "
     "{k} random units",
     "{k} random units ablated ({draws} draws)"),
    ("direction_vs_units", "direction", "top_units",
     "One direction carries more of a category's above-chance readout than its {k} most selective units",
     "the category's {k} most selective units ablated"),
)


def ablate_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("ablation.json"), ctx.npz("ablation.npz")
    y = arrays["labels"]
    groups = arrays["groups"].astype(str)
    testable, why_not = _testable(ctx, arrays)
    files = ctx.files("ablation.json", "ablation.npz")
    ones = np.ones((1, len(y)))
    claims = []
    for suffix, arm, control, hypothesis, control_name in ABLATION_CLAIMS:
        if f"{control}_probabilities" not in arrays:
            continue  # e.g. --direction-draws 0: no random-direction arm to compare with
        draws = len(arrays[f"{control}_probabilities"])

        def effect_of(weights, arm=arm, control=control):
            return (_arm_losses(arrays, arm, y, weights, testable)[0]
                    - _arm_losses(arrays, control, y, weights, testable).mean(axis=0))

        if why_not:
            evidence = Evidence(math.nan, (math.nan, math.nan), math.nan, "not run", _NO_REPLICATION)
            own, other = math.nan, math.nan
        else:
            evidence = grouped_evidence(effect_of, groups, strata=y, seed=1, resamples=1000)
            own = float(_arm_losses(arrays, arm, y, ones, testable)[0, 0])
            per_draw = _arm_losses(arrays, control, y, ones, testable)[:, 0]
            other = float(per_draw.mean())
            if control.startswith("random"):
                evidence = _against_draws(evidence, own, per_draw)
        made = claim(
            ctx, suffix, evidence, data_files=files, hypothesis=hypothesis.format(k=record["k"]),
            statistic=f"mean above-chance AUC removed (clean - ablated, each floored at chance) of the held-out "
                      f"readout at layer {record['readout_layer']}, ablating at layer {record['layer']}, over the "
                      f"{int(testable.sum())} categories whose clean readout beats chance",
            value=own, control=control_name.format(k=record["k"], draws=draws), control_value=other)
        if why_not:
            made = untestable_claim(made, why_not)
        elif not math.isfinite(made.p):
            made = untestable_claim(made, f"the {draws} random draws give no spread to test against")
        claims.append(made)
    return claims


_NO_REPLICATION = {"kind": "none", "value": math.nan, "passed": False}


def _against_draws(evidence: Evidence, observed: float, draws: np.ndarray) -> Evidence:
    """The claim "more than the random draws": p is the larger of the words' bootstrap p and the Student-t
    prediction p of the observed value among the draws (a fitted tail: it can reach a corrected threshold)."""
    p_draws, how = prediction_p(observed, draws), "a one-sided Student-t prediction test (fitted tail)"
    if not math.isfinite(p_draws) and len(draws) >= 1 and math.isfinite(observed):
        # Every draw alike (a readout at its ceiling that no random arm moves): no tail can be fitted, and
        # only the rank is known: (r + 1) / (k + 1), whose resolution is bounded by the number of draws.
        p_draws, how = float((np.sum(draws >= observed) + 1) / (len(draws) + 1)), "the empirical rank (r+1)/(k+1)"
    p = max(evidence.p, p_draws) if math.isfinite(p_draws) else math.nan
    return Evidence(evidence.effect, evidence.ci, p,
                    f"larger of: {evidence.test}; and {how} of the observed value among {len(draws)} random draws "
                    f"(p {p_draws:.3g})", evidence.replication)


# ---------------------------------------------------------------------------------------------
# steer


def _equivalence(evidence: Evidence, margin: float) -> Evidence:
    return Evidence(evidence.effect, evidence.ci, evidence.p,
                    f"equivalence within {margin:g}: effect = margin - distance, {evidence.test}",
                    evidence.replication)


def steer_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("steering.json"), ctx.npz("steering.npz")
    y = arrays["labels"]
    groups = _subsample_groups(ctx, y)
    margin = float(ctx.settings.get("margin", DEFAULT_MARGIN))
    files = ctx.files("steering.json", "steering.npz", stimuli=True)
    claims = []
    for row in record["additivity"][1:]:
        n = row["n_layers"]
        spread, single = arrays[f"additivity_spread_{n}"], arrays[f"additivity_single_{n}"]

        def effect_of(weights, spread=spread, single=single):
            return margin - np.abs((weights @ spread) / (weights @ single) - 1.0)

        evidence = _equivalence(grouped_evidence(effect_of, groups, strata=y, seed=n), margin)
        claims.append(claim(
            ctx, f"additive.N{n}", evidence, data_files=files,
            hypothesis=f"Injecting a direction with strength a at {n} consecutive layers moves the concept as much "
                       f"as {n}a at one layer (ratio within 1 ± {margin:g})",
            statistic="concept shift at the readout layer, spread over N layers / all at one layer",
            value=spread.mean() / single.mean(), control="ratio 1 (a perfectly additive stream)",
            control_value=1.0, label_free=True))
    alphas = arrays["alphas"].tolist()
    shift = arrays["shift"][alphas.index(record["steer_alpha"])]
    claims.append(_shift_claim(ctx, record, arrays, shift, groups, files))
    return claims


def _shift_claim(ctx: StepContext, record: dict, arrays: dict, shift: np.ndarray, groups, files) -> Claim:
    """steer.shifts: the own (cross-fitted) direction moves the held-out readout toward its category more than
    random directions of the same norm do, over stimuli steered toward categories whose readout beats chance."""
    y, targets = arrays["labels"], arrays["targets"]
    testable, why_not = _testable(ctx, arrays)
    random = arrays["random_shift"]  # [draws, n]
    rows = testable[targets].astype(np.float64)  # stimuli steered toward a testable category
    difference = shift - random.mean(axis=0)

    def effect_of(weights):
        masked = weights * rows
        with np.errstate(invalid="ignore", divide="ignore"):
            return masked @ difference / masked.sum(axis=1)

    kept = rows > 0
    if why_not:
        evidence, own, other = Evidence(math.nan, (math.nan, math.nan), math.nan, "not run", _NO_REPLICATION), \
            math.nan, math.nan
    else:
        own, per_draw = float(shift[kept].mean()), random[:, kept].mean(axis=1)
        other = float(per_draw.mean())
        evidence = _against_draws(grouped_evidence(effect_of, groups, strata=y, seed=0), own, per_draw)
    made = claim(
        ctx, "shifts", evidence, data_files=files,
        hypothesis=f"Adding a category's direction at layer {record['layer']} (a = {record['steer_alpha']:g}) moves "
                   f"the held-out readout at layer {record['readout_layer']} toward that category more than a random "
                   "direction of the same norm",
        statistic="concept shift toward the target (units of its clean separation, cross-fitted), over stimuli "
                  f"steered toward the {int(testable.sum())} categories whose clean readout beats chance",
        value=own, control=f"random directions of the same norm ({len(random)} draws)", control_value=other)
    if why_not:
        return untestable_claim(made, why_not)
    if not math.isfinite(made.p):
        return untestable_claim(made, f"the {len(random)} random directions give no spread to test against")
    return made


# ---------------------------------------------------------------------------------------------
# invariance


def invariance_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("invariance.json"), ctx.npz("invariance.npz")
    y = arrays["labels"]
    groups = _subsample_groups(ctx, y)
    margin = float(ctx.settings.get("margin", DEFAULT_MARGIN))
    factors = arrays["factors"].tolist()
    files = ctx.files("invariance.json", "invariance.npz", stimuli=True)
    claims = []
    for factor in (f for f in factors if f != 1.0):
        kl = arrays["whole_kl"][factors.index(factor)]
        evidence = _equivalence(grouped_evidence(weighted_mean(margin - kl), groups, strata=y, seed=1), margin)
        claims.append(claim(
            ctx, f"whole_invisible.x{factor:g}", evidence, data_files=files,
            hypothesis=f"Scaling the whole residual by {factor:g} at layer {record['layer']} leaves the next token "
                       f"unchanged (KL below {margin:g} nats)",
            statistic="KL(clean || scaled) of the next-token distribution, nats", value=kl.mean(),
            control=f"the equivalence margin {margin:g} nats", control_value=margin, label_free=True))
    low, high = factors.index(min(factors)), factors.index(max(factors))
    change = arrays["concept_shift"][high] - arrays["concept_shift"][low]
    testable, why_not = _testable(ctx, arrays)
    own = testable[y].astype(np.float64)  # stimuli of categories whose clean readout beats chance

    def effect_of(weights):
        masked = weights * own
        with np.errstate(invalid="ignore", divide="ignore"):
            return masked @ change / masked.sum(axis=1)

    evidence = (Evidence(math.nan, (math.nan, math.nan), math.nan, "not run", _NO_REPLICATION) if why_not
                else grouped_evidence(effect_of, groups, strata=y, seed=2))
    claims.append((lambda made: untestable_claim(made, why_not) if why_not else made)(claim(
        ctx, "concept_moves", evidence, data_files=files,
        hypothesis=f"Scaling only the concept component at layer {record['layer']} moves the concept: more "
                   f"toward the own category at x{max(factors):g} than at x{min(factors):g}",
        statistic=f"concept shift at x{max(factors):g} minus at x{min(factors):g}",
        value=arrays["concept_shift"][high].mean(), control=f"the shift at x{min(factors):g}",
        control_value=arrays["concept_shift"][low].mean())))
    return claims
