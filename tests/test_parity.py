"""MLX against transformers, site by site, for every supported architecture.

Tiny random-weight models are built here in Hugging Face format (tests/model_factory.py) and run
through both mlxscan and transformers (float32, eager attention). transformers' side is read with
torch forward hooks at every place it exposes; interventions are mirrored by hooks doing the same
arithmetic. Then the real bundled SmolLM2, GGUF files written from the tiny models, and an
MLX-quantized folder as mlx-community publishes them.

Errors are relative: ||ours - theirs|| / ||theirs|| over the real (unpadded) tokens, per site and
per layer. Each tolerance's comment gives the worst case measured on the CPU build (MKL BLAS).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

# mlxscan before mlx: importing it first is what gives MLX's CPU build the fast BLAS (mlxscan/_blas.py);
# after mlx.core it silently keeps the slow reference BLAS, which is ~3x slower here and rounds differently.
import mlxscan  # noqa: E402, I001
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from model_factory import BOS_ID, BOS_TOKEN, make_tiny_model, write_gguf  # noqa: E402
from mlxscan.models import bundled_model_path  # noqa: E402
from mlxscan.verify import verify  # noqa: E402

pytestmark = pytest.mark.reference

PER_LAYER_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_act", "mlp_out", "resid_post")
ALL_RECORDED = (*PER_LAYER_SITES, "embed", "final_norm")

# Four texts of clearly different token lengths (6, 32, 52 and 84 tokens with the tiny tokenizer);
# all but the first are longer than the Gemma2 sliding window of 8.
TEXTS = (
    "The cat sat.",
    "In 1969, three astronauts flew to the Moon and back.",
    "She paid $7.99 for two coffees & a blueberry muffin, then walked home in the rain.",
    "The river runs north for 2,300 miles before it reaches the sea. When the storm passed, "
    "the birds began to sing again, and the old man watched them from his window.",
)
TOKENIZER_TEXTS = (
    "Hello world",
    "In 2024, 17 zebras paid $3.50 each (roughly 0.8% more).",
    "Naïve café owners in Zürich: 東京, Ελλάδα, emoji 🙂!",
    "two  spaces,   three   spaces and a tab\there",
    "line one\nline two\n\n  indented line\r\nwindows line",
    " leading space and trailing space ",
    "before <|endoftext|> after",  # a special token inside the text
)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# name -> make_tiny_model arguments. Every model has grouped-query attention (4 query heads, 2 kv heads).
TINY_MODELS = {
    "llama": dict(family="llama", tied=False, seed=1),
    "llama_tied_bos": dict(family="llama", tied=True, add_bos=True, seed=2),
    # Llama 3 frequency scaling: with head_dim 16 and original context 32 it changes 7 of 8 frequencies.
    "llama_rope_llama3": dict(family="llama", tied=False, seed=3, rope_parameters=LLAMA3_ROPE),
    # transformers 5 writes rope_theta only inside rope_parameters; mlx-lm alone would use 1e6.
    "qwen2": dict(family="qwen2", tied=False, seed=4),
    # Layers 0 and 2 attend within 8 tokens; TEXTS run to 84. model_factory draws Gemma's norm weights
    # w around 0, so the parity below fails for a norm that scales by w instead of (1 + w).
    "gemma2": dict(family="gemma2", tied=True, add_bos=True, seed=5, sliding_window=8),
    # Small caps, so that applying either soft-cap zero or two times is far off.
    "gemma2_softcap": dict(family="gemma2", tied=True, seed=6, final_logit_softcapping=3.0,
                           attn_logit_softcapping=5.0),
}

# Where each site is read in transformers' decoder layer: (submodule, "input" or "output"); "" is
# the decoder layer itself. Gemma2's branch outputs pass through a post-norm before the residual add.
LLAMA_TAPS = {
    "resid_pre": ("", "input"),
    "attn_out": ("self_attn", "output"),
    "resid_mid": ("post_attention_layernorm", "input"),  # Llama's pre-MLP norm reads resid + attn
    "mlp_act": ("mlp.down_proj", "input"),
    "mlp_out": ("mlp", "output"),
    "resid_post": ("", "output"),
}
GEMMA2_TAPS = {
    **LLAMA_TAPS,
    "attn_out": ("post_attention_layernorm", "output"),
    "resid_mid": ("pre_feedforward_layernorm", "input"),
    "mlp_out": ("post_feedforward_layernorm", "output"),
}


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


# ------------------------------------------------------------------------------------------------
# transformers' side, read with hooks


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def torch_sites(hf_model, token_ids, *, interventions=()) -> dict[str, np.ndarray]:
    """Every site of one unbatched sequence: per-layer sites [layers, seq, width], others [seq, width].

    interventions: (module, "pre" or "post", hook) registered before the recording hooks, so what is
    recorded is the changed value, as mlxscan records it.
    """
    taps = GEMMA2_TAPS if hf_model.config.model_type == "gemma2" else LLAMA_TAPS
    layers = hf_model.model.layers
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for module, kind, hook in interventions:
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        handles.append(register(hook, with_kwargs=kind == "pre"))
    try:
        for i, layer in enumerate(layers):
            for site, (path, kind) in taps.items():
                module = layer.get_submodule(path)
                if kind == "input":
                    hook = lambda _m, args, kwargs, key=(site, i): captured.__setitem__(key, _layer_input(args, kwargs))
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    hook = lambda _m, _args, out, key=(site, i): captured.__setitem__(key, _first(out))
                    handles.append(module.register_forward_hook(hook))
        handles.append(hf_model.model.norm.register_forward_hook(
            lambda _m, _args, out: captured.__setitem__(("final_norm", None), out)))
        out = hf_model(input_ids=torch.tensor([list(token_ids)]), output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    sites = {site: torch.stack([captured[(site, i)][0] for i in range(len(layers))]).numpy()
             for site in taps}
    sites["embed"] = out.hidden_states[0][0].numpy()
    sites["final_norm"] = captured[("final_norm", None)][0].numpy()
    sites["logits"] = out.logits[0].numpy()
    return sites


def load_torch(folder, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def hf_tokenizer(folder, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)


# ------------------------------------------------------------------------------------------------
# comparisons


def record_all(model, inputs, **kwargs):
    return model.run(list(inputs), sites=list(ALL_RECORDED), logits=True, **kwargs)


def site_errors(recording, references: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Worst relative error per site (per-layer sites: per layer, keyed "site[layer]") over sequences."""
    worst: dict[str, float] = {}
    for item, reference in enumerate(references):
        for site in reference:
            ours, theirs = recording.unpadded(site, item), reference[site]
            assert ours.shape == theirs.shape, f"{site}: shape {ours.shape} != {theirs.shape}"
            pairs = ([(f"{site}[{layer}]", ours[k], theirs[k]) for k, layer in enumerate(recording.layers)]
                     if site in PER_LAYER_SITES else [(site, ours, theirs)])
            for key, a, b in pairs:
                worst[key] = max(worst.get(key, 0.0), relative_error(a, b))
    return worst


