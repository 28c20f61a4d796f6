"""`mlxscan sae train` and `mlxscan sae eval`: an SAE on a token-level scan, and what it is worth.

Training reads one site at one layer of a token-level scan (`--pool all`; a cached scan of a text corpus
is made when none is given). Evaluation measures, on held-out text: reconstruction (FVU, L0, dead and
dense features) and the language-modelling loss when the SAE's reconstruction replaces the site in the
forward pass (against the clean run and the site zeroed: "loss recovered"). On the category stimuli,
pooled over each target word's tokens: localization (features against neurons) and JS separability.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import MlxscanError
from ..experiments.causal import Say, jsonable, quiet
from .model import SparseAutoencoder
from .train import TrainResult, TrainSettings, train_sae

DEFAULT_SITE, DEFAULT_LAYER = "resid_post", 15


def check_place(model, site: str, layer: int, d_in: int | None = None) -> None:
    """The site is a per-layer vector site of this model, the layer exists, and (if given) d_in is its width."""
    from ..capture.sites import LAYER_SITES, site_width

    if site not in LAYER_SITES:
        raise MlxscanError(f"--site {site!r}: an SAE reads a per-layer site; choose from {', '.join(LAYER_SITES)}")
    if layer is None or not 0 <= layer < model.n_layers:
        raise MlxscanError(f"--layer {layer}: {model.ref} has layers 0..{model.n_layers - 1}")
    if d_in is not None and site_width(model, site) != d_in:
        raise MlxscanError(f"the SAE reads {d_in} values but {site} of {model.ref} is {site_width(model, site)} "
                           "wide; give the SAE's model (--model) and site (--site)")


def token_activations(scan, site: str, layer: int, skip_first: int = 1) -> np.ndarray:
    """[n_tokens, width] float32 of one site and layer from a token-level scan, each text's first
    `skip_first` positions left out."""
    if scan.pool != "all":
        raise MlxscanError(f"{scan.folder} is pooled ({scan.pool}); an SAE trains on every token: scan with --pool all")
    if site not in scan.sites:
        raise MlxscanError(f"{scan.folder} has no {site} (it has {', '.join(scan.sites)}); pass --site or scan it")
    offsets = scan.offsets
    rows = np.concatenate([np.arange(start + skip_first, end) for start, end in zip(offsets[:-1], offsets[1:])])
    if rows.size == 0:
        raise MlxscanError(f"no token of {scan.folder} lies past the first {skip_first} of its text; lower --skip-first")
    return np.asarray(scan.layer(site, layer)[rows], np.float32)


def corpus_scan(model, texts_path: Path, site: str, layer: int, progress=None):
    """A cached token-level scan of a text file, recording only `site` at `layer`."""
    from ..capture.scan import ScanSettings, cached_scan
    from ..stimuli import load_texts

    return cached_scan(model, load_texts(texts_path), ScanSettings(sites=(site,), layers=(layer,), pool="all"),
                       progress=progress)


@dataclass(eq=False)
class TrainOutcome:
    result: TrainResult
    site: str
    layer: int
    model: dict
    scan: str
    texts: dict
    final: object  # analysis.sae_eval.ReconstructionReport on the training tokens

    def to_dict(self) -> dict:
        return jsonable({"analysis": "sae-train", "site": self.site, "layer": self.layer, "model": self.model,
                         "scan": self.scan, "texts": self.texts, "d_in": self.result.sae.config.d_in,
                         "d_sae": self.result.sae.config.d_sae, **self.result.summary(),
                         "training_tokens": self.final.to_dict(),
                         "notes": "training_tokens: FVU, L0 and dead features of the saved SAE over every training "
                                  "token; last_logged: the last batch during training. Held-out numbers: sae eval"})

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"history_{name}": values for name, values in self.result.history.items()},
                "feature_frequency": self.final.frequencies}


def run_train(*, scan=None, model=None, texts_path: Path | None = None, site: str = DEFAULT_SITE,
              layer: int = DEFAULT_LAYER, settings: TrainSettings = TrainSettings(), skip_first: int = 1,
              say: Say = quiet, scan_progress=None, progress=None) -> TrainOutcome:
    """Train on `scan` (token level), or on a cached scan of `texts_path` through `model`."""
    from ..analysis.sae_eval import ReconstructionStats

    if scan is None:
        check_place(model, site, layer)
        say(f"scanning {model.ref} on {texts_path} ({site} at layer {layer}, every token; cached)")
        scan = corpus_scan(model, texts_path, site, layer, scan_progress)
    activations = token_activations(scan, site, layer, skip_first)
    settings.check(len(activations), activations.shape[1])
    say(f"training a {settings.architecture} SAE: {activations.shape[1]} -> {settings.d_sae} features on "
        f"{len(activations)} tokens, {settings.steps} steps of {settings.batch_size}")
    m = scan.manifest
    model_record = {key: m["model"][key] for key in ("ref", "path", "sha256", "dtype", "quantized")}
    result = train_sae(activations, settings, site=site, layer=layer, model=model_record, progress=progress)
    result.sae.config = replace(result.sae.config, skip_first=skip_first)
    stats = ReconstructionStats(result.sae.config.d_in, result.sae.config.d_sae)
    for x, features, x_hat in result.sae.encode_numpy(activations):
        stats.update(x, x_hat, features)
    return TrainOutcome(result=result, site=site, layer=layer, model=model_record, scan=str(scan.folder),
                        texts={k: m["stimuli"][k] for k in ("path", "sha256", "n")}, final=stats.report())


# ---------------------------------------------------------------------------------------------
# Evaluation


def splice_losses(model, sae: SparseAutoencoder, texts: list[str], *, batch_size: int = 8) -> tuple[dict, dict]:
    """Next-token loss clean, with the SAE's reconstruction spliced in, and with the site zeroed."""
    from ..capture.interventions import Map
    from ..experiments.networks import text_nll

    site, layer, skip = sae.config.site, sae.config.layer, sae.config.skip_first
    token_lists = model.token_lists(texts)
    spliced = lambda x: mx.concatenate([x[:, :skip], sae(x[:, skip:])], axis=1)  # noqa: E731  (the sink kept)
    runs = {"clean": (), "spliced": [Map(site, layer, fn=spliced)],
            "zero": [Map(site, layer, fn=lambda x: mx.concatenate([x[:, :skip], mx.zeros_like(x[:, skip:])], axis=1))]}
    nll, counts, change = {}, None, {}
    for name, interventions in runs.items():
        nll[name], counts, change[name] = text_nll(model, token_lists, interventions, batch_size=batch_size)
    per_token = {name: float(np.sum(values) / np.sum(counts)) for name, values in nll.items()}
    gap = per_token["zero"] - per_token["clean"]
    record = {"n_texts": len(texts), "n_predicted_tokens": int(np.sum(counts)),
              "loss_per_token": per_token, "perplexity": {k: math.exp(v) for k, v in per_token.items()},
              "delta_loss": per_token["spliced"] - per_token["clean"],
              "loss_recovered": (per_token["zero"] - per_token["spliced"]) / gap if gap > 0 else None,
              "relative_change_at_site": change["spliced"]}
    arrays = {f"nll_{name}": values for name, values in nll.items()}
    arrays["predicted_tokens"] = counts
    return record, arrays


