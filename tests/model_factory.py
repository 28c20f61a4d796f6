"""Tiny random-weight Hugging Face models, built by the test suite itself.

Nothing can be downloaded where the tests run, so -- like transformers' own tests -- we build small
models from a config: a byte-level BPE tokenizer trained on a fixed corpus, a Llama / Qwen2 / Gemma2
decoder with random weights saved as safetensors, and a GGUF file converted from a Llama folder the
way llama.cpp's `convert_hf_to_gguf.py` does.

Everything is deterministic: the same arguments give the same files on every run.

Run this file directly to build one of each into a temporary folder and check it round-trips.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

FAMILIES = ("llama", "qwen2", "gemma2")
GGUF_QTYPES = ("F32", "F16", "Q8_0", "Q4_0")

EOS_TOKEN = "<|endoftext|>"  # id 0; doubles as the pad token, as in SmolLM2 / Qwen2
BOS_TOKEN = "<|bos|>"  # id 1
EOS_ID, BOS_ID = 0, 1
TOKENIZER_VOCAB_SIZE = 360  # 2 special + 256 byte symbols + about 100 merges

# Varied English with digits and punctuation, so merges cover words, numbers and symbols.
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, three astronauts flew 384,400 km to the Moon and back.",
    "Is it 12:45 or 13:05? I can't tell without my watch.",
    "She paid $7.99 for two coffees & a blueberry muffin.",
    "The river runs north for 2,300 miles before it reaches the sea.",
    "Why do cats sleep so much? Nobody really knows.",
    "He wrote the letter, folded it twice, and sealed it with wax.",
    "On 4 July 1776, the declaration was signed in Philadelphia.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The children laughed; the teacher, however, did not.",
    "A recipe: mix 2 cups of flour, 1 egg, and 250 ml of milk.",
    "The train leaves at 6:30 a.m. from platform 9.",
    "Our neighbours' garden is full of roses, tulips and ivy.",
    "\"Stop!\" she shouted, but the bus had already gone.",
    "The library opens at nine and closes at five on weekdays.",
    "Prices rose by 3.5% in March, then fell by 0.8% in April.",
    "Light travels about 299,792 kilometres every second.",
    "My brother's favourite number is 42; mine is 7.",
    "The museum holds over 10,000 paintings from 15 countries.",
    "When the storm passed, the birds began to sing again.",
    "Please read chapters 3-5 before Monday's class.",
    "The old man sat by the window and watched the rain.",
    "Alice said, 'I think we should go home now.'",
    "A square has 4 sides, a pentagon 5, and a hexagon 6.",
    "The meeting was moved from Tuesday to Thursday (again).",
    "Scientists measured the mountain at 8,849 metres tall.",
    "Every morning he runs 5 km around the park.",
    "The soup was too hot, so she waited a few minutes.",
    "Can you believe it? The shop sold out in 20 minutes!",
    "Our flight, number BA 117, was delayed by two hours.",
    "The word 'language' comes from the Latin 'lingua'.",
    "They planted 120 trees along the new road last year.",
    "The cat sat on the mat, and the dog lay by the door.",
    "If x = 3 and y = 4, then x + y = 7.",
    "The concert starts at 8 p.m.; doors open at 7.",
    "Snow fell all night, and by dawn the town was white.",
)

# Sentences the checks tokenize; some words are not in the corpus.
SAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, 17 zebras visited Zurich!",
    "Hello there, how are you?",
)


def make_tokenizer(folder, *, add_bos: bool) -> None:
    """Train a small byte-level BPE tokenizer and save it into `folder` with transformers.

    `add_bos=True` makes encoding start with `<|bos|>` (like Llama 3 and Gemma); `add_bos=False`
    never adds it (like SmolLM2 and Qwen2). Either way `<|endoftext|>` is eos and pad.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # GPT-2's regex split; llama.cpp calls this pre-tokenizer "gpt2".
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],  # listed first, so they get ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    assert tokenizer.token_to_id(EOS_TOKEN) == EOS_ID and tokenizer.token_to_id(BOS_TOKEN) == BOS_ID

    # BOS lives in tokenizer.json's post-processor, as in Llama 3's; transformers 5 does not keep an
    # `add_bos_token` flag in tokenizer_config.json for this kind of tokenizer.
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, BOS_ID)],
        )
    else:  # what Qwen2's tokenizer.json has: offsets only, no tokens added
        tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    wrapped.save_pretrained(str(folder))


