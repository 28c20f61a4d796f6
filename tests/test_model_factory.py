"""The tiny models the reference tests build: tokenizer BOS behaviour, save/reload, GGUF conversion."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from model_factory import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    FAMILIES,
    SAMPLE_SENTENCES,
    make_tiny_model,
    make_tokenizer,
    permute_for_gguf,
    relative_error,
    torch_logits,
    write_gguf,
)

pytestmark = pytest.mark.reference


def _tokenizer(folder, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def llama_untied(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama") / "model", tied=False, add_bos=True)


@pytest.mark.parametrize("add_bos", [True, False])
def test_tokenizer_bos_and_determinism(tmp_path, add_bos):
    make_tokenizer(tmp_path / "a", add_bos=add_bos)
    make_tokenizer(tmp_path / "b", add_bos=add_bos)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()

    tokenizer = _tokenizer(tmp_path / "a")
    assert 300 <= len(tokenizer) <= 400
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    for sentence in SAMPLE_SENTENCES:
        ids = tokenizer(sentence)["input_ids"]
        if add_bos:
            assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
        else:
            assert BOS_ID not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == sentence


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_model_reloads_with_identical_logits(tmp_path, family, tied):
    import torch
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model(family, tmp_path, tied=tied)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is tied
    weights = _weights(folder)
    assert ("lm_head.weight" in weights) is not tied
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in weights

    ids = _tokenizer(folder)(SAMPLE_SENTENCES[0])["input_ids"]
    logits = torch_logits(folder, ids)
    model = AutoModelForCausalLM.from_pretrained(str(folder))  # default attention, not the helper's eager
    with torch.no_grad():
        again = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert relative_error(again, logits) < 1e-5
    # The larger init is there so that outputs are far from uniform.
    assert logits.std() > 0.5


def test_seed_decides_the_weights(tmp_path):
    first = _weights(make_tiny_model("llama", tmp_path / "a", seed=1, num_hidden_layers=1))
    again = _weights(make_tiny_model("llama", tmp_path / "b", seed=1, num_hidden_layers=1))
    other = _weights(make_tiny_model("llama", tmp_path / "c", seed=2, num_hidden_layers=1))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not np.array_equal(first[name], other[name])
    assert 0.15 < first[name].std() < 0.25
    assert abs(first["model.norm.weight"].mean() - 1.0) < 0.05


def test_gemma2_sliding_window_override_takes_effect(tmp_path):
    wide = make_tiny_model("gemma2", tmp_path / "wide", num_hidden_layers=2)
    narrow = make_tiny_model("gemma2", tmp_path / "narrow", num_hidden_layers=2, sliding_window=4)
    assert json.loads((narrow / "config.json").read_text())["sliding_window"] == 4
    ids = _tokenizer(wide)(SAMPLE_SENTENCES[0])["input_ids"]
    wide_logits, narrow_logits = torch_logits(wide, ids), torch_logits(narrow, ids)
    # Same weights; the window only hides keys more than 4 positions back.
    np.testing.assert_array_equal(wide_logits[:4], narrow_logits[:4])
    assert relative_error(narrow_logits[6:], wide_logits[6:]) > 1e-3


def test_gguf_f32_matches_safetensors(tmp_path, llama_untied):
    gguf_folder = tmp_path / "gguf"  # on its own: next to a tokenizer.json, transformers would read that instead
    gguf_folder.mkdir()
    write_gguf(llama_untied, gguf_folder / "model.gguf")

    reference, converted = _tokenizer(llama_untied), _tokenizer(gguf_folder, gguf_file="model.gguf")
    for sentence in SAMPLE_SENTENCES + ("  spaces\tand\nnewlines", "ünïcödé <|endoftext|>"):
        assert converted(sentence)["input_ids"] == reference(sentence)["input_ids"]
    assert converted("x")["input_ids"][0] == BOS_ID

    ids = reference(SAMPLE_SENTENCES[1])["input_ids"]
    assert relative_error(torch_logits(gguf_folder, ids, gguf_file="model.gguf"), torch_logits(llama_untied, ids)) < 1e-5


def test_gguf_tied_model_has_no_output_tensor(tmp_path):
    import gguf

    folder = make_tiny_model("llama", tmp_path / "hf", tied=True, num_hidden_layers=1)
    path = write_gguf(folder, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(path))
    names = {tensor.name for tensor in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    assert bool(reader.fields["tokenizer.ggml.add_bos_token"].contents()) is False
    ids = _tokenizer(folder)(SAMPLE_SENTENCES[0])["input_ids"]
    assert relative_error(torch_logits(tmp_path, ids, gguf_file="model.gguf"), torch_logits(folder, ids)) < 1e-5


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_gguf_storage_types_load_in_mlx(tmp_path, llama_untied, qtype):
    mx = pytest.importorskip("mlx.core")
    import gguf

    path = write_gguf(llama_untied, tmp_path / f"{qtype}.gguf", qtype=qtype)
    arrays, metadata = mx.load(str(path), return_metadata=True)
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|bos|>"]
    assert arrays["blk.0.attn_norm.weight"].dtype == mx.float32

    hf = _weights(llama_untied)
    expected = permute_for_gguf(hf["model.layers.0.self_attn.q_proj.weight"], 4, 4)
    if qtype == "F16":
        stored = np.array(arrays["blk.0.attn_q.weight"])
        np.testing.assert_array_equal(stored, expected.astype(np.float16))
        return
    # MLX turns Q8_0 / Q4_0 blocks into its affine triplet: packed uint32, float16 scales and biases.
    bits = {"Q8_0": 8, "Q4_0": 4}[qtype]
    weight, scales, biases = (arrays[f"blk.0.attn_q.{part}"] for part in ("weight", "scales", "biases"))
    assert weight.dtype == mx.uint32 and scales.dtype == mx.float16
    # In float32 the triplet is exactly what the GGUF blocks encode (in float16 it rounds to ~5e-4).
    dequantized = np.array(
        mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits)
    )
    raw = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(dequantized, gguf.quants.dequantize(raw.data, raw.tensor_type))
    assert relative_error(dequantized, expected) < {8: 0.01, 4: 0.15}[bits]


def test_write_gguf_rejects_other_families(tmp_path):
    folder = make_tiny_model("qwen2", tmp_path / "hf", num_hidden_layers=1)
    with pytest.raises(ValueError, match="llama"):
        write_gguf(folder, tmp_path / "model.gguf")
