"""`mlxscan steer`: adding a concept direction to the residual, and what it does downstream.

Steering adds α · typical_norm · u_c to resid_post at every token position, u_c the category's unit
class-mean direction at L and typical_norm the median norm of the clean word-pooled residual at L (so
α = 1 adds a vector as long as a typical residual). Its effect is the concept shift at the readout
layer R: how far a stimulus moved along the category's readout direction, in units of the category's
clean separation (causal.Baseline.concept_shift), and the readout probe's change of P(category).

Cross-fitted: a stimulus is steered by, and its shift measured with, the direction, readout direction
and separation of its fold's training words (causal.Baseline). The shifts claim's control is the same
run with random directions of the same norm (`random_draws` draws); a target category whose held-out
clean readout does not beat chance is untestable (there is no concept to move toward).

Only stimuli NOT of the category are steered toward it. Each word is assigned one other category as
its target (balanced over categories, seeded), so one model run steers every category at once:
  additivity       α at N consecutive layers from L against N·α at L, N = 1..max_layers; the ratio
                   of the two mean shifts is 1 when the residual stream adds the injections linearly;
  dose-response    the mean shift for each α of a grid (α = 0 is the clean run, shift 0);
  steerability     per category, the mean shift at one α, correlated across categories with the
                   category's encoding dimensionality at L (participation ratio of its within-class
                   covariance; with ten categories the interval is wide, and says so).
`generate_steered` shows what the direction does to text: greedy continuations, plain and steered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MlxscanError
from .causal import (SITE, Baseline, Say, check_finite, correlation_with_ci, interval, jsonable, mean_with_ci,
                     participation_ratio, quiet, run_groups, weighted_means)

DEFAULT_ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)
DEFAULT_ADDITIVITY_ALPHA = 0.125  # N = 8 then adds one typical norm in all: large, not absurd
DEFAULT_STEER_ALPHA = 0.5
DEFAULT_RANDOM_DRAWS = 10  # random directions of the same norm at the steering α: the shifts claim's control
DEFAULT_GENERATE_ALPHAS = DEFAULT_ALPHAS  # on SmolLM2-135M text holds to 0.5 and breaks at 1


@dataclass(frozen=True)
class AdditivityRow:
    n_layers: int
    spread_shift: float  # α at layers L .. L+N-1
    single_shift: float  # N·α at L
    ratio: float  # spread / single
    ratio_ci: tuple[float, float]


@dataclass(frozen=True)
class DoseRow:
    alpha: float
    shift: float
    shift_ci: tuple[float, float]
    probability_change: float
    probability_change_ci: tuple[float, float]
    category_shift: tuple[float, ...]  # [n_classes] mean shift of the stimuli steered toward each


@dataclass(eq=False)
class SteeringResult:
    setup: dict
    additivity_alpha: float
    additivity: tuple[AdditivityRow, ...]
    doses: tuple[DoseRow, ...]
    monotonic: bool  # does the mean shift grow with α over the grid (from 0)?
    steer_alpha: float
    steerability: tuple[float, ...]  # [n_classes] mean shift at steer_alpha
    steerability_ci: tuple[tuple[float, float], ...]
    dimensionality: tuple[float, ...]  # [n_classes] participation ratio at L
    correlation: dict
    arrays_: dict

    def to_dict(self) -> dict:
        classes = self.setup["classes"]
        return jsonable({
            "experiment": "steering", **self.setup,
            "effect": "concept shift at the readout layer: movement along the target category's readout direction "
                      "in units of its clean separation, over stimuli not of that category",
            "alpha_unit": "typical (median) norm of the clean residual at the layer",
            "additivity_alpha": self.additivity_alpha, "additivity": [row.__dict__ for row in self.additivity],
            "dose_response": [row.__dict__ for row in self.doses], "monotonic": self.monotonic,
            "steer_alpha": self.steer_alpha,
            "steerability": {c: {"shift": s, "ci": ci, "dimensionality": d}
                             for c, s, ci, d in zip(classes, self.steerability, self.steerability_ci,
                                                    self.dimensionality)},
            "dimensionality": "participation ratio of the category's within-class covariance at the layer, "
                              "each dimension z-scored over all stimuli",
            "correlation": self.correlation,
            "control": "alpha = 0 (the clean run); additivity compares two ways of adding the same total",
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays_)


def steering_targets(y, groups, n_classes: int, seed: int) -> np.ndarray:
    """[n] the category each stimulus is steered toward: never its own, one per word, balanced.

    Categories sit on a seeded cycle; a category's j-th word targets the (j+1)-th category after it,
    so with up to n_classes - 1 words per category every category is the target of equally many words.
    """
    if n_classes < 2:
        raise MlxscanError("steering needs at least two categories")
    rng = np.random.default_rng([seed, 9])
    cycle = rng.permutation(n_classes)
    place = np.argsort(cycle)
    y, groups = np.asarray(y), np.asarray(groups)
    targets = np.empty(len(y), np.int64)
    for c in range(n_classes):
        words = rng.permutation(np.unique(groups[y == c]))
        for j, word in enumerate(words):
            targets[(groups == word) & (y == c)] = cycle[(place[c] + 1 + j % (n_classes - 1)) % n_classes]
    return targets


def encoding_dimensionality(X, y, n_classes: int) -> list[float]:
    """Per category: participation ratio of its stimuli at L, in standardized coordinates.

    Each dimension is z-scored over all stimuli first (as the readout probe does): the residual has a
    few dimensions with tens of times the median variance (up to ~60x in SmolLM2-135M at layer 15),
    and in raw coordinates they would dominate every category's ratio.
    """
    X = np.asarray(X, np.float64)
    spread = X.std(axis=0)
    z = (X - X.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return [participation_ratio(z[np.asarray(y) == c]) for c in range(n_classes)]


def _steer(model, baseline: Baseline, targets: np.ndarray, layers, alpha: float, vectors=None):
    """Every stimulus steered toward its target with α (in typical norms) at each of `layers`, by its fold's
    direction (cross-fitted) or, with `vectors` [n_classes, d_model], by those (the random control)."""
    from ..capture.interventions import Add

    scale = alpha * baseline.typical_norm

    def add(t, fold):
        vector = baseline.fold_directions[fold, t] if vectors is None else vectors[t]
        return [Add(SITE, tuple(layers), vector=vector, scale=scale)]

    groups = [group for t in range(len(baseline.classes))
              for group in baseline.by_fold(np.flatnonzero(targets == t), lambda fold, t=t: add(t, fold))]
    return run_groups(model, baseline, groups)


def random_unit_vectors(rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    """[count, width] directions drawn uniformly on the sphere."""
    vectors = rng.standard_normal((count, width))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _random_arm(model, baseline: Baseline, targets, alpha: float, draws: int, say: Say) -> np.ndarray:
    """[draws, n] concept shift toward each stimulus's target when a random direction of the same norm is
    added instead of the target's own (one random direction per target category and draw)."""
    rng = np.random.default_rng([baseline.seed, 23])
    width = baseline.at_layer.shape[1]
    shifts = []
    for draw in range(draws):
        say(f"random directions: draw {draw + 1}/{draws}")
        vectors = random_unit_vectors(rng, len(baseline.classes), width)
        readout = _steer(model, baseline, targets, [baseline.layer], alpha, vectors).readout
        shifts.append(baseline.concept_shift(readout, targets))
    return np.stack(shifts)


