"""`mlxscan ablate`: is a category carried by its most selective units, or by one direction?

At layer L (resid_post, every token position) four arms remove something, and the downstream
category readout at R is compared with the clean run's:
  top_units         each category's own k most selective residual dimensions (largest |d'| at L);
  random_units      k dimensions drawn at random, the same for every category (`draws` draws): the
                    control for top_units;
  direction         each category's own class-mean direction, projected out;
  random_direction  a random unit direction projected out (`direction_draws` draws): the control for
                    direction, which removes one dimension where the unit arms remove k.
Cross-fitted: a category's top units and direction come from each fold's training words and act on the
fold's held-out stimuli (causal.Baseline), so no arm is scored on a word it was fitted on.
Mode "mean" sets what is removed to its clean mean (the unit's mean, or the mean projection on the
direction) rather than to zero, so the residual keeps its typical offset and only the variation is
gone; "zero" sets it to 0. Means are over the clean word-pooled activations at L.

The readout is the clean-trained probe's one-vs-rest AUC per category (see causal.Baseline); ΔAUC =
clean - ablated, for category-specific arms the ablated category's own AUC, for random arms every
category's (averaged over draws). Next-token behaviour: KL(clean || ablated) of the last token's
next-token distribution, and how often the most likely next token stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MlxscanError
from .causal import SITE, Baseline, Say, interval, jsonable, mean_with_ci, ovr_auc, quiet, run_all, run_groups

ARMS = ("top_units", "random_units", "direction", "random_direction")
MODES = ("mean", "zero")


@dataclass(frozen=True)
class AblationArm:
    """One arm's effect. Per-category values are NaN where the arm is not specific to a category."""

    name: str
    description: str
    runs: int  # model runs behind it
    delta_auc: tuple[float, ...]  # [n_classes] clean AUC - ablated AUC of each category
    delta_auc_ci: tuple[tuple[float, float], ...]
    mean_delta_auc: float  # over categories
    mean_delta_auc_ci: tuple[float, float]
    kl: float  # mean KL(clean || ablated) of the next token, nats
    kl_ci: tuple[float, float]
    top1_agreement: float  # fraction of stimuli whose most likely next token is unchanged
    top1_agreement_ci: tuple[float, float]
    relative_change: dict  # intervention kind -> mean ||change|| / ||x|| at L
    per_draw_mean_delta_auc: tuple[float, ...] = ()  # random arms: each draw's mean ΔAUC

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


