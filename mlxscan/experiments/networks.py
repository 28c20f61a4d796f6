"""`mlxscan ica` and `mlxscan inhibit`: functional networks of MLP neurons, and what they do for the model.

`run_ica` decomposes a token-level `mlp_act` scan (all layers side by side, as the paper does, or each
layer alone) into networks and follows each into two halves of the texts (analysis/ica.py).

`run_inhibition` switches each network's key neurons off (zero), multiplies them (scale) or adds a value
to them (add) in every layer they live in, and measures perplexity on held-apart texts. The control is
the same number of neurons drawn at random in the same layers (away from the network's own), over
several seeded draws: a network matters if its arm moves perplexity more than its random draws do.
Perplexity is exp(total next-token NLL / predicted tokens); the NLL is computed inside MLX batch by
batch from the final-norm states, so no [texts, seq, vocab] array ever reaches NumPy.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MlxscanError
from .causal import Say, jsonable, quiet

SITE = "mlp_act"  # the MLP neurons: act(gate) * up, the input of down_proj
MODES = ("zero", "scale", "add")
KeyNeurons = dict[int, list[int]]  # {model layer: [units]} of one network


# ---------------------------------------------------------------------------------------------
# ICA over a scan


@dataclass(frozen=True, eq=False)
class LayerFit:
    """One decomposition: of all `layers` side by side, or (per layer) of one layer."""

    layers: tuple[int, ...]
    networks: object  # analysis.ica.FunctionalNetworks
    consistency: object | None  # analysis.ica.Consistency


@dataclass(eq=False)
class IcaOutcome:
    """Everything `mlxscan ica` reports; `key_neurons()` is what `mlxscan inhibit` reads back."""

    model: dict  # the scan's model record (ref, path, sha256, dtype, quantized, ...)
    scan: str
    texts: dict
    layers: list[int]
    width: int
    n_tokens: int
    per_layer: bool
    fits: list[LayerFit]
    settings: dict
    timings: dict = field(default_factory=dict)

    def _named(self):
        """(name, fit, index in fit) of every network, in report order."""
        for fit in self.fits:
            for i in range(fit.networks.n_components):
                yield (f"L{fit.layers[0]}.{i}" if self.per_layer else str(i)), fit, i

    def key_neurons(self) -> dict[str, KeyNeurons]:
        from ..analysis.ica import key_neurons_by_layer

        return {name: key_neurons_by_layer(fit.networks.key_mask[i], fit.layers, self.width)
                for name, fit, i in self._named()}

    def rows(self) -> list[dict]:
        keys = self.key_neurons()
        rows = []
        for name, fit, i in self._named():
            consistency, spread = fit.consistency, keys[name]
            r = None if consistency is None else float(consistency.reference_correlation[i])
            rows.append({
                "network": name, "n_key": int(fit.networks.key_counts[i]),
                "layers": {str(layer): len(units) for layer, units in spread.items()},
                "layer_range": [min(spread), max(spread)] if spread else None,
                "variance_explained": float(fit.networks.variance_explained[i]), "split_half_r": r,
                "split_half_iou": None if consistency is None else float(consistency.reference_iou[i]),
                "above_null": None if r is None else bool(r > consistency.null_threshold),
            })
        return rows

    def to_dict(self) -> dict:
        return jsonable({
            "analysis": "ica", "site": SITE, "model": self.model, "scan": self.scan, "texts": self.texts,
            "layers": self.layers, "width": self.width, "n_tokens": self.n_tokens, "per_layer": self.per_layer,
            **self.settings, "networks": self.rows(), "timings_s": self.timings,
            "fits": [{"layers": list(fit.layers), **fit.networks.to_dict(),
                      "split_half": fit.consistency.to_dict() if fit.consistency else None} for fit in self.fits],
            "notes": "key neurons: |z| of the network's spatial map over neurons > threshold; split_half_r: |r| of the "
                     "network's partners in fits on two disjoint halves of the texts (Hungarian matching); above_null: "
                     "above the 95th percentile of the best |r| after shuffling neurons in one half",
        })

    def arrays(self) -> dict[str, np.ndarray]:
        """Concatenated: maps [k, n_layers * width]; per layer: stacked [n_layers, k, width] (time courses [.., tokens, k])."""
        def stacked(key):
            values = [fit.networks.arrays()[key] for fit in self.fits]
            return values[0] if not self.per_layer else np.stack(values)

        out = {key: stacked(key) for key in ("maps", "z_maps", "key_mask", "time_courses", "variance_explained")}
        out["layers"] = np.asarray(self.layers)
        out["key_per_layer"] = self.key_per_layer()
        if all(fit.consistency is not None for fit in self.fits):
            for key in self.fits[0].consistency.arrays():
                values = [fit.consistency.arrays()[key] for fit in self.fits]
                out[key] = values[0] if not self.per_layer else np.stack(values)
        return out

    def key_per_layer(self) -> np.ndarray:
        """[n_networks, n_layers] key neurons of each network in each recorded layer."""
        keys = self.key_neurons()
        return np.array([[len(keys[name].get(layer, ())) for layer in self.layers] for name in keys], np.int64)


def _ica_pieces(scan, layers: Sequence[int] | None, per_layer: bool) -> tuple[list[int], list]:
    """(layers, [(layers of a fit, mlp_act [n_tokens, n_layers or 1 x width])]): memory maps, copied only for a subset."""
    if scan.pool != "all":
        raise MlxscanError(f"{scan.folder} is pooled ({scan.pool}); ICA needs every token: scan with --pool all")
    if SITE not in scan.sites:
        raise MlxscanError(f"{scan.folder} has no {SITE} (it has {', '.join(scan.sites)}); scan with --sites {SITE}")
    layers = list(scan.layers) if layers is None else sorted(set(layers))
    missing = [layer for layer in layers if layer not in scan.layers]
    if missing:
        raise MlxscanError(f"--layers {missing} were not recorded; this scan has layers {scan.layers}")
    signals, positions = scan[SITE], [scan.layers.index(layer) for layer in layers]
    if per_layer:
        return layers, [((layer,), signals[:, p]) for p, layer in zip(positions, layers)]
    return layers, [(tuple(layers), signals if layers == scan.layers else signals[:, positions])]


def run_ica(*, scan=None, model_ref=None, texts_path: Path | None = None, components: int = 20,
            per_layer: bool = False, layers: Sequence[int] | None = None, threshold: float = 3.6,
            restarts: int = 5, seed: int = 0, split_half: bool = True, permutations: int = 20,
            keep_first_token: bool = False, surrogates: int = 3, say: Say = quiet, scan_progress=None) -> IcaOutcome:
    """Decompose a token-level mlp_act scan (or a cached scan of `texts_path` made now) into networks."""
    from ..analysis.ica import functional_networks, split_half_consistency, token_rows

    if split_half and surrogates < 1:
        raise MlxscanError("--surrogates must be at least 1: the split-half claim is judged against them")
    timings = {}
    if scan is None:
        from ..capture.scan import ScanSettings, cached_scan
        from ..models import load
        from ..stimuli import load_texts

        texts, model = load_texts(texts_path), load(model_ref)
        say(f"scanning {model.ref} on {len(texts)} texts ({SITE}, every token; cached)")
        started = time.perf_counter()
        scan = cached_scan(model, texts, ScanSettings(sites=(SITE,), layers=layers, pool="all"), progress=scan_progress)
        timings["scan"] = time.perf_counter() - started
    layers, pieces = _ica_pieces(scan, layers, per_layer)
    rows = token_rows(scan.offsets, skip_first=not keep_first_token)  # position 0 left out by default
    fits, timings["ica"], timings["split_half"] = [], 0.0, 0.0 if split_half else None
    for fit_layers, piece in pieces:
        say(f"ICA of {piece.shape[0]} tokens x {np.prod(piece.shape[1:])} neurons (layers "
            f"{fit_layers[0]}..{fit_layers[-1]}), {components} components")
        started = time.perf_counter()
        networks = functional_networks(piece, components, threshold=threshold, restarts=restarts, seed=seed,
                                       rows=rows)
        timings["ica"] += time.perf_counter() - started
        consistency = None
        if split_half:
            started = time.perf_counter()
            consistency = split_half_consistency(piece, scan.offsets, components, threshold=threshold,
                                                 restarts=restarts, seed=seed, permutations=permutations,
                                                 reference=networks, skip_first=not keep_first_token,
                                                 surrogates=surrogates, second_split=True)
            timings["split_half"] += time.perf_counter() - started
        fits.append(LayerFit(fit_layers, networks, consistency))
    m = scan.manifest
    return IcaOutcome(
        model=m["model"], scan=str(scan.folder), texts={k: m["stimuli"][k] for k in ("path", "sha256", "n")},
        layers=layers, width=scan[SITE].shape[2], n_tokens=len(scan[SITE]) if rows is None else len(rows),
        per_layer=per_layer, fits=fits,
        settings={"components": components, "threshold": threshold, "restarts": restarts, "seed": seed,
                  "split_half": split_half, "permutations": permutations if split_half else None,
                  "first_token": "kept" if keep_first_token else "left out (position 0, the attention sink)",
                  "surrogates": surrogates if split_half else None},
        timings=timings)


# ---------------------------------------------------------------------------------------------
# Key-neuron files


def read_key_neurons(path: Path) -> dict[str, KeyNeurons]:
    """key_neurons.json {network: {layer: [units]}} (a folder holding it, or the file itself), checked."""
    path = Path(path)
    path = path / "key_neurons.json" if path.is_dir() else path
    if not path.exists():
        raise MlxscanError(f"{path} does not exist; give the --out folder of `mlxscan ica` or its key_neurons.json")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MlxscanError(f"{path} is not JSON ({error}); give the key_neurons.json `mlxscan ica` wrote") from error
    networks: dict[str, KeyNeurons] = {}
    for name, layers in (record.items() if isinstance(record, dict) else [(None, None)]):
        try:
            networks[str(name)] = {int(layer): [int(unit) for unit in units] for layer, units in layers.items()}
        except (AttributeError, TypeError, ValueError) as error:
            raise MlxscanError(f"{path}: each network must be {{layer: [units]}}; network {name!r} is not") from error
    if not networks:
        raise MlxscanError(f"{path} holds no networks")
    return networks


def model_of_record(record: dict):
    """The model an ICA was made with, as it was then; refuses if its weights have changed since."""
    from ..models import load

    ref = None if record["ref"].startswith("bundled:") else record["path"]
    model = load(ref, dtype=record["dtype"], dequantize=not record["quantized"])
    if model.weights_sha256() != record["sha256"]:
        raise MlxscanError(f"the model {record['path']} has changed since the ICA; rerun it, or pass --model")
    return model


# ---------------------------------------------------------------------------------------------
# Perplexity under interventions


def text_nll(model, token_lists: Sequence[Sequence[int]], interventions: Sequence = (), *,
             batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, float]:
    """([n] summed next-token NLL of each text in nats, [n] tokens predicted, mean relative change made)."""
    import mlx.core as mx

    from ..capture.forward import run_tokens

    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    nll, changes = np.zeros(len(token_lists)), []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        lists = [token_lists[i] for i in batch]
        recording = run_tokens(model, lists, sites=("final_norm",), interventions=interventions)
        lengths = np.array([len(tokens) for tokens in lists])
        targets = np.zeros((len(lists), lengths.max() - 1), np.int32)  # [batch, seq - 1] the next token
        for row, tokens in enumerate(lists):
            targets[row, : len(tokens) - 1] = tokens[1:]
        logits = model.lm_head(mx.array(recording["final_norm"][:, :-1])).astype(mx.float32)  # [batch, seq-1, vocab]
        picked = mx.take_along_axis(logits, mx.array(targets)[..., None], axis=-1)[..., 0]
        valid = mx.array(np.arange(targets.shape[1])[None, :] < (lengths - 1)[:, None])
        per_text = mx.sum(mx.where(valid, mx.logsumexp(logits, axis=-1) - picked, 0.0), axis=1)
        nll[batch] = np.array(per_text)
        changes += [effect.relative_change for effect in recording.effects]
    counts = np.array([len(tokens) - 1 for tokens in token_lists], np.int64)
    return nll, counts, float(np.mean(changes)) if changes else 0.0


def perplexity(nll: np.ndarray, counts: np.ndarray) -> float:
    return float(math.exp(np.sum(nll) / np.sum(counts)))


def network_interventions(network: KeyNeurons, mode: str, width: int, *, factor: float = 2.0,
                          value: float = 1.0) -> list:
    """One intervention per layer the network lives in: zero its units, multiply them, or add to them."""
    from ..capture.interventions import Ablate, Add, Scale

    out = []
    for layer, units in sorted(network.items()):
        if mode == "zero":
            out.append(Ablate(SITE, layer, units=units, mode="zero"))
        elif mode == "scale":
            out.append(Scale(SITE, layer, factor=factor, units=units))
        elif mode == "add":
            vector = np.zeros(width, np.float32)
            vector[units] = value
            out.append(Add(SITE, layer, vector=vector, scale=1.0))
        else:
            raise MlxscanError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    return out


def random_counterpart(network: KeyNeurons, width: int, rng: np.random.Generator) -> KeyNeurons:
    """As many random units in each of the network's layers, drawn away from the network's own where possible."""
    drawn = {}
    for layer, units in network.items():
        pool = np.setdiff1d(np.arange(width), units)
        pool = pool if len(pool) >= len(units) else np.arange(width)
        drawn[layer] = np.sort(rng.choice(pool, len(units), replace=False)).tolist()
    return drawn


# ---------------------------------------------------------------------------------------------
# Inhibition and amplification


@dataclass(frozen=True)
class NetworkArm:
    """One network under the intervention, and its random draws of the same size in the same layers."""

    network: str
    n_neurons: int
    layers: tuple[int, ...]
    perplexity: float
    random_perplexity: tuple[float, ...]  # one per draw
    relative_change: float  # mean ||after - before|| / ||before|| at the touched mlp_act layers
    random_relative_change: float
    readout_accuracy: float | None = None
    random_readout_accuracy: tuple[float, ...] = ()
    random_key_neurons: tuple[KeyNeurons, ...] = ()  # the units of each draw, to repeat the control elsewhere

    def summary(self, baseline: float, baseline_readout: float | None) -> dict:
        """Perplexity against baseline and against the random draws; p: rank of |Δ log ppl| among the draws."""
        randoms = np.array(self.random_perplexity)
        shift, random_shift = abs(math.log(self.perplexity / baseline)), np.abs(np.log(randoms / baseline))
        delta, random_delta = self.perplexity - baseline, float(np.mean(randoms) - baseline)
        row = {"network": self.network, "n_neurons": self.n_neurons, "layers": list(self.layers),
               "perplexity": self.perplexity, "random_mean": float(np.mean(randoms)),
               "random_sd": float(np.std(randoms, ddof=1)) if len(randoms) > 1 else 0.0,
               "random_perplexity": list(self.random_perplexity), "delta": delta, "random_delta": random_delta,
               "ratio": delta / random_delta if random_delta != 0 else math.inf,
               "p_random": (1 + int(np.sum(random_shift >= shift))) / (1 + len(randoms)),
               "relative_change": self.relative_change, "random_relative_change": self.random_relative_change}
        if self.readout_accuracy is not None:
            row.update(readout_accuracy=self.readout_accuracy,
                       random_readout_mean=float(np.mean(self.random_readout_accuracy)),
                       readout_delta=self.readout_accuracy - baseline_readout)
        return row


@dataclass(eq=False)
class InhibitionResult:
    """`run_inhibition`'s answer: baseline, one arm per network, and the per-text NLL behind every number."""

    model: str
    heldout: dict
    mode: str
    factor: float | None
    value: float | None
    draws: int
    seed: int
    baseline_perplexity: float
    arms: list[NetworkArm]
    baseline_readout: float | None = None
    readout: dict | None = None
    timings: dict = field(default_factory=dict)
    arrays_: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return jsonable({
            "experiment": "inhibit", "site": SITE, "model": self.model, "heldout": self.heldout, "mode": self.mode,
            "factor": self.factor, "value": self.value, "random_draws": self.draws, "seed": self.seed,
            "baseline_perplexity": self.baseline_perplexity, "baseline_readout_accuracy": self.baseline_readout,
            "readout": self.readout,
            "networks": [arm.summary(self.baseline_perplexity, self.baseline_readout) for arm in self.arms],
            "timings_s": self.timings,
            "random_key_neurons": {arm.network: list(arm.random_key_neurons) for arm in self.arms},
            "control": "the same number of random neurons in each of the network's layers (none of its own), "
                       "one set per draw; p_random = (1 + draws whose |log ppl change| >= the network's) / (1 + draws)",
        })

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self.arrays_)