def make_tiny_model(
    family: str, folder, *, tied: bool = True, seed: int = 0, add_bos: bool = False, **config_overrides
) -> pathlib.Path:
    """Build a tiny random float32 `family` model ("llama", "qwen2", "gemma2") plus tokenizer in `folder`.

    `config_overrides` go to the config class (e.g. `num_hidden_layers=2`, `sliding_window=8`).
    config.json is left exactly as transformers writes it (in transformers 5: `rope_parameters`,
    no top-level `rope_theta`). Real Gemma2 checkpoints are always tied; mlx-lm's Gemma2 has no lm_head.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder, add_bos=add_bos)
    vocab_size = len(PreTrainedTokenizerFast.from_pretrained(str(folder)))

    config = _tiny_config(family, vocab_size=vocab_size, tied=tied, **config_overrides)
    torch.manual_seed(seed)
    # Eager attention: the only kind that applies Gemma2's attention-logit softcapping.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    _reinitialise(model, seed=seed, norm_offset=family == "gemma2")
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _tiny_config(family: str, *, vocab_size: int, tied: bool, **overrides):
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: 2 query heads per kv head
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        # Not mlx-lm's Qwen2 default of 1e6, so a loader that drops the value gives wrong logits.
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    if family == "llama":
        return LlamaConfig(**{**common, **overrides})
    if family == "qwen2":
        return Qwen2Config(**{**common, **overrides})  # q/k/v biases are built in
    gemma = dict(
        rms_norm_eps=1e-6,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=16,
        sliding_window=4096,
        hidden_activation="gelu_pytorch_tanh",
    )
    return Gemma2Config(**{**common, **gemma, **overrides})


@torch.no_grad()
def _reinitialise(model, *, seed: int, norm_offset: bool) -> None:
    """Give every parameter a larger spread than transformers' std 0.02.

    With std 0.02 activations are tiny and the logits nearly uniform, so a broken layer barely shows.
    Norm weights get 1 + 0.1*N(0, 1); Gemma's norms store w and apply (1 + w), so they get 0.1*N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():  # a tied lm_head is listed once, as the embedding
        noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        if "norm" in name:
            parameter.copy_(0.1 * noise if norm_offset else 1.0 + 0.1 * noise)
        else:
            parameter.copy_(0.2 * noise)


# ----------------------------------------------------------------------------------------------------
# GGUF


