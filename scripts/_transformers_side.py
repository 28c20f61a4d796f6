"""The transformers + torch side of bench_scan.py, in a process of its own.

    python scripts/_transformers_side.py MODEL.gguf   (driven by bench_scan.py over stdin/stdout)

Kept apart from MLX so that neither library's BLAS or OpenMP threads slow the other: in one process,
MLX ran at under half its own speed once torch was loaded. Reads the batches (JSON, one line), loads
the model, answers "ready"; then for each line "run START STOP" scans batches START..STOP-1 once and
answers the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def scan_once(hf_model, batched) -> float:
    """Every layer's residual stream at each stimulus's last token, as mlxscan's scan records it."""
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


def main() -> None:
    path = Path(sys.argv[1])
    batched = json.loads(sys.stdin.readline())
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    scan_once(hf_model, batched[:1])  # warm-up
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        command, *bounds = line.split()
        if command != "run":
            break
        start, stop = map(int, bounds)
        print(json.dumps({"seconds": scan_once(hf_model, batched[start:stop])}), flush=True)


if __name__ == "__main__":
    main()
