"""Adapters of the causal experiments (ablate, steer, invariance).

The causal experiments run on a seeded word subsample of the stimuli; its words (the resampling unit)
are recomputed from the study's stimuli with the step's --per-category, --frames and --seed, and checked
against the labels the step saved.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..analysis.probes import _weighted_ovr_auc  # the project's one weighted-AUC implementation
from ..claims import Claim
from ..errors import MlxscanError
from ..experiments.causal import subsample_words
from .adapters import StepContext, claim, null_tail
from .evidence import Evidence, grouped_evidence, weighted_mean

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


def _arm_delta(arrays: dict, name: str, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[B] mean over categories of ΔAUC (clean - ablated) of one arm under word weights [B, n].

    Per-category arms (one run per category) count each category's own AUC; random arms average every
    category's AUC over their draws.
    """
    clean = _weighted_ovr_auc(y, arrays["clean_probabilities"], weights)  # [B, K]
    runs = arrays[f"{name}_probabilities"]  # [runs, n, K]
    n_classes = clean.shape[1]
    if name in ("top_units", "direction"):
        ablated = np.stack([_weighted_ovr_auc(y, runs[c], weights)[:, c] for c in range(n_classes)], axis=1)
    else:
        ablated = np.mean([_weighted_ovr_auc(y, run, weights) for run in runs], axis=0)
    with warnings.catch_warnings():  # a resample holding one category has no AUC at all: NaN, skipped later
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(clean - ablated, axis=1)


ABLATION_CLAIMS = (
    ("direction_vs_random", "direction", "random_direction",
     "Projecting out a category's own direction removes more of its readout than a random direction",
     "a random direction projected out"),
    ("units_vs_random", "top_units", "random_units",
     "Ablating a category's {k} most selective units removes more of its readout than {k} random units",
     "{k} random units ablated"),
    ("direction_vs_units", "direction", "top_units",
     "One direction carries more of a category's readout than its {k} most selective units",
     "the category's {k} most selective units ablated"),
)


def ablate_claims(ctx: StepContext) -> list[Claim]:
    record, arrays = ctx.json("ablation.json"), ctx.npz("ablation.npz")
    y = arrays["labels"]
    groups = arrays["groups"].astype(str)
    files = ctx.files("ablation.json", "ablation.npz")
    claims = []
    for suffix, arm, control, hypothesis, control_name in ABLATION_CLAIMS:
        if f"{control}_probabilities" not in arrays:
            continue  # e.g. --direction-draws 0: no random-direction arm to compare with
        def effect_of(weights, arm=arm, control=control):
            return _arm_delta(arrays, arm, y, weights) - _arm_delta(arrays, control, y, weights)

        ones = np.ones((1, len(y)))
        evidence = grouped_evidence(effect_of, groups, strata=y, seed=1, resamples=1000)
        claims.append(claim(
            ctx, suffix, evidence, data_files=files, hypothesis=hypothesis.format(k=record["k"]),
            statistic=f"mean ΔAUC (clean - ablated) of the readout probe at layer {record['readout_layer']}, "
                      f"ablating at layer {record['layer']}",
            value=_arm_delta(arrays, arm, y, ones)[0], control=control_name.format(k=record["k"]),
            control_value=_arm_delta(arrays, control, y, ones)[0]))
    return claims


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
            control_value=1.0))
    alphas = arrays["alphas"].tolist()
    shift = arrays["shift"][alphas.index(record["steer_alpha"])]
    evidence = grouped_evidence(weighted_mean(shift), groups, strata=y, seed=0)
    claims.append(claim(
        ctx, "shifts", evidence, data_files=files,
        hypothesis=f"Adding a category's direction at layer {record['layer']} (a = {record['steer_alpha']:g}) moves "
                   f"the readout at layer {record['readout_layer']} toward that category",
        statistic="concept shift toward the target (units of its clean separation)", value=shift.mean(),
        control="the clean run (shift 0)", control_value=0.0))
    return claims


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
            control=f"the equivalence margin {margin:g} nats", control_value=margin))
    low, high = factors.index(min(factors)), factors.index(max(factors))
    change = arrays["concept_shift"][high] - arrays["concept_shift"][low]
    evidence = grouped_evidence(weighted_mean(change), groups, strata=y, seed=2)
    claims.append(claim(
        ctx, "concept_moves", evidence, data_files=files,
        hypothesis=f"Scaling only the concept component at layer {record['layer']} moves the concept: more "
                   f"toward the own category at x{max(factors):g} than at x{min(factors):g}",
        statistic=f"concept shift at x{max(factors):g} minus at x{min(factors):g}",
        value=arrays["concept_shift"][high].mean(), control=f"the shift at x{min(factors):g}",
        control_value=arrays["concept_shift"][low].mean()))
    return claims
