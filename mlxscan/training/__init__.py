"""Training small decoder-only transformers in MLX, with an optional wiring-cost penalty.

    corpus.py      the texts, a small byte-level BPE tokenizer, token streams and the batch order
    tiny_model.py  the model's config (a Llama), its seeded init, and checkpoints in the Hugging Face layout
    wiring_cost.py unit positions on a line or sheet, and the penalty λ·Σ|w_ij|·distance(i, j)
    train.py       the compiled AdamW training loop

A trained model is saved as a Hugging Face folder (config.json, model.safetensors, tokenizer files),
so `mlxscan.load(folder)` opens it like any other model and every analysis runs on it.
"""