def _ratio_ci(spread, single, weights) -> tuple[float, float]:
    return interval(weighted_means(spread, weights) / weighted_means(single, weights))


def _additivity(model, baseline, targets, alpha, max_layers, say: Say):
    rows, arrays = [], {}
    for n in range(1, max_layers + 1):
        say(f"additivity: N = {n}/{max_layers}")
        spread = baseline.concept_shift(_steer(model, baseline, targets, range(baseline.layer, baseline.layer + n),
                                               alpha).readout, targets)
        if n == 1:
            single = spread  # one layer at α: both arms are the same run
        else:
            single = baseline.concept_shift(_steer(model, baseline, targets, [baseline.layer], n * alpha).readout,
                                            targets)
        arrays[f"additivity_spread_{n}"], arrays[f"additivity_single_{n}"] = spread, single
        rows.append(AdditivityRow(n_layers=n, spread_shift=float(spread.mean()), single_shift=float(single.mean()),
                                  ratio=float(spread.mean() / single.mean()),
                                  ratio_ci=_ratio_ci(spread, single, baseline.weights)))
    return rows, arrays


def _category_means(values, targets, weights, n_classes):
    """Per target category: mean of values [n] and its word-bootstrap interval."""
    means, cis = [], []
    for c in range(n_classes):
        mask = (targets == c).astype(np.float64)
        means.append(float(values[mask > 0].mean()) if mask.any() else float("nan"))
        masked = weights * mask
        with np.errstate(invalid="ignore", divide="ignore"):
            cis.append(interval(masked @ values / masked.sum(axis=1)))
    return means, cis