def reconstruction(sae: SparseAutoencoder, activations: np.ndarray, dense_threshold: float):
    from ..analysis.sae_eval import ReconstructionStats

    stats = ReconstructionStats(sae.config.d_in, sae.config.d_sae, dense_threshold=dense_threshold)
    for x, features, x_hat in sae.encode_numpy(activations):
        stats.update(x, x_hat, features)
    return stats.report()


def word_pooled(model, sae: SparseAutoencoder, stimuli, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """([n, width] neurons, [n, d_sae] features) of each stimulus, averaged over its target word's tokens.

    Features are encoded token by token and then averaged (as the neurons are): an SAE reads tokens.
    """
    from ..capture.scan import ScanSettings, cached_scan, tokenize_stimuli

    site, layer = sae.config.site, sae.config.layer
    scan = cached_scan(model, stimuli, ScanSettings(sites=(site,), layers=(layer,), pool="all"), progress=progress)
    words = tokenize_stimuli(model, stimuli).word_tokens
    offsets, tokens = scan.offsets, scan.layer(site, layer)
    rows = np.concatenate([offsets[i] + np.asarray(positions) for i, positions in enumerate(words)])
    owner = np.repeat(np.arange(len(words)), [len(positions) for positions in words])
    counts = np.bincount(owner, minlength=len(words))[:, None]
    x = np.asarray(tokens[rows], np.float32)
    features = np.concatenate([f for _, f, _ in sae.encode_numpy(x)])
    pool = lambda values: np.add.reduceat(values, np.r_[0, np.cumsum(counts[:-1, 0])]) / counts  # noqa: E731
    return pool(x.astype(np.float64)), pool(features.astype(np.float64))


@dataclass(eq=False)
class EvalOutcome:
    sae: dict
    model: str
    heldout: dict
    reconstruction: object  # ReconstructionReport
    downstream: dict | None
    localization: object | None  # LocalizationResult
    separability: dict | None  # {"neurons": SeparabilityResult, "features": SeparabilityResult}
    timings: dict = field(default_factory=dict)
    arrays_: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return jsonable({
            "analysis": "sae-eval", "sae": self.sae, "model": self.model, "heldout": self.heldout,
            "reconstruction": self.reconstruction.to_dict(), "downstream": self.downstream,
            "localization": self.localization.to_dict() if self.localization else None,
            "separability": {name: result.to_dict() for name, result in self.separability.items()}
            if self.separability else None,
            "timings_s": self.timings,
            "notes": "reconstruction and downstream on the held-out texts; loss_recovered = (zero - spliced) / "
                     "(zero - clean) in next-token nats; localization: fewest units whose one-vs-rest probe reaches "
                     "the target balanced accuracy (word-grouped folds), ratio = neurons / features; "
                     "separability: best one-vs-rest Jensen-Shannon distance per unit, null = categories shuffled "
                     "across words"})

    def arrays(self) -> dict[str, np.ndarray]:
        out = dict(self.arrays_)
        out["feature_frequency"] = self.reconstruction.frequencies
        if self.localization:
            loc = self.localization
            out.update(localization_accuracy_neurons=loc.accuracy_neurons, localization_grid_neurons=loc.grid_neurons,
                       localization_accuracy_features=loc.accuracy_features, localization_grid_features=loc.grid_features)
        for name, result in (self.separability or {}).items():
            out.update({f"js_{name}": result.scores, f"js_{name}_best_class": result.best_class,
                        f"js_{name}_null": result.null_scores, f"js_{name}_live": result.live})
        return out


def run_eval(model, sae: SparseAutoencoder, *, heldout_path: Path, stimuli=None, splice: bool = True,
             target: float = 0.9, dense_threshold: float = 0.1, folds: int = 5, seed: int = 0,
             batch_size: int = 8, say: Say = quiet, scan_progress=None) -> EvalOutcome:
    """Reconstruction and spliced loss on held-out texts; localization and separability on `stimuli` if given."""
    from ..analysis.sae_eval import js_separability, localization
    from ..stimuli import read_texts

    config = sae.config
    check_place(model, config.site, config.layer, config.d_in)
    timings, arrays, started = {}, {}, time.perf_counter()
    say(f"held-out reconstruction: {heldout_path} ({config.site} at layer {config.layer}, every token; cached)")
    heldout_scan = corpus_scan(model, heldout_path, config.site, config.layer, scan_progress)
    report = reconstruction(sae, token_activations(heldout_scan, config.site, config.layer, config.skip_first),
                            dense_threshold)
    timings["reconstruction"] = time.perf_counter() - started
    downstream = None
    if splice:
        started = time.perf_counter()
        say("next-token loss: clean, SAE spliced in, site zeroed")
        downstream, more = splice_losses(model, sae, read_texts(heldout_path), batch_size=batch_size)
        arrays.update(more)
        timings["downstream"] = time.perf_counter() - started
    located = separable = None
    if stimuli is not None:
        started = time.perf_counter()
        say(f"concepts: {len(stimuli)} stimuli pooled over their target words; localization and JS separability")
        neurons, features = word_pooled(model, sae, stimuli, scan_progress)
        located = localization(neurons, features, stimuli.labels, stimuli.groups, target=target, folds=folds, seed=seed)
        separable = {name: js_separability(values, stimuli.labels, stimuli.groups, seed=seed)
                     for name, values in (("neurons", neurons), ("features", features))}
        for result in separable.values():
            result.classes = list(stimuli.categories)
        timings["concepts"] = time.perf_counter() - started
    if located is not None:
        located.classes = list(stimuli.categories)
    return EvalOutcome(
        sae={**{k: v for k, v in config.to_dict().items() if k != "extra"}}, model=model.ref,
        heldout={"path": str(heldout_path), "n_texts": len(heldout_scan), "n_tokens": report.n_tokens},
        reconstruction=report, downstream=downstream, localization=located, separability=separable,
        timings=timings, arrays_=arrays)