def permute_for_gguf(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: reorder Q/K rows from HF's half-split rotary layout to GGML's interleaved one."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(hf_folder, gguf_path, *, qtype: str = "F32") -> pathlib.Path:
    """Convert a Llama folder from `make_tiny_model` into a GGUF file, as `convert_hf_to_gguf.py` does.

    `qtype` ("F32", "F16", "Q8_0", "Q4_0") is the storage type of every 2-D matrix, the embedding
    included; norms stay F32.
    """
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype must be one of {GGUF_QTYPES}, not {qtype!r}")
    hf_folder, gguf_path = pathlib.Path(hf_folder), pathlib.Path(gguf_path)
    config = AutoConfig.from_pretrained(hf_folder)
    if config.model_type != "llama":
        raise ValueError(f"write_gguf converts llama folders only, not {config.model_type!r}")
    tensors = load_file(hf_folder / "model.safetensors")

    writer = gguf.GGUFWriter(gguf_path, "llama")
    writer.add_name(hf_folder.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp states it only then
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_types = {
        "F32": gguf.LlamaFileType.ALL_F32,
        "F16": gguf.LlamaFileType.MOSTLY_F16,
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    writer.add_file_type(file_types[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, hf_folder, AutoTokenizer.from_pretrained(str(hf_folder)))

    for name, array in _gguf_tensors(tensors, config):
        if array.ndim == 1:  # norms: llama.cpp keeps 1-D tensors in F32
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == "F32":
            writer.add_tensor(name, array.astype(np.float32))
        elif qtype == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), kind), raw_dtype=kind)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path


def _gguf_tensors(tensors: dict, config):
    """(GGUF name, array) pairs in llama.cpp's order, with Q and K permuted."""
    n_head, n_head_kv = config.num_attention_heads, config.num_key_value_heads
    yield "token_embd.weight", tensors["model.embed_tokens.weight"]
    for layer in range(config.num_hidden_layers):
        hf, blk = f"model.layers.{layer}.", f"blk.{layer}."
        yield blk + "attn_norm.weight", tensors[hf + "input_layernorm.weight"]
        yield blk + "attn_q.weight", permute_for_gguf(tensors[hf + "self_attn.q_proj.weight"], n_head, n_head)
        yield blk + "attn_k.weight", permute_for_gguf(tensors[hf + "self_attn.k_proj.weight"], n_head, n_head_kv)
        yield blk + "attn_v.weight", tensors[hf + "self_attn.v_proj.weight"]
        yield blk + "attn_output.weight", tensors[hf + "self_attn.o_proj.weight"]
        yield blk + "ffn_norm.weight", tensors[hf + "post_attention_layernorm.weight"]
        yield blk + "ffn_gate.weight", tensors[hf + "mlp.gate_proj.weight"]
        yield blk + "ffn_up.weight", tensors[hf + "mlp.up_proj.weight"]
        yield blk + "ffn_down.weight", tensors[hf + "mlp.down_proj.weight"]
    yield "output_norm.weight", tensors["model.norm.weight"]
    if "lm_head.weight" in tensors:  # absent when tied: llama.cpp then reuses token_embd
        yield "output.weight", tensors["lm_head.weight"]


def _add_tokenizer(writer, hf_folder: pathlib.Path, hf_tokenizer) -> None:
    """The tokenizer as llama.cpp stores a byte-level BPE one: tokens, types, merges, special ids."""
    import gguf

    backend = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id[index] for index in range(len(by_id))]
    special = {token.content for token in backend.get_added_tokens_decoder().values() if token.special}
    merges = json.loads((hf_folder / "tokenizer.json").read_text())["model"]["merges"]
    # tokenizers writes a merge as ["a", "b"] (older versions: "a b"); GGUF wants "a b".
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
    # Whether this tokenizer adds BOS, asked the way a user would see it.
    adds_bos = hf_tokenizer("a")["input_ids"][0] == hf_tokenizer.bos_token_id

    writer.add_tokenizer_model("gpt2")
    # "gpt2" = GPT-2's split regex, which is what ByteLevel(use_regex=True) applies. llama.cpp knows
    # it by that name; transformers has no entry for it and keeps GPT2Tokenizer's own ByteLevel split.
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(hf_tokenizer.bos_token_id)
    writer.add_eos_token_id(hf_tokenizer.eos_token_id)
    writer.add_pad_token_id(hf_tokenizer.pad_token_id)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)


# ----------------------------------------------------------------------------------------------------
# Reference outputs


@torch.no_grad()
def torch_logits(folder, input_ids, *, gguf_file: str | None = None) -> np.ndarray:
    """Logits [tokens, vocab] of the model in `folder` (or of `gguf_file` in it) for one sequence, from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=gguf_file, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    ids = torch.tensor([list(input_ids)], dtype=torch.long)
    return model(input_ids=ids).logits[0].float().numpy()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: one number per comparison, independent of scale."""
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max() / np.abs(np.asarray(expected)).max())


def _self_check(root: pathlib.Path) -> None:
    """Build one of everything and print how each round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()

    for family in FAMILIES:
        for tied in (True, False):
            folder = make_tiny_model(family, root / f"{family}-{tied}", tied=tied, add_bos=family != "qwen2")
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            ids = tokenizer(SAMPLE_SENTENCES[0])["input_ids"]
            with torch.no_grad():
                model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
                again = model(input_ids=torch.tensor([ids])).logits[0].numpy()
            logits = torch_logits(folder, ids)
            probs = torch.softmax(torch.from_numpy(logits), -1).max(-1).values.mean().item()
            print(f"{family:7} tied={tied!s:5} ids[:3]={ids[:3]} reload err={relative_error(again, logits):.1e} "
                  f"logit std={logits.std():.2f} mean max prob={probs:.3f}")
    folder, gguf_folder = root / "llama-False", root / "gguf"
    gguf_folder.mkdir()  # apart from tokenizer.json, which transformers would otherwise read instead
    ids = AutoTokenizer.from_pretrained(str(folder))(SAMPLE_SENTENCES[1])["input_ids"]
    expected = torch_logits(folder, ids)
    for qtype in GGUF_QTYPES:
        write_gguf(folder, gguf_folder / f"model-{qtype}.gguf", qtype=qtype)
        got = torch_logits(gguf_folder, ids, gguf_file=f"model-{qtype}.gguf")
        agree = (got.argmax(-1) == expected.argmax(-1)).mean()
        print(f"gguf {qtype:4} logits rel err {relative_error(got, expected):.2e}, argmax agrees {agree:.0%}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        _self_check(pathlib.Path(root))