def _doses(model, baseline, targets, alphas, say: Say):
    rows, shifts = [], {}
    n_classes = len(baseline.classes)
    for number, alpha in enumerate(alphas, start=1):
        say(f"dose-response: α = {alpha:g} ({number}/{len(alphas)})")
        readout = _steer(model, baseline, targets, [baseline.layer], alpha).readout
        shift = baseline.concept_shift(readout, targets)
        change = baseline.probability_change(readout, targets)
        shifts[alpha] = shift
        mean_shift, shift_ci = mean_with_ci(shift, baseline.weights)
        mean_change, change_ci = mean_with_ci(change, baseline.weights)
        category_shift, _ = _category_means(shift, targets, baseline.weights, n_classes)
        rows.append(DoseRow(alpha=alpha, shift=mean_shift, shift_ci=shift_ci, probability_change=mean_change,
                            probability_change_ci=change_ci, category_shift=tuple(category_shift)))
    return rows, shifts


def check_steering(alphas, additivity_alpha: float, steer_alpha: float, max_layers: int) -> tuple[float, ...]:
    """The validated α grid, sorted; an MlxscanError for a non-finite α or max_layers below 1."""
    alphas = tuple(sorted(set(check_finite(alphas, "--alphas"))))
    check_finite([additivity_alpha], "--additivity-alpha")
    check_finite([steer_alpha], "--steer-alpha")
    if max_layers < 1:
        raise MlxscanError(f"--max-layers {max_layers}: inject at one layer at least")
    return alphas


def run_steering(model, baseline: Baseline, *, alphas=DEFAULT_ALPHAS, additivity_alpha: float = DEFAULT_ADDITIVITY_ALPHA,
                 steer_alpha: float = DEFAULT_STEER_ALPHA, max_layers: int = 8, random_draws: int = DEFAULT_RANDOM_DRAWS,
                 say: Say = quiet) -> SteeringResult:
    """Additivity, dose-response and steerability against dimensionality (see the module docstring)."""
    alphas = check_steering(alphas, additivity_alpha, steer_alpha, max_layers)
    if random_draws < 2:
        raise MlxscanError(f"--random-draws {random_draws}: the random-direction control needs at least 2 draws "
                           "to have a spread")
    # An injection after the readout layer cannot reach it, so N stops there.
    max_layers = min(max_layers, baseline.readout_layer - baseline.layer + 1)
    n_classes = len(baseline.classes)
    targets = steering_targets(baseline.y, baseline.groups, n_classes, baseline.seed)
    additivity, arrays = _additivity(model, baseline, targets, additivity_alpha, max_layers, say)
    doses, shifts = _doses(model, baseline, targets, tuple(sorted(set(alphas) | {steer_alpha})), say)
    grid = [row for row in doses if row.alpha in alphas]
    curve = dict(sorted({0.0: 0.0, **{row.alpha: row.shift for row in grid}}.items()))  # α = 0: the clean run
    steerability, steerability_ci = _category_means(shifts[steer_alpha], targets, baseline.weights, n_classes)
    dimensionality = encoding_dimensionality(baseline.at_layer, baseline.y, n_classes)
    arrays["random_shift"] = _random_arm(model, baseline, targets, steer_alpha, random_draws, say)  # [draws, n]
    arrays.update({"testable": baseline.testable, "clean_auc_ci": baseline.clean_auc_ci, "fold_of": baseline.fold_of})
    arrays.update({"targets": targets, "labels": baseline.y, "alphas": np.array([row.alpha for row in doses]),
                   "shift": np.stack([shifts[row.alpha] for row in doses]), "steerability": np.array(steerability),
                   "dimensionality": np.array(dimensionality), "directions": baseline.directions,
                   "readout_directions": baseline.readout_directions, "separation": baseline.separation})
    return SteeringResult(
        setup=baseline.describe(), additivity_alpha=additivity_alpha, additivity=tuple(additivity),
        doses=tuple(grid), monotonic=bool(np.all(np.diff(list(curve.values())) > 0)), steer_alpha=steer_alpha,
        steerability=tuple(steerability), steerability_ci=tuple(steerability_ci),
        dimensionality=tuple(dimensionality),
        correlation=correlation_with_ci(dimensionality, steerability, baseline.seed), arrays_=arrays)


