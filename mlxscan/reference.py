"""Child process: the same weights and tokens through transformers (torch, float32).

Run by verify.py as `python -m mlxscan.reference SPEC.json OUT.npz`, never imported by the runtime
path: torch stays out of the parent process. Records, per text, the embeddings entering layer 0,
every decoder layer's output (resid_post, through forward hooks rather than `hidden_states`, whose
last entry some versions normalize), the final norm's output and the logits.
"""

from __future__ import annotations

import json
import sys


def _load(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": "eager"}
    if spec.get("gguf_file"):
        kwargs["gguf_file"] = spec["gguf_file"]
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], **kwargs)
    return model.eval()


def record(model, token_lists):
    import torch

    inner = model.model
    captured = {}
    hooks = [
        inner.layers[i].register_forward_hook(
            lambda _m, _inp, out, i=i: captured.__setitem__(("resid_post", i), out[0] if isinstance(out, tuple) else out)
        )
        for i in range(len(inner.layers))
    ]
    hooks.append(inner.norm.register_forward_hook(lambda _m, _inp, out: captured.__setitem__("final_norm", out)))
    results = []
    try:
        with torch.no_grad():
            for tokens in token_lists:
                captured.clear()
                ids = torch.tensor([tokens])
                out = model(ids, output_hidden_states=True)
                n_layers = len(inner.layers)
                results.append({
                    "embed": out.hidden_states[0][0].numpy(),
                    "resid_post": torch.stack([captured[("resid_post", i)][0] for i in range(n_layers)]).numpy(),
                    "final_norm": captured["final_norm"][0].numpy(),
                    "logits": out.logits[0].float().numpy(),
                })
    finally:
        for hook in hooks:
            hook.remove()
    return results


def main(spec_path: str, out_path: str) -> None:
    import numpy as np

    spec = json.loads(open(spec_path).read())
    model = _load(spec)
    results = record(model, spec["tokens"])
    arrays = {f"{key}_{n}": value for n, result in enumerate(results) for key, value in result.items()}
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except ImportError as error:
        print(f"the transformers reference needs torch and transformers (pip install 'mlxscan[reference]'): {error}",
              file=sys.stderr)
        sys.exit(3)
