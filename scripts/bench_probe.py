"""Where the time of a default `mlxscan probe` goes: each stage timed, in one run.

    .venv/bin/python scripts/bench_probe.py [--permutations 20] [--no-early-stop] [--fresh] [--n-jobs 2]

Stages: load the model; scan it (1,200 stimuli, resid_post, all layers, word pooling); build the
untrained twin; scan the twin; probe both (30 layers x 5 word-grouped folds x (1 + permutations)
logistic fits at most: per layer one batched solve of the real labels and the first 5 shuffles, and
one of the rest where those leave the verdict open, two layers at a time); the depth
questions at the best layer. Scans are cached between runs; --fresh puts the cache in a new
temporary folder so the scans are timed too. Each stage's CPU time (this process and the joblib
workers it started) is printed beside its wall time, and the load average under the table: on a
shared machine wall times move with the load, CPU times much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished, reaped child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--no-early-stop", action="store_true", help="every permutation at every layer")
    parser.add_argument("--fresh", action="store_true", help="time the scans too (empty scan cache)")
    parser.add_argument("--n-jobs", type=int, default=2, help="layers probed at once (probe_layers' n_jobs)")
    args = parser.parse_args()
    if args.fresh:
        os.environ["MLXSCAN_CACHE"] = tempfile.mkdtemp(prefix="mlxscan-bench-")

    import numpy as np
    from joblib.externals.loky import get_reusable_executor

    import mlxscan  # first: the fast BLAS before mlx
    from mlxscan.analysis.probes import probe_layers
    from mlxscan.capture.scan import ScanSettings, cached_scan
    from mlxscan.experiments.probe import depth_questions
    from mlxscan.models.twin import make_twin
    from mlxscan.stimuli import load_stimuli

    stages, cpu = {}, {}

    def timed(name, fn):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        value = fn()
        # Ends joblib's worker processes, so that their CPU time is counted (in the children's rusage).
        get_reusable_executor().shutdown(wait=True)
        stages[name], cpu[name] = time.perf_counter() - start, _cpu_seconds() - start_cpu
        print(f"{name:<28} {stages[name]:7.1f} s   cpu {cpu[name]:7.1f} s", flush=True)
        return value

    stimuli = load_stimuli(ROOT / "stimuli" / "categories.jsonl")
    settings = ScanSettings(sites=("resid_post",), pool="word")
    model = timed("load model", lambda: mlxscan.load())
    scan = timed("scan trained", lambda: cached_scan(model, stimuli, settings))
    twin = timed("build twin", lambda: make_twin(model, seed=0))
    twin_scan = timed("scan twin", lambda: cached_scan(twin, stimuli, settings))
    y, groups = scan.labels, scan.groups
    load_before = os.getloadavg()[0]
    report = timed("probe trained", lambda: probe_layers(scan["resid_post"], y, groups, permutations=args.permutations,
                                                         early_stop=not args.no_early_stop, n_jobs=args.n_jobs))
    twin_report = timed("probe twin", lambda: probe_layers(twin_scan["resid_post"], y, groups,
                                                           permutations=args.permutations,
                                                           early_stop=not args.no_early_stop, n_jobs=args.n_jobs))
    best = max(report.layers, key=lambda item: item.accuracy).layer
    timed("depth questions", lambda: depth_questions(np.asarray(scan.layer("resid_post", best), np.float64), y, groups,
                                                     folds=5, seed=0, classes=list(stimuli.categories)))
    print(f"{'total':<28} {sum(stages.values()):7.1f} s   cpu {sum(cpu.values()):7.1f} s   ({len(stimuli)} stimuli, "
          f"{model.n_layers} layers, {args.permutations} permutations, scans {'timed' if args.fresh else 'from the cache if present'})")
    for name, probed in (("trained", report), ("twin", twin_report)):
        runs = [layer.permutations_run for layer in probed.layers]
        print(f"{name}: permutations run per layer {min(runs)}-{max(runs)} (sum {sum(runs)} of "
              f"{args.permutations * len(runs)}), decodable span {probed.decodable_span():.2f}")
    print(f"load average (1 min) before probing {load_before:.1f}, at the end {os.getloadavg()[0]:.1f}, "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
