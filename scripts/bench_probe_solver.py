"""The probe solver's second preconditioner, measured: steps, CPU and distance from the optimum.

    .venv/bin/python scripts/bench_probe_solver.py [--layers 2,15,27] [--agreement]

On the default probe's scans (the bundled model and its seed-0 twin, word-pooled resid_post on
stimuli/categories.jsonl; scanned into the cache first if missing), at each of --layers, fits the
default probe's first batch (the real labels and 5 shuffles, 5 word-grouped folds each: 30 problems)
with the refresh after REFRESH_AFTER steps and with it switched off, one BLAS thread, and prints the
median problem's steps, the batch's last problem's steps and the CPU seconds of each. It also times
the word-bootstrap AUC (1000 resamples) by its quadratic form and by the sorted pass.

--agreement adds, at every layer of both models, the real labels' out-of-fold correct stimuli of
both solvers against scikit-learn's pipeline fitted to tol=1e-7 (its optimum): how many layers agree
exactly, within one stimulus, and the largest difference. Takes ~5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def scans():
    """(trained [n, layers, width], twin [n, layers, width], labels, groups) of the default probe."""
    import numpy as np

    import mlxscan  # first: the fast BLAS before mlx
    from mlxscan.capture.scan import ScanSettings, cached_scan
    from mlxscan.models.twin import make_twin
    from mlxscan.stimuli import load_stimuli

    stimuli = load_stimuli(ROOT / "stimuli" / "categories.jsonl")
    settings = ScanSettings(sites=("resid_post",), pool="word")
    model = mlxscan.load()
    trained = cached_scan(model, stimuli, settings)
    twin = cached_scan(make_twin(model, seed=0), stimuli, settings)
    return (np.asarray(trained["resid_post"]), np.asarray(twin["resid_post"]), np.asarray(trained.labels),
            np.asarray(trained.groups))


@contextmanager
def refresh_switched(on: bool):
    """The solver with its second preconditioner (as shipped) or without it (REFRESH_AFTER past max_iter)."""
    from mlxscan.analysis import logistic
    from mlxscan.analysis.probes import PROBE_MAX_ITER

    saved = logistic.REFRESH_AFTER
    logistic.REFRESH_AFTER = saved if on else PROBE_MAX_ITER + 1
    try:
        yield
    finally:
        logistic.REFRESH_AFTER = saved


def fit(X, labels, train, reference, refresh: bool):
    """(fits, CPU seconds) of the probe's objective on these problems, with or without the refresh."""
    from mlxscan.analysis.logistic import fit_many
    from mlxscan.analysis.probes import PROBE_MAX_ITER, PROBE_TOL

    with refresh_switched(refresh):
        start = time.process_time()
        fits = fit_many(X, labels, train, int(labels.max()) + 1, tol=PROBE_TOL, max_iter=PROBE_MAX_ITER,
                        reference=reference)
        return fits, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="2,15,27")
    parser.add_argument("--agreement", action="store_true", help="every layer against scikit-learn's optimum")
    args = parser.parse_args()

    import numpy as np
    from threadpoolctl import threadpool_limits

    from mlxscan.analysis import probes
    from mlxscan.analysis.logistic import out_of_fold_probabilities

    trained, twin, y, groups = scans()
    _, y_index, groups = probes._check_labels(y, groups, len(y), 5)
    rng = np.random.default_rng([0, 1])  # the default probe's shuffles and folds (seed 0)
    label_sets = np.stack([y_index] + [probes.permute_labels_by_group(y_index, groups, rng)
                                       for _ in range(probes.FIRST_LOOK)])
    fold_sets = np.stack([probes.make_folds(labels, groups, folds=5, seed=0) for labels in label_sets])
    pairs = [(s, fold) for s in range(len(label_sets)) for fold in range(5)]
    labels = np.stack([label_sets[s] for s, _ in pairs])
    train = np.stack([fold_sets[s] != fold for s, fold in pairs])
    reference = [p for p, (s, _) in enumerate(pairs) if s == 0]

    print(f"{len(pairs)} problems a layer (real labels + {probes.FIRST_LOOK} shuffles, 5 folds), one BLAS thread")
    print("model    layer   median steps (off -> on)   batch's last   CPU s (off -> on)")
    with threadpool_limits(1):
        for name, X in (("trained", trained), ("twin", twin)):
            for layer in (int(value) for value in args.layers.split(",")):
                features = X[:, layer].astype(np.float64)
                (off, off_cpu), (on, on_cpu) = (fit(features, labels, train, reference, refresh)
                                                for refresh in (False, True))
                print(f"{name:<8} {layer:>5}   {np.median(off.n_iter):>5.0f} -> {np.median(on.n_iter):<5.0f}"
                      f"              {off.n_iter.max():>3} -> {on.n_iter.max():<3}      {off_cpu:.2f} -> {on_cpu:.2f}")

        weights = probes._resample_weights(groups, 0)
        scores = np.random.default_rng(0).random((len(y_index), int(y_index.max()) + 1))
        timings = {}
        for label, function in (("quadratic form", probes._weighted_ovr_auc),
                                ("sorted pass", probes._weighted_ovr_auc_sorted)):
            start = time.perf_counter()
            function(y_index, scores, weights)
            timings[label] = time.perf_counter() - start
        print("word-bootstrap AUC, 1000 resamples: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items()))

        if not args.agreement:
            return
        from sklearn.model_selection import PredefinedSplit, cross_val_predict

        folds = fold_sets[0]
        print("real labels, out-of-fold correct stimuli against scikit-learn at tol=1e-7, per layer")
        for name, X in (("trained", trained), ("twin", twin)):
            differences = {True: [], False: []}
            for layer in range(X.shape[1]):
                features = X[:, layer].astype(np.float64)
                optimum = (cross_val_predict(probes.linear_probe(tol=1e-7), features, y_index,
                                             cv=PredefinedSplit(folds)) == y_index).sum()
                for refresh in (True, False):
                    with refresh_switched(refresh):
                        oof = out_of_fold_probabilities(features, y_index[None], folds[None], int(y_index.max()) + 1,
                                                        tol=probes.PROBE_TOL, max_iter=probes.PROBE_MAX_ITER)[0]
                    differences[refresh].append(abs(int((oof.argmax(axis=1) == y_index).sum()) - int(optimum)))
            for refresh, label in ((True, "with the refresh"), (False, "without")):
                found = np.array(differences[refresh])
                print(f"{name:<8} {label:<17} same {np.sum(found == 0)}, within 1 {np.sum(found <= 1)}, "
                      f"largest {found.max()} of {len(found)} layers")


if __name__ == "__main__":
    main()