def assert_within(errors: dict[str, float], tolerance: float, what: str) -> None:
    worst_key = max(errors, key=errors.get)
    print(f"{what}: worst {worst_key} {errors[worst_key]:.2e} over {len(errors)} comparisons")
    too_far = {key: f"{value:.2e}" for key, value in errors.items() if not value <= tolerance}
    assert not too_far, f"{what}: beyond {tolerance:.0e}: {too_far}"


def unpadded_recordings(recording) -> list[dict[str, np.ndarray]]:
    return [{site: recording.unpadded(site, item) for site in recording.sites}
            for item in range(len(recording.lengths))]


# ------------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Tiny:
    folder: object
    mlx: mlxscan.HookedModel
    torch: object
    tokenizer: object  # transformers' tokenizer for the folder


@pytest.fixture(scope="session")
def strict_float32():
    # conftest.py sets it; a TF32 matmul (on GPUs) would blur every tolerance below.
    assert os.environ.get("MLX_ENABLE_TF32") == "0", "parity runs need MLX_ENABLE_TF32=0"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_root, strict_float32):
    """tiny(name) -> Tiny: the model of TINY_MODELS[name], built on first use and kept for the session."""
    built: dict[str, Tiny] = {}

    def get(name: str) -> Tiny:
        if name not in built:
            spec = dict(TINY_MODELS[name])
            folder = make_tiny_model(spec.pop("family"), tiny_root / name, **spec)
            built[name] = Tiny(folder, mlxscan.load(folder), load_torch(folder), hf_tokenizer(folder))
        return built[name]

    return get


