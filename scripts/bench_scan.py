"""Scan throughput: mlxscan against transformers + torch, in one process, on the same scan.

    .venv/bin/python scripts/bench_scan.py [--model PATH.gguf] [--stimuli FILE] [--limit N] [--batch-size 32]

Both sides run the same weights (the bundled SmolLM2-135M-Instruct GGUF unless --model), the same
stimuli in the same length-sorted batches, float32, and record the same thing: every layer's
residual stream (resid_post) pooled at the last token, skipping the LM head. transformers runs the
base model with `output_hidden_states` and an attention mask over right padding. Prints tokens/s of
each, their ratio, and mlxscan's achieved GFLOP/s against this machine's measured float32 matmul
ceiling. Needs the test extra (torch, transformers, gguf).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxscan  # noqa: E402  (first: loads the fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlxscan.capture.forward import run_tokens  # noqa: E402
from mlxscan.capture.scan import pool_weights  # noqa: E402
from mlxscan.models import bundled_model_path  # noqa: E402
from mlxscan.stimuli import load_stimuli  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def batches(token_lists, batch_size):
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    return [[token_lists[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


def time_mlxscan(model, batched) -> float:
    start = time.perf_counter()
    for token_lists in batched:
        weights = pool_weights("last", token_lists, [[0]] * len(token_lists), False)
        run_tokens(model, token_lists, sites=["resid_post"], pool_weights=weights)
    return time.perf_counter() - start


def time_transformers(hf_model, batched) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for token_lists in batched:
            width = max(map(len, token_lists))
            ids = torch.zeros((len(token_lists), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(token_lists):
                ids[row, :len(tokens)] = torch.tensor(tokens)
                mask[row, :len(tokens)] = 1
            out = hf_model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            last = torch.tensor([len(t) - 1 for t in token_lists])
            rows = torch.arange(len(token_lists))
            np.stack([h[rows, last].numpy() for h in out.hidden_states[1:]], axis=1)
    return time.perf_counter() - start


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
    parser.add_argument("--limit", type=int, default=480, help="stimuli to scan (default 480)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating timed runs of each side; the best counts")
    args = parser.parse_args()

    model = mlxscan.load(args.model)
    stimuli = load_stimuli(args.stimuli)
    token_lists = [model.tokenize(s.text) for s in list(stimuli)[: args.limit]]
    batched = batches(token_lists, args.batch_size)
    n_tokens = sum(map(len, token_lists))

    from transformers import AutoModelForCausalLM
    import torch

    path = args.model or bundled_model_path()
    print(f"loading {path.name} into transformers (dequantized float32; takes ~30 s)...", flush=True)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    time_mlxscan(model, batched[:1]), time_transformers(hf_model, batched[:1])  # warm-up
    ours, theirs = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both sides alike
        ours.append(time_mlxscan(model, batched))
        theirs.append(time_transformers(hf_model, batched))
    ours_rate, theirs_rate = n_tokens / min(ours), n_tokens / min(theirs)
    mean_len = n_tokens / len(token_lists)
    achieved = ours_rate * forward_flops_per_token(model, mean_len) / 1e9
    ceiling = matmul_ceiling(model.d_model, model.d_mlp)
    print(f"scan: {len(token_lists)} stimuli, {n_tokens} tokens, batch {args.batch_size}, resid_post x {model.n_layers} "
          f"layers, pool last; torch threads {torch.get_num_threads()}; BLAS for MLX: {mlxscan._blas.describe()}")
    print(f"mlxscan       {ours_rate:8.1f} tokens/s   (runs: {', '.join(f'{t:.2f}s' for t in ours)})")
    print(f"transformers  {theirs_rate:8.1f} tokens/s   (runs: {', '.join(f'{t:.2f}s' for t in theirs)})")
    print(f"ratio mlxscan/transformers: {ours_rate / theirs_rate:.2f}x")
    print(f"mlxscan achieved {achieved:.1f} GFLOP/s; MLX float32 matmul ceiling here {ceiling:.1f} GFLOP/s "
          f"({achieved / ceiling:.0%})")


if __name__ == "__main__":
    main()
