"""Scan throughput: mlxscan against transformers + torch, in one run, on the same scan.

    .venv/bin/python scripts/bench_scan.py [--model PATH.gguf] [--stimuli FILE] [--limit N] [--batch-size 32]

transformers runs in a child process (scripts/_transformers_side.py): loaded into one process, torch
slowed MLX to under half its speed, and users never run the two together. Both sides run the same
weights (the bundled SmolLM2-135M-Instruct GGUF unless --model), the same stimuli (all of stimuli/categories.jsonl unless --limit), batches of the same size, float32, and record
the same thing: every layer's residual stream (resid_post) pooled at the last token, skipping the LM
head. transformers runs the base model with `output_hidden_states` and an attention mask over right
padding, on length-sorted batches (the least padding). mlxscan runs twice:
- as `mlxscan scan` does: batches that share a prefix (prefix_batches), each prefix run once;
- every token computed: the length-sorted batches, prefix sharing off (the forward pass alone).
Prints tokens/s (stimulus tokens per second) of each, the ratios, the tokens each mlxscan run actually
computed, and the forward pass's achieved GFLOP/s against this machine's measured float32 matmul
ceiling. Needs the test extra (torch, transformers, gguf).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxscan  # noqa: E402  (first: loads the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxscan.capture import forward  # noqa: E402
from mlxscan.capture.forward import run_tokens, shared_prefix_length  # noqa: E402
from mlxscan.capture.scan import pool_weights, prefix_batches  # noqa: E402
from mlxscan.models import bundled_model_path  # noqa: E402
from mlxscan.stimuli import load_stimuli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 8


def batches(token_lists, batch_size):
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    return [[token_lists[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def time_mlxscan(model, batched, reuse: forward.PrefixReuse | None) -> float:
    """Seconds to scan the batches; with a PrefixReuse, shared prefixes run once (as `mlxscan scan` does)."""
    start = time.perf_counter()
    for token_lists in batched:
        weights = pool_weights("last", token_lists, [[0]] * len(token_lists), False)
        run_tokens(model, token_lists, sites=["resid_post"], pool_weights=weights, prefix_reuse=reuse)
    return time.perf_counter() - start


def tokens_computed(batched, share_prefixes: bool) -> int:
    """Token positions the forward pass runs: padding included, a shared prefix once per batch."""
    total = 0
    for token_lists in batched:
        prefix = shared_prefix_length(token_lists) if share_prefixes else 0
        total += prefix + len(token_lists) * (max(map(len, token_lists)) - prefix)
    return total


class TransformersSide:
    """transformers + torch in a child process (scripts/_transformers_side.py), timed on request."""

    def __init__(self, model_path: Path, batched):
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_transformers_side.py")),
                                         str(model_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.process.stdin.write(json.dumps(batched) + "\n")
        self.process.stdin.flush()
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the transformers side ended early (is the test extra installed? see its error above)")
        return json.loads(line)

    def time_scan(self, start: int, stop: int) -> float:
        """Seconds to scan batches start..stop-1."""
        self.process.stdin.write(f"run {start} {stop}\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def matmul_ceiling(d_model: int, d_mlp: int, tokens: int = 768) -> float:
    """GFLOP/s of MLX's float32 matmul at the MLP's shape: what this machine can do at best."""
    a, b = mx.random.normal((tokens, d_model)), mx.random.normal((d_model, d_mlp))
    mx.eval(a, b)
    for _ in range(3):
        mx.eval(a @ b)
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        mx.eval(a @ b)
    return 2 * tokens * d_model * d_mlp * repeats / (time.perf_counter() - start) / 1e9


def forward_flops_per_token(model, seq_len: float) -> float:
    """Matmul FLOPs per token of the layers (no LM head): projections, MLP and attention scores."""
    c = model.config
    head_dim = c.get("head_dim") or model.d_model // model.n_heads
    kv = c.get("num_key_value_heads") or model.n_heads
    projections = model.d_model * head_dim * (2 * model.n_heads + 2 * kv)
    mlp = 3 * model.d_model * model.d_mlp
    attention = 2 * model.n_heads * head_dim * seq_len
    return 2 * model.n_layers * (projections + mlp + attention / 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a .gguf file (default: the bundled model)")
    parser.add_argument("--stimuli", type=Path, default=ROOT / "stimuli" / "categories.jsonl")
    parser.add_argument("--limit", type=int, default=0, help="scan only the first N stimuli (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the best counts")
    args = parser.parse_args()

    model = mlxscan.load(args.model)
    stimuli = list(load_stimuli(args.stimuli))
    token_lists = [model.tokenize(s.text) for s in stimuli[: args.limit or len(stimuli)]]
    by_length = batches(token_lists, args.batch_size)
    by_prefix = [[token_lists[i] for i in batch] for batch in prefix_batches(token_lists, args.batch_size)]
    n_tokens = sum(map(len, token_lists))
    path = args.model or bundled_model_path()
    print(f"loading {path.name} into transformers in a child process (dequantized float32; ~30 s)...", flush=True)
    theirs_side = TransformersSide(path, by_length)

    time_mlxscan(model, by_prefix[:1], forward.PrefixReuse())  # warm-up
    # Each run is cut into chunks taken in turn by the three sides: this machine's speed drifts by up to 30%
    # within a minute, and drift then hits every side alike.
    scan_cuts, length_cuts = (np.linspace(0, len(b), CHUNKS + 1).astype(int) for b in (by_prefix, by_length))
    scan_runs, plain_runs, theirs = [], [], []
    for _ in range(args.repeats):
        times, reuse = np.zeros(3), forward.PrefixReuse()
        for chunk in range(CHUNKS):
            (a, b), (c, d) = scan_cuts[chunk:chunk + 2], length_cuts[chunk:chunk + 2]
            times += (time_mlxscan(model, by_prefix[a:b], reuse), time_mlxscan(model, by_length[c:d], None),
                      theirs_side.time_scan(int(c), int(d)))
        scan_runs.append(times[0]), plain_runs.append(times[1]), theirs.append(times[2])
    theirs_side.close()
    scan_rate, plain_rate, theirs_rate = (n_tokens / min(runs) for runs in (scan_runs, plain_runs, theirs))
    computed_scan, computed_plain = tokens_computed(by_prefix, True), tokens_computed(by_length, False)
    achieved = computed_plain / min(plain_runs) * forward_flops_per_token(model, n_tokens / len(token_lists)) / 1e9
    ceiling = matmul_ceiling(model.d_model, model.d_mlp)
    runs = lambda times: ", ".join(f"{t:.2f}s" for t in times)  # noqa: E731
    print(f"scan: {len(token_lists)} stimuli, {n_tokens} tokens, batch {args.batch_size}, resid_post x {model.n_layers} "
          f"layers, pool last; torch {theirs_side.info['torch']} with {theirs_side.info['threads']} threads; "
          f"BLAS for MLX: {mlxscan._blas.describe()}")
    print(f"mlxscan scan           {scan_rate:8.1f} tokens/s   ({len(by_prefix)} batches sharing prefixes, "
          f"{computed_scan} token positions computed; runs: {runs(scan_runs)})")
    print(f"mlxscan every token    {plain_rate:8.1f} tokens/s   ({len(by_length)} length-sorted batches, "
          f"{computed_plain} token positions computed; runs: {runs(plain_runs)})")
    print(f"transformers           {theirs_rate:8.1f} tokens/s   ({len(by_length)} length-sorted batches; "
          f"runs: {runs(theirs)})")
    print(f"ratio mlxscan scan / transformers: {scan_rate / theirs_rate:.2f}x   "
          f"(forward pass alone, every token: {plain_rate / theirs_rate:.2f}x)")
    paired = [t / s for s, t in zip(scan_runs, theirs)]  # each run's sides ran interleaved, so their ratio is drift-free
    print(f"run by run: {', '.join(f'{r:.2f}' for r in paired)} (median {np.median(paired):.2f}x)")
    print(f"mlxscan's forward pass achieved {achieved:.1f} GFLOP/s; MLX float32 matmul ceiling here {ceiling:.1f} "
          f"GFLOP/s ({achieved / ceiling:.0%})")

if __name__ == "__main__":
    main()