@pytest.fixture(scope="session")
def ggufs(tiny, tmp_path_factory):
    """(model name, qtype) -> path of a GGUF written from that tiny llama, alone in its folder."""
    root = tmp_path_factory.mktemp("gguf")
    paths = {}
    for name in ("llama", "llama_tied_bos"):
        for qtype in ("F32", "Q8_0"):
            folder = root / f"{name}-{qtype}"
            folder.mkdir()  # no tokenizer.json beside it: the tokenizer must come from the GGUF
            paths[name, qtype] = write_gguf(tiny(name).folder, folder / f"{name}.{qtype}.gguf", qtype=qtype)
    return paths


@dataclass
class Bundled:
    mlx: mlxscan.HookedModel
    torch: object  # transformers' model from the same GGUF (dequantized)
    tokenizer: object


@pytest.fixture(scope="session")
def bundled(strict_float32):
    path = bundled_model_path()
    return Bundled(mlxscan.load(), load_torch(path.parent, path.name), hf_tokenizer(path.parent, path.name))


# ------------------------------------------------------------------------------------------------
# every site, every family


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_every_site_matches_transformers(tiny, name):
    model = tiny(name)
    batched = record_all(model.mlx, TEXTS)
    assert batched.tokens == [model.tokenizer(text)["input_ids"] for text in TEXTS]
    references = [torch_sites(model.torch, tokens) for tokens in batched.tokens]
    # Worst measured over all six models, batched or alone: 2.0e-6 (llama attn_out, layer 2).
    assert_within(site_errors(batched, references), 2e-5, f"{name} batched vs transformers")
    for item, text in enumerate(TEXTS):
        alone = record_all(model.mlx, [text])
        assert_within(site_errors(alone, references[item:item + 1]), 2e-5, f"{name} text {item} alone vs transformers")


def test_the_traps_are_armed(tiny):
    """The configs really carry what a loader could misread, and the sliding window really bites."""
    qwen2 = json.loads((tiny("qwen2").folder / "config.json").read_text())
    assert "rope_theta" not in qwen2 and qwen2["rope_parameters"]["rope_theta"] == 10000.0
    llama3 = json.loads((tiny("llama_rope_llama3").folder / "config.json").read_text())
    assert "rope_scaling" not in llama3 and llama3["rope_parameters"]["rope_type"] == "llama3"
    gemma2 = tiny("gemma2")
    assert gemma2.mlx.sliding_window == 8 and gemma2.mlx.sliding_layers == {0, 2}
    assert max(len(gemma2.tokenizer(text)["input_ids"]) for text in TEXTS) > 3 * 8


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_batched_equals_one_by_one(tiny, name):
    model = tiny(name).mlx
    batched = record_all(model, TEXTS)
    lengths = sorted(batched.lengths.tolist())
    assert len(set(lengths)) == 4 and lengths[-1] >= 2 * lengths[1], f"lengths not varied enough: {lengths}"
    for site in batched.sites:
        assert np.isfinite(batched[site]).all(), f"{site} has NaN or inf"
    singles = [unpadded_recordings(record_all(model, [text]))[0] for text in TEXTS]
    # Worst measured 9.7e-7 (llama mlp_out): MKL blocks a gemm differently for other batch shapes;
    # with MLX's reference BLAS it is exactly 0.
    assert_within(site_errors(batched, singles), 1e-5, f"{name} batched vs one by one")


# ------------------------------------------------------------------------------------------------
# interventions


def test_interventions_match_torch_hooks(tiny):
    model = tiny("llama")
    rng = np.random.default_rng(0)
    vector = rng.normal(size=model.mlx.d_model).astype(np.float32)
    units = [3, 17, 64, 127]
    layers = model.torch.model.layers
    v = torch.from_numpy(vector)

    def add_to_output(_module, _args, output):
        return (output[0] + 2.0 * v, *output[1:]) if isinstance(output, tuple) else output + 2.0 * v

    def zero_units(_module, args, kwargs):
        x = _layer_input(args, kwargs).clone()
        x[..., units] = 0.0
        return (x, *args[1:]), kwargs

    cases = {
        "add": (mlxscan.Add("resid_post", layer=1, vector=vector, scale=2.0), (layers[1], "post", add_to_output)),
        "ablate": (mlxscan.Ablate("mlp_act", layer=0, units=units), (layers[0].mlp.down_proj, "pre", zero_units)),
    }
    clean = record_all(model.mlx, TEXTS[1:3])
    for case, (intervention, mirror) in cases.items():
        steered = record_all(model.mlx, TEXTS[1:3], interventions=[intervention])
        references = [torch_sites(model.torch, tokens, interventions=[mirror]) for tokens in steered.tokens]
        # Worst measured 1.6e-6 (Ablate; attn_out, layer 2).
        assert_within(site_errors(steered, references), 2e-5, f"{case} vs torch hook")
        assert [effect.relative_change > 0 for effect in steered.effects] == [True], steered.effects
        # The intervention must have moved the logits, or the comparison above proves nothing.
        assert relative_error(steered.logits, clean.logits) > 1e-2, case