@dataclass(eq=False)
class AblationResult:
    """`run_ablation`'s answer: the arms, the clean readout, and the arrays behind the numbers."""

    setup: dict
    mode: str
    k: int
    clean_auc: tuple[float, ...]  # [n_classes]
    arms: tuple[AblationArm, ...]
    random_units_p: float  # (1 + draws with mean ΔAUC >= top_units') / (1 + draws)
    units: np.ndarray  # [n_classes, k] the top units of each category
    arrays_: dict

    def arm(self, name: str) -> AblationArm:
        return next(arm for arm in self.arms if arm.name == name)

    def to_dict(self) -> dict:
        return jsonable({
            "experiment": "ablation", **self.setup, "mode": self.mode, "k": self.k,
            "clean_auc": dict(zip(self.setup["classes"], self.clean_auc)),
            "arms": [arm.to_dict() for arm in self.arms],
            "top_units": {c: row for c, row in zip(self.setup["classes"], self.units.tolist())},
            "random_units_p": self.random_units_p,
            "control": "random_units (k random dimensions, many draws) for top_units; random_direction (random "
                       "unit vectors, many draws) for direction; arms cross-fitted over word folds",
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays_)


def check_ablation(model, k: int, draws: int, direction_draws: int, mode: str) -> None:
    if mode not in MODES:
        raise MlxscanError(f"--ablate-mode must be mean or zero, got {mode!r}")
    if not 1 <= k <= model.d_model:
        raise MlxscanError(f"--k {k}: choose 1..{model.d_model} units (the residual is {model.d_model} wide)")
    if draws < 1 or direction_draws < 0:
        raise MlxscanError("--draws must be at least 1 and --direction-draws at least 0")


def _unit_ablation(baseline: Baseline, units, mode: str):
    from ..capture.interventions import Ablate

    mean = baseline.at_layer.mean(axis=0)[units] if mode == "mean" else None
    return [Ablate(SITE, baseline.layer, units=[int(u) for u in units], mode=mode, mean=mean)]


def _direction_ablation(baseline: Baseline, direction: np.ndarray, mode: str):
    """Project the direction out; in mean mode put back its clean mean projection."""
    from ..capture.interventions import Add, Project

    interventions = [Project(SITE, baseline.layer, direction=direction)]
    if mode == "mean":
        unit = direction / np.linalg.norm(direction)
        offset = float(np.mean(baseline.at_layer @ unit))
        interventions.append(Add(SITE, baseline.layer, vector=unit, scale=offset))
    return interventions


class _Scorer:
    """Turns ablated runs into paired ΔAUC, KL and top-1 agreement (bootstrap over words)."""

    def __init__(self, model, baseline: Baseline):
        self.model, self.baseline = model, baseline
        self.clean_auc = ovr_auc(baseline.y, baseline.clean_probabilities)[0]  # [K]
        self.clean_boot = ovr_auc(baseline.y, baseline.clean_probabilities, baseline.weights)  # [B, K]
        self.saved: dict[str, list] = {}  # arrays behind each arm's numbers

    def delta_auc(self, name: str, run) -> tuple[np.ndarray, np.ndarray]:
        """([K] point ΔAUC, [B, K] bootstrap ΔAUC) of one ablated run."""
        probabilities = self.baseline.probe.probabilities(run.readout)
        self.saved.setdefault(f"{name}_probabilities", []).append(probabilities)
        point = self.clean_auc - ovr_auc(self.baseline.y, probabilities)[0]
        return point, self.clean_boot - ovr_auc(self.baseline.y, probabilities, self.baseline.weights)

    def next_token(self, run) -> tuple[np.ndarray, np.ndarray]:
        from .runs import next_token_change

        kl, same = next_token_change(self.model, self.baseline.final_norm, run.final_norm)
        return kl, same.astype(np.float64)

    def arm(self, name, description, points, boots, kls, agreements, changes, per_draw=()) -> AblationArm:
        """points [K], boots [B, K] (already reduced over the arm's runs); kls, agreements [runs, n]."""
        weights = self.baseline.weights
        self.saved[f"{name}_kl"], self.saved[f"{name}_top1_same"] = kls, agreements
        kl, kl_ci = mean_with_ci(np.mean(kls, axis=0), weights)
        same, same_ci = mean_with_ci(np.mean(agreements, axis=0), weights)
        return AblationArm(
            name=name, description=description, runs=len(kls), delta_auc=tuple(points.tolist()),
            delta_auc_ci=tuple(interval(boots[:, c]) for c in range(boots.shape[1])),
            mean_delta_auc=float(np.nanmean(points)), mean_delta_auc_ci=interval(np.nanmean(boots, axis=1)),
            kl=kl, kl_ci=kl_ci, top1_agreement=same, top1_agreement_ci=same_ci,
            relative_change={kind: float(np.mean([c.get(kind, np.nan) for c in changes]))
                             for kind in changes[0]},
            per_draw_mean_delta_auc=tuple(float(v) for v in per_draw))


def _category_arm(scorer: _Scorer, name, description, interventions_of, say: Say) -> AblationArm:
    """One run per category under its own interventions, cross-fitted: interventions_of(c, fold) is built
    from the fold's training words and acts on the fold's held-out stimuli; each category's own ΔAUC."""
    baseline = scorer.baseline
    n_classes = len(baseline.classes)
    points, boots = np.zeros(n_classes), np.zeros((baseline.weights.shape[0], n_classes))
    kls, agreements, changes = [], [], []
    for c, category in enumerate(baseline.classes):
        say(f"{name}: {category} ({c + 1}/{n_classes})")
        groups = baseline.by_fold(np.arange(len(baseline.y)), lambda fold, c=c: interventions_of(c, fold))
        run = run_groups(scorer.model, baseline, groups, next_token=True)
        point, boot = scorer.delta_auc(name, run)
        points[c], boots[:, c] = point[c], boot[:, c]
        kl, same = scorer.next_token(run)
        kls.append(kl), agreements.append(same), changes.append(run.relative_change)
    return scorer.arm(name, description, points, boots, kls, agreements, changes)


def _random_arm(scorer: _Scorer, name, description, interventions_of_draw, draws: int, say: Say) -> AblationArm:
    """`draws` runs, each ablating the same random thing for every category; ΔAUC of all categories."""
    points, boots, kls, agreements, changes = [], [], [], [], []
    for draw in range(draws):
        say(f"{name}: draw {draw + 1}/{draws}")
        run = run_all(scorer.model, scorer.baseline, interventions_of_draw(draw), next_token=True)
        point, boot = scorer.delta_auc(name, run)
        points.append(point), boots.append(boot)
        kl, same = scorer.next_token(run)
        kls.append(kl), agreements.append(same), changes.append(run.relative_change)
    per_draw = [float(np.nanmean(point)) for point in points]
    return scorer.arm(name, description, np.mean(points, axis=0), np.mean(boots, axis=0), kls, agreements,
                      changes, per_draw)


def run_ablation(model, baseline: Baseline, *, k: int = 20, draws: int = 10, direction_draws: int = 2,
                 mode: str = "mean", say: Say = quiet) -> AblationResult:
    """Ablate each category's top-k units, k random units, its direction and a random direction at L;
    report ΔAUC of the readout at R and the next-token change of each arm (see the module docstring)."""
    from ..analysis.selectivity import top_units, unit_selectivity

    check_ablation(model, k, draws, direction_draws, mode)
    d_prime, _ = unit_selectivity(baseline.at_layer, baseline.y)
    # |d'|: a residual dimension is a signed coordinate, so a strongly negative d' marks the category too.
    units = top_units(np.abs(d_prime), k)  # [K, k] on every word: described, never ablated
    fold_units = np.stack([top_units(np.abs(unit_selectivity(baseline.at_layer[baseline.fold_of != fold],
                                                             baseline.y[baseline.fold_of != fold])[0]), k)
                           for fold in range(len(baseline.fold_directions))])  # [F, K, k] cross-fitted
    rng = np.random.default_rng([baseline.seed, 5])
    random_units = [np.sort(rng.choice(model.d_model, k, replace=False)) for _ in range(draws)]
    random_directions = [rng.standard_normal(model.d_model) for _ in range(direction_draws)]
    scorer = _Scorer(model, baseline)
    arms = [
        _category_arm(scorer, "top_units", f"the category's own {k} most selective units (|d'| at L, "
                      "from the fold's training words)",
                      lambda c, fold: _unit_ablation(baseline, fold_units[fold, c], mode), say),
        _random_arm(scorer, "random_units", f"{k} random units, {draws} draws",
                    lambda draw: _unit_ablation(baseline, random_units[draw], mode), draws, say),
        _category_arm(scorer, "direction", "the category's own class-mean direction at L (from the fold's "
                      "training words)",
                      lambda c, fold: _direction_ablation(baseline, baseline.fold_directions[fold, c], mode), say),
    ]
    if direction_draws:
        arms.append(_random_arm(scorer, "random_direction", f"a random direction, {direction_draws} draws",
                                lambda draw: _direction_ablation(baseline, random_directions[draw], mode),
                                direction_draws, say))
    top, random = arms[0], arms[1]
    beaten = sum(value >= top.mean_delta_auc for value in random.per_draw_mean_delta_auc)
    arrays = {"clean_probabilities": baseline.clean_probabilities, "labels": baseline.y,
              "groups": baseline.groups, "top_units": units, "fold_top_units": fold_units,
              "fold_of": baseline.fold_of, "fold_directions": baseline.fold_directions,
              "testable": baseline.testable, "clean_auc_ci": baseline.clean_auc_ci,
              "random_units": np.stack(random_units),
              "directions": baseline.directions, "d_prime": d_prime, "clean_auc": scorer.clean_auc}
    arrays.update({name: np.stack(values) for name, values in scorer.saved.items()})  # [runs, n(, K)]
    return AblationResult(setup=baseline.describe(), mode=mode, k=k, clean_auc=tuple(scorer.clean_auc.tolist()),
                          arms=tuple(arms), random_units_p=(1 + beaten) / (1 + draws), units=units,
                          arrays_=arrays)