def _check_inhibition(model, networks: dict[str, KeyNeurons], mode: str, factor: float, value: float,
                      draws: int) -> None:
    if mode not in MODES:
        raise MlxscanError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if draws < 2:
        raise MlxscanError(f"--random-draws {draws}: the control needs at least 2 draws for a spread")
    if not (math.isfinite(factor) and math.isfinite(value)):
        raise MlxscanError("--factor and --value must be finite numbers")
    for name, network in networks.items():
        if not network or not any(network.values()):
            raise MlxscanError(f"network {name} has no key neurons; lower --threshold in `mlxscan ica` or leave it out")
        for layer, units in network.items():
            if not 0 <= layer < model.n_layers or not all(0 <= unit < model.d_mlp for unit in units):
                raise MlxscanError(f"network {name}: layer {layer} or its units do not exist in {model.ref} "
                                   f"({model.n_layers} layers of {model.d_mlp} neurons); use the model of the ICA")


def run_inhibition(model, networks: dict[str, KeyNeurons], texts: Sequence[str], *, mode: str = "zero",
                   factor: float = 2.0, value: float = 1.0, draws: int = 5, seed: int = 0, batch_size: int = 8,
                   readout=None, say: Say = quiet) -> InhibitionResult:
    """Perplexity of `texts` clean, with each network's key neurons changed, and with `draws` random sets.

    `readout` (a causal.Baseline with the last layer as readout) adds category-probe accuracy per arm.
    """
    _check_inhibition(model, networks, mode, factor, value, draws)
    token_lists = model.token_lists(list(texts))
    if sum(len(tokens) - 1 for tokens in token_lists) < 1:
        raise MlxscanError("the held-out texts have no token to predict; give texts of two tokens or more")
    started = time.perf_counter()
    say(f"baseline perplexity of {len(texts)} held-out texts")
    clean_nll, counts, _ = text_nll(model, token_lists, batch_size=batch_size)
    baseline = perplexity(clean_nll, counts)
    accuracy = _readout_accuracy(model, readout)
    arms, nll_network, nll_random = [], [], []
    for number, (name, network) in enumerate(networks.items()):
        say(f"network {name} ({number + 1}/{len(networks)}): {sum(map(len, network.values()))} neurons, "
            f"{draws} random draws")
        arm = lambda units: network_interventions(units, mode, model.d_mlp, factor=factor, value=value)  # noqa: E731
        nll, _, change = text_nll(model, token_lists, arm(network), batch_size=batch_size)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 31])  # by name: the same draws whatever else runs
        controls = [random_counterpart(network, model.d_mlp, rng) for _ in range(draws)]
        random_runs = [text_nll(model, token_lists, arm(control), batch_size=batch_size) for control in controls]
        nll_network.append(nll), nll_random.append([run[0] for run in random_runs])
        arms.append(NetworkArm(
            network=name, n_neurons=sum(map(len, network.values())), layers=tuple(sorted(network)),
            perplexity=perplexity(nll, counts), random_perplexity=tuple(perplexity(run[0], counts) for run in random_runs),
            relative_change=change, random_relative_change=float(np.mean([run[2] for run in random_runs])),
            readout_accuracy=accuracy(arm(network)),
            random_readout_accuracy=tuple(a for a in (accuracy(arm(c)) for c in controls) if a is not None),
            random_key_neurons=tuple(controls)))
    return InhibitionResult(
        model=model.ref, heldout={"n_texts": len(texts), "n_predicted_tokens": int(counts.sum())}, mode=mode,
        factor=factor if mode == "scale" else None, value=value if mode == "add" else None, draws=draws, seed=seed,
        baseline_perplexity=baseline, arms=arms, baseline_readout=accuracy(None),
        readout=None if readout is None else readout.describe(),
        timings={"total": time.perf_counter() - started, "perplexity_passes": 1 + len(networks) * (1 + draws),
                 "readout_passes": 0 if readout is None else len(networks) * (1 + draws)},
        arrays_={"baseline_nll": clean_nll, "predicted_tokens": counts, "network_nll": np.array(nll_network),
                 "random_nll": np.array(nll_random)})


def _readout_accuracy(model, baseline):
    """interventions -> category-probe accuracy at the readout layer (None: clean); a no-op without a baseline."""
    if baseline is None:
        return lambda interventions: None

    def accuracy(interventions):
        from .causal import run_all

        readout = baseline.at_readout if interventions is None else run_all(model, baseline, interventions).readout
        return float(np.mean(baseline.probe.probabilities(readout).argmax(axis=1) == baseline.y))
    return accuracy


def readout_baseline(model, stimuli_path: Path, *, per_category: int = 3, frames: int = 4, seed: int = 0,
                     say: Say = quiet):
    """The category readout of `run_inhibition`: a word-grouped probe on the last layer's resid_post of a subsample."""
    from ..stimuli import load_stimuli
    from .causal import prepare_baseline

    return prepare_baseline(model, load_stimuli(stimuli_path), layer=0, readout_layer=model.n_layers - 1,
                            per_category=per_category, frames=frames, seed=seed, say=say)
