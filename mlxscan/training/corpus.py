"""Text for training: a small byte-level BPE tokenizer, token streams, and a seeded batch order.

The tokenizer is trained with the `tokenizers` package on the training texts alone and saved in the
Hugging Face layout (tokenizer.json + tokenizer_config.json), so transformers, and through it
mlxscan.load, reads it back. Every text ends with the end-of-text token, so the stream marks where
one text stops and the next starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MlxscanError

EOS_TOKEN, EOS_ID = "<|endoftext|>", 0  # also the pad token, as in SmolLM2
MIN_VOCAB = 260  # the two special tokens, 256 byte symbols and a couple of merges


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (`tokenizers.Tokenizer`) with `vocab_size` tokens, trained on `texts`.

    Byte-level: every UTF-8 text is encodable, whatever the training texts held. Deterministic for the
    same texts and size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB:
        raise MlxscanError(f"vocab size {vocab_size} is too small: a byte-level tokenizer needs at least {MIN_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer)
    assert tokenizer.token_to_id(EOS_TOKEN) == EOS_ID  # special tokens are numbered first
    return tokenizer


def save_tokenizer(tokenizer, folder: Path, max_length: int) -> None:
    """tokenizer.json and a tokenizer_config.json that transformers' AutoTokenizer accepts (no BOS added)."""
    folder = Path(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOS_TOKEN,
              "pad_token": EOS_TOKEN, "unk_token": None, "model_max_length": max_length,
              "add_bos_token": False, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def token_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """[n_tokens] int32: every text's tokens followed by the end-of-text token."""
    pieces = [np.asarray(encoding.ids + [EOS_ID], np.int32) for encoding in tokenizer.encode_batch(list(texts))]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


@dataclass(frozen=True, eq=False)
class TokenData:
    """Training and validation token streams, and the tokenizer that made them."""

    tokenizer: object  # tokenizers.Tokenizer
    train: np.ndarray  # [n_train] int32
    validation: np.ndarray  # [n_validation] int32
    sources: dict  # {"train": {"path", "sha256", "texts"}, "validation": {...}}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def make_token_data(train_texts: Sequence[str], validation_texts: Sequence[str], *, vocab_size: int,
                    seq_len: int, sources: dict | None = None) -> TokenData:
    """Tokenizer trained on the training texts; both streams checked to hold at least one window."""
    tokenizer = train_tokenizer(train_texts, vocab_size)
    train, validation = token_stream(tokenizer, train_texts), token_stream(tokenizer, validation_texts)
    for name, stream in (("training", train), ("validation", validation)):
        if len(stream) < seq_len + 1:
            raise MlxscanError(f"the {name} texts give {len(stream)} tokens, fewer than one window of {seq_len + 1}; "
                               "give more text or a shorter --seq-len")
    return TokenData(tokenizer, train, validation, sources or {})


def batch_starts(n_tokens: int, seq_len: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """[steps, batch_size] start offsets of training windows: the data order, fixed by the seed alone.

    Windows of seq_len + 1 tokens (inputs and next-token targets) start anywhere in the stream. The
    order does not depend on λ, so runs of one seed at different penalties see the same batches.
    """
    rng = np.random.default_rng([seed, 17])  # stream 17: apart from the init's and the layout's
    return rng.integers(0, n_tokens - seq_len, size=(steps, batch_size))


def windows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each [len(starts), seq_len] int32, for windows starting at `starts`."""
    index = np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = stream[index]
    return chunk[:, :-1], chunk[:, 1:]


def validation_windows(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows covering the validation stream (the last partial one left out)."""
    count = (len(stream) - 1) // seq_len
    return windows(stream, np.arange(count) * seq_len, seq_len)