# ------------------------------------------------------------------------------------------------
# Gemma 2 soft-capping, tied embeddings


def test_gemma2_logits_are_soft_capped_exactly_once(tiny):
    model = tiny("gemma2_softcap")
    cap = model.mlx.config["final_logit_softcapping"]
    recording = record_all(model.mlx, TEXTS[2:])
    embeddings = np.array(model.mlx.module.model.embed_tokens.weight)
    for item, tokens in enumerate(recording.tokens):
        raw = recording.unpadded("final_norm", item) @ embeddings.T
        once = cap * np.tanh(raw / cap)
        twice = cap * np.tanh(once / cap)
        ours = recording.unpadded("logits", item)
        theirs = torch_sites(model.torch, tokens)["logits"]
        assert relative_error(ours, once) < 1e-6  # worst measured 1.4e-7
        assert relative_error(ours, theirs) < 2e-5  # worst measured 5.8e-7
        # Smallest measured: 0.24 from the uncapped logits, 0.14 from the twice-capped ones; both
        # thousands of times the tolerances above, so a missing or doubled cap cannot pass.
        assert relative_error(ours, raw) > 0.1
        assert relative_error(ours, twice) > 0.05


def test_tied_logits_are_final_norm_times_embeddings(tiny):
    model = tiny("llama_tied_bos").mlx
    assert not hasattr(model.module, "lm_head")  # the logits can only come from the embeddings
    recording = record_all(model, TEXTS)
    embeddings = np.array(model.module.model.embed_tokens.weight)
    for item in range(len(TEXTS)):
        expected = recording.unpadded("final_norm", item) @ embeddings.T
        # Worst measured 1.2e-7: the same float32 product, summed in another order.
        assert relative_error(recording.unpadded("logits", item), expected) < 1e-6


def test_untied_config_without_head_is_an_error(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    source = tiny("llama").folder
    for file in source.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, tmp_path / file.name)
    weights = load_file(source / "model.safetensors")
    assert "lm_head.weight" in weights
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(mlxscan.MlxscanError, match="lm_head"):
        mlxscan.load(tmp_path)


# ------------------------------------------------------------------------------------------------
# tokenizers


def assert_same_ids(model, reference_tokenizer, texts=TOKENIZER_TEXTS) -> None:
    for text in texts:
        assert model.tokenize(text) == reference_tokenizer(text)["input_ids"], repr(text)


@pytest.mark.parametrize("name", ["llama", "llama_tied_bos"])
def test_tokens_equal_transformers(tiny, name):
    model = tiny(name)
    assert_same_ids(model.mlx, model.tokenizer)
    first = model.tokenizer("Hello")["input_ids"][0]
    assert (first == BOS_ID) == TINY_MODELS[name].get("add_bos", False)


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_bos_is_never_doubled(tiny, ggufs, source):
    # transformers' own tokenizer would give two BOS ids here; a text that already starts with it gets one.
    model = tiny("llama_tied_bos").mlx if source == "folder" else mlxscan.load(ggufs["llama_tied_bos", "F32"])
    text = "Hello world"
    assert model.tokenize(text)[0] == BOS_ID
    ids = model.tokenize(BOS_TOKEN + text)
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
    assert ids == model.tokenize(text)


def test_bundled_tokens_equal_transformers(bundled):
    assert_same_ids(bundled.mlx, bundled.tokenizer, (*TOKENIZER_TEXTS, *TEXTS, "<|im_start|>user\nHi<|im_end|>"))


# ------------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("name", ["llama", "llama_tied_bos"])
def test_gguf_f32_equals_safetensors(tiny, ggufs, name):
    folder_model = tiny(name).mlx
    gguf_model = mlxscan.load(ggufs[name, "F32"])
    assert (gguf_model.config["tie_word_embeddings"], gguf_model.config["rope_theta"]) == (
        folder_model.config["tie_word_embeddings"], 10000.0)
    tokens = [folder_model.tokenize(text) for text in TEXTS]
    expected = unpadded_recordings(record_all(folder_model, tokens))
    # Measured exactly 0: the same float32 weights (Q/K rows permuted and back) through the same kernels.
    assert_within(site_errors(record_all(gguf_model, tokens), expected), 1e-6, f"{name} GGUF F32 vs safetensors")
    assert_same_ids(gguf_model, tiny(name).tokenizer, (*TOKENIZER_TEXTS, *TEXTS))


