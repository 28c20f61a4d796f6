"""Child process: let transformers build a model's tokenizer and save it (see tokenizer.py).

torch is hidden first: `sys.modules["torch"] = None` makes transformers see it as absent, so this
process neither imports it nor needs it installed. transformers' GGUF metadata reader imports torch
(for dequantizing tensors we never ask it for), so for GGUF files it gets a stand-in that reads the
same metadata through MLX.
"""

import json
import sys
import types

sys.modules["torch"] = None


def _read_gguf_metadata_with_mlx(gguf_path, string_arrays=()):
    import mlx.core as mx

    weights, raw = mx.load(str(gguf_path), return_metadata=True)

    def plain(value):
        if isinstance(value, mx.array):
            return value.item() if value.ndim == 0 else value.tolist()
        return value

    return {key: plain(value) for key, value in raw.items()}, tuple(weights)


def _install_reader_stand_in() -> None:
    reader = types.ModuleType("transformers.integrations.gguf.reader")
    reader.read_gguf_metadata = _read_gguf_metadata_with_mlx
    sys.modules[reader.__name__] = reader


def main(source: str, gguf_file: str, out: str) -> None:
    if gguf_file:
        # AutoTokenizer reads a GGUF's whole config through a torch-only path just to land on this
        # generic class, which builds the tokenizer from the metadata alone.
        _install_reader_stand_in()
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        tokenizer = TokenizersBackend.from_pretrained(source, gguf_file=gguf_file)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out)
    # Whether this tokenizer puts BOS in front of plain text, and ids the saved tokenizer.json must
    # reproduce when loaded on its own (the loader checks them).
    text = "Hello world: 12 apples, naïve café!\n  two  spaces"
    ids = tokenizer(text)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    with open(f"{out}/mlxscan_probe.json", "w") as handle:
        json.dump({"adds_bos": adds_bos, "text": text, "ids": ids}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