# ---------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class Continuation:
    alpha: float  # 0: the plain model
    text: str
    tokens: tuple[int, ...]
    plain_nll: float  # mean -log p of the continuation under the plain model: grows as the text breaks down
    distinct: float  # distinct tokens / tokens: falls when the text starts repeating itself


@dataclass(eq=False)
class GenerationResult:
    model: str
    prompt: str
    category: str
    layer: int
    typical_norm: float
    max_tokens: int
    continuations: tuple[Continuation, ...]

    def to_dict(self) -> dict:
        return jsonable({"experiment": "steering-generation", "model": self.model, "prompt": self.prompt,
                         "category": self.category, "site": SITE, "layer": self.layer,
                         "typical_norm": self.typical_norm, "max_tokens": self.max_tokens,
                         "decoding": "greedy; steering added at every position, prompt included",
                         "control": "alpha = 0 (the plain model)",
                         "continuations": [c.__dict__ for c in self.continuations]})

    def arrays(self) -> dict[str, np.ndarray]:
        return {"alphas": np.array([c.alpha for c in self.continuations]),
                "plain_nll": np.array([c.plain_nll for c in self.continuations])}


def _next_token(model, tokens: list[int], interventions) -> int:
    import mlx.core as mx

    from ..capture.forward import run_tokens

    final = run_tokens(model, [tokens], sites=("final_norm",), interventions=interventions)["final_norm"]
    return int(np.argmax(np.array(model.lm_head(mx.array(final[:, -1])))[0]))


def _greedy(model, prompt_ids: list[int], interventions, max_tokens: int) -> list[int]:
    """Greedy decoding by rerunning the whole sequence each step (short continuations: no KV cache needed)."""
    tokens, eos = list(prompt_ids), model.tokenizer.eos_token_id
    for _ in range(max_tokens):
        token = _next_token(model, tokens, interventions)
        if token == eos:
            break
        tokens.append(token)
    return tokens[len(prompt_ids):]


def _plain_nll(model, prompt_ids: list[int], continuation: list[int]) -> float:
    import mlx.core as mx

    from ..capture.forward import run_tokens
    from .runs import next_token_log_probs

    if not continuation:
        return float("nan")
    sequence = list(prompt_ids) + list(continuation)
    final = run_tokens(model, [sequence], sites=("final_norm",))["final_norm"][0]  # [seq, d_model]
    log_probs = next_token_log_probs(model, final[len(prompt_ids) - 1:-1])  # predicts each continuation token
    return float(-np.mean(log_probs[np.arange(len(continuation)), continuation]))


def generate_steered(model, prompt: str, direction: np.ndarray, *, layer: int, typical_norm: float,
                     alphas=DEFAULT_GENERATE_ALPHAS, max_tokens: int = 20, category: str = "",
                     say: Say = quiet) -> GenerationResult:
    """Greedy continuations of `prompt`, plain and with α · typical_norm · direction added at `layer`."""
    from ..capture.interventions import Add

    if not prompt.strip():
        raise MlxscanError("--generate needs a prompt with some text")
    if not 1 <= max_tokens <= 200:
        raise MlxscanError(f"--max-tokens {max_tokens}: choose 1..200")
    alphas = tuple(sorted(set(check_finite(alphas, "--alphas")) - {0.0}))
    prompt_ids = model.tokenize(prompt)
    unit = np.asarray(direction, np.float64) / np.linalg.norm(direction)
    continuations = []
    for alpha in (0.0, *alphas):
        say(f"generating with α = {alpha:g}")
        interventions = [Add(SITE, layer, vector=unit, scale=alpha * typical_norm)] if alpha else []
        tokens = _greedy(model, prompt_ids, interventions, max_tokens)
        continuations.append(Continuation(
            alpha=alpha, text=model.tokenizer.decode(tokens), tokens=tuple(tokens),
            plain_nll=_plain_nll(model, prompt_ids, tokens),
            distinct=len(set(tokens)) / len(tokens) if tokens else float("nan")))
    return GenerationResult(model=model.ref, prompt=prompt, category=category, layer=layer,
                            typical_norm=typical_norm, max_tokens=max_tokens, continuations=tuple(continuations))