@pytest.mark.parametrize("name", ["llama", "llama_tied_bos"])
def test_gguf_q8_matches_transformers_and_packed_path(tiny, ggufs, name):
    path = ggufs[name, "Q8_0"]
    dequantized = mlxscan.load(path)
    assert not dequantized.quantized
    tokens = [dequantized.tokenize(text) for text in TEXTS]
    recording = record_all(dequantized, tokens)
    reference_model = load_torch(path.parent, path.name)
    references = [torch_sites(reference_model, ids) for ids in tokens]
    # Worst measured 2.5e-6 (llama attn_out, layer 2): both sides dequantize Q8_0 exactly.
    assert_within(site_errors(recording, references), 2e-5, f"{name} GGUF Q8_0 vs transformers")

    packed = mlxscan.load(path, dequantize=False)
    assert packed.quantized
    drift = site_errors(record_all(packed, tokens), unpadded_recordings(recording))
    # MLX's quantized matmul against a dense one on the same dequantized values: measured drift
    # 2.1e-6 (llama attn_out, layer 2), rounding only.
    assert_within(drift, 1e-4, f"{name} GGUF Q8_0 packed vs dequantized")
    assert_same_ids(dequantized, tiny(name).tokenizer, (*TOKENIZER_TEXTS, *TEXTS))


# ------------------------------------------------------------------------------------------------
# an MLX-quantized folder (mlx-community layout)


@pytest.fixture(scope="session")
def mlx_quantized_folder(tiny, tmp_path_factory):
    source = tiny("llama").folder
    folder = tmp_path_factory.mktemp("mlx-4bit")
    module = mlxscan.load(source).module  # a fresh copy: the shared fixture's weights stay float32
    nn.quantize(module, group_size=32, bits=4)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(module.parameters())),
                        metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def test_mlx_quantized_folder_loads_and_verifies(mlx_quantized_folder):
    dequantized = mlxscan.load(mlx_quantized_folder)
    assert not dequantized.quantized and dequantized.module.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
    assert mlxscan.load(mlx_quantized_folder, dequantize=False).quantized is True
    report = verify(mlx_quantized_folder, TEXTS)
    print(f"MLX 4-bit folder: logits {report.logits_rel_err:.2e}, layers {max(report.hidden_rel_err):.2e}, "
          f"drift {report.quantized_drift}")
    # Measured 1.9e-6 logits, 1.8e-6 worst layer; drift of the packed 4-bit path 1.3e-6 (logits).
    assert report.ok and report.logits_rel_err <= 1e-4 and max(report.hidden_rel_err) <= 1e-4
    assert report.quantized_drift is not None and report.quantized_drift["logits_rel_err"] <= 1e-4


# ------------------------------------------------------------------------------------------------
# the real bundled SmolLM2


def test_bundled_model_verifies():
    report = verify()
    print(f"bundled: logits {report.logits_rel_err:.2e}, worst layer {max(report.hidden_rel_err):.2e}, "
          f"top1 {report.top1_agree}, drift {report.quantized_drift and report.quantized_drift['logits_rel_err']}")
    # Measured 2.2e-6 logits, 4.1e-6 worst layer (30 layers deep); packed Q4_1 drift 3.3e-6.
    assert report.ok
    assert report.logits_rel_err <= 1e-4 and max(report.hidden_rel_err) <= 1e-4
    assert report.top1_agree == 1.0
    assert report.quantized_drift["logits_rel_err"] <= 1e-4


def test_bundled_neurons_and_attention_match_transformers(bundled):
    layers = [0, bundled.mlx.n_layers // 2, bundled.mlx.n_layers - 1]
    recording = bundled.mlx.run(list(TEXTS[:2]), sites=["mlp_act", "attn_out"], layers=layers)
    references = []
    for tokens in recording.tokens:
        sites = torch_sites(bundled.torch, tokens)
        references.append({site: sites[site][layers] for site in ("mlp_act", "attn_out")})
    # Worst measured 3.1e-6 (mlp_act, layer 15).
    assert_within(site_errors(recording, references), 5e-5, "bundled mlp_act / attn_out vs transformers")
