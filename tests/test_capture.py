"""The hooked forward pass: intervention arithmetic, effects, input checks, temporary hooks, parity
with mlx-lm's own forward, batching, and a runtime path free of torch.

Intervention tests use a tiny random Llama (3 layers, d_model 64, d_mlp 128, vocab 360, context
256) so that every expected value can be computed by hand from an un-intervened recording; the
bundled SmolLM2-135M-Instruct covers what only a real model shows (batching, the known answer).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import mlxscan  # before mlx.core: importing mlxscan first gives MLX the fast BLAS

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlxscan import Ablate, Add, Map, MlxscanError, Project, Scale  # noqa: E402
from mlxscan.capture import forward  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog."
# Four unequal lengths (1, 5, 18 and 9 tokens on the bundled model), so right padding is exercised.
BATCH_TEXTS = (
    "Hi",
    "The capital of France is",
    "A robin is a kind of bird, and a hammer is a kind of tool.",
    "She counted seven red apples, then gave three",
)
SLIDING_WINDOW = 8  # the tiny Gemma 2's window: small enough that TEXT (27 tokens) reaches past it
LAYER_SITES = tuple(mlxscan.LAYER_SITES)


# ----------------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """tiny_models(family) -> a tiny random model of that family, built and loaded once per session."""
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    loaded = {}

    def get(family: str):
        if family not in loaded:
            overrides = {"sliding_window": SLIDING_WINDOW} if family == "gemma2" else {}
            folder = make_tiny_model(family, root / family, **overrides)
            with pytest.MonkeyPatch.context() as patch:
                # Throwaway folders get new tokenizer cache keys every session: keep them out of ~/.cache.
                patch.setenv("MLXSCAN_CACHE", str(root / "cache"))
                loaded[family] = mlxscan.load(folder)
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="session")
def tiny_base(tiny):
    """The un-intervened recording of every per-layer site for TEXT: what the interventions are measured against."""
    return tiny.run(TEXT, sites=LAYER_SITES)


@pytest.fixture(scope="session")
def bundled():
    return mlxscan.load()


# ----------------------------------------------------------------------------------------------------
# Helpers


def random_vector(width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(width).astype(np.float32)


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def split_along(x: np.ndarray, direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coefficient of each row along the unit direction, the part orthogonal to it)."""
    u = unit(direction)
    along = x @ u
    return along, x - along[..., None] * u


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected|| (Frobenius, float64)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def max_relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: one scale-free number even where some units are huge."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_close(actual, expected, atol: float) -> None:
    worst = float(np.abs(np.asarray(actual) - np.asarray(expected)).max())
    assert worst <= atol, f"max abs difference {worst:.3e} > {atol:.0e}"


def intervened(model, *interventions, inputs=TEXT, sites=LAYER_SITES, logits=False):
    return model.run(inputs, sites=sites, logits=logits, interventions=interventions)


def at(recording, site: str, layer: int) -> np.ndarray:
    """The first sequence's value of a per-layer site at a model layer: [seq, width]."""
    return recording[site][0, recording.layer_index(layer)]


def down_projs(model) -> list:
    return [block.mlp.down_proj for block in model.module.model.layers]


# ----------------------------------------------------------------------------------------------------
# 1. Intervention arithmetic, against hand-computed answers


def test_add_shifts_its_site_by_the_scaled_vector_and_nothing_before_it(tiny, tiny_base):
    vector = random_vector(tiny.d_model, seed=1)
    recording = intervened(tiny, Add("resid_post", 1, vector, scale=0.5))

    assert_close(at(recording, "resid_post", 1), at(tiny_base, "resid_post", 1) + 0.5 * vector, atol=1e-6)
    for site in LAYER_SITES:  # everything up to the intervention is untouched
        assert np.array_equal(at(recording, site, 0), at(tiny_base, site, 0)), site
    assert np.array_equal(at(recording, "resid_pre", 1), at(tiny_base, "resid_pre", 1))
    assert np.array_equal(at(recording, "resid_pre", 2), at(recording, "resid_post", 1))  # the change flows on
    assert relative_error(at(recording, "resid_post", 2), at(tiny_base, "resid_post", 2)) > 1e-2


def test_add_at_a_list_of_layers_applies_at_each(tiny):
    vector = random_vector(tiny.d_model, seed=2)
    first_only = intervened(tiny, Add("resid_post", 0, vector))
    both = intervened(tiny, Add("resid_post", [0, 2], vector))

    assert np.array_equal(at(both, "resid_post", 0), at(first_only, "resid_post", 0))
    assert np.array_equal(at(both, "resid_post", 1), at(first_only, "resid_post", 1))
    # Layer 2 sees the layer-0 change like the single Add does, then gets its own.
    assert_close(at(both, "resid_post", 2), at(first_only, "resid_post", 2) + vector, atol=1e-6)
    assert [effect.layer for effect in both.effects] == [0, 2]


ABLATED_UNITS = [3, 17, 100]


def test_ablate_zeroes_the_units_and_leaves_the_others(tiny, tiny_base):
    recording = intervened(tiny, Ablate("mlp_act", 1, ABLATED_UNITS))
    after, before = at(recording, "mlp_act", 1), at(tiny_base, "mlp_act", 1)
    others = np.setdiff1d(np.arange(tiny.d_mlp), ABLATED_UNITS)

    assert np.all(after[:, ABLATED_UNITS] == 0)
    assert np.array_equal(after[:, others], before[:, others])
    assert np.abs(before[:, ABLATED_UNITS]).min() > 0  # so the zeros above are the ablation's doing


@pytest.mark.parametrize("per_site_mean", [False, True], ids=["mean-per-ablated-unit", "mean-per-site-unit"])
def test_ablate_mean_sets_the_units_to_the_mean(tiny, tiny_base, per_site_mean):
    fill = np.array([0.5, -1.25, 2.0], np.float32)
    mean = fill
    if per_site_mean:  # one value per unit of the site; only the ablated units' values are used
        mean = np.full(tiny.d_mlp, 99.0, np.float32)
        mean[ABLATED_UNITS] = fill
    after = at(intervened(tiny, Ablate("mlp_act", 1, ABLATED_UNITS, mode="mean", mean=mean)), "mlp_act", 1)
    others = np.setdiff1d(np.arange(tiny.d_mlp), ABLATED_UNITS)

    assert np.array_equal(after[:, ABLATED_UNITS], np.broadcast_to(fill, after[:, ABLATED_UNITS].shape))
    assert np.array_equal(after[:, others], at(tiny_base, "mlp_act", 1)[:, others])


def test_project_removes_the_direction_and_keeps_the_rest(tiny, tiny_base):
    direction = random_vector(tiny.d_model, seed=3)
    after = at(intervened(tiny, Project("resid_mid", 1, direction)), "resid_mid", 1)
    before = at(tiny_base, "resid_mid", 1)
    along_after, orthogonal_after = split_along(after, direction)
    along_before, orthogonal_before = split_along(before, direction)

    assert np.abs(along_before).min() > 1e-2  # there was a component to remove
    assert np.max(np.abs(along_after) / np.linalg.norm(before, axis=-1)) <= 1e-5
    assert_close(orthogonal_after, orthogonal_before, atol=1e-5)


def test_scale_multiplies_the_whole_site(tiny, tiny_base):
    after = at(intervened(tiny, Scale("attn_out", 1, 2.5)), "attn_out", 1)
    assert_close(after, 2.5 * at(tiny_base, "attn_out", 1), atol=1e-6)


def test_scale_along_a_direction_scales_only_that_component(tiny, tiny_base):
    direction = random_vector(tiny.d_model, seed=4)
    after = at(intervened(tiny, Scale("resid_pre", 2, 0.25, direction=direction)), "resid_pre", 2)
    along_after, orthogonal_after = split_along(after, direction)
    along_before, orthogonal_before = split_along(at(tiny_base, "resid_pre", 2), direction)

    assert_close(along_after, 0.25 * along_before, atol=1e-5)
    assert_close(orthogonal_after, orthogonal_before, atol=1e-5)


def test_map_applies_any_function_and_rejects_a_wrong_shape(tiny, tiny_base):
    after = at(intervened(tiny, Map("mlp_out", 1, fn=lambda x: 0.5 * x + 1.0)), "mlp_out", 1)
    assert_close(after, 0.5 * at(tiny_base, "mlp_out", 1) + 1.0, atol=1e-6)
    with pytest.raises(MlxscanError, match=r"must return an MLX array of shape"):
        tiny.run(TEXT, sites=["mlp_out"], interventions=[Map("mlp_out", 1, fn=lambda x: x[..., :3])])


def test_last_position_means_each_sequences_own_last_real_token(tiny):
    lengths = (3, 9, 6)
    batch = [list(range(10, 10 + n)) for n in lengths]  # right-padded to 9
    vector = random_vector(tiny.d_model, seed=5)
    before = tiny.run(batch, sites=["resid_post"])
    after = tiny.run(batch, sites=["resid_post"], interventions=[Add("resid_post", 1, vector, positions=[-1])])

    change = after["resid_post"][:, 1] - before["resid_post"][:, 1]  # [batch, seq, d_model]
    for row, length in enumerate(lengths):
        expected = np.zeros_like(change[row])
        expected[length - 1] = vector
        assert_close(change[row], expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 2. RMSNorm invariance: the final norm undoes a scale of the last residual, nothing undoes layer 0's


@pytest.mark.parametrize("model_name", ["tiny", "bundled"])
def test_final_norm_undoes_scaling_the_last_residual(request, model_name):
    model = request.getfixturevalue(model_name)
    ids = model.tokenize(TEXT)
    clean = model.run(ids, logits=True).logits
    scaled_last = intervened(model, Scale("resid_post", model.n_layers - 1, 3.0), inputs=ids, sites=(), logits=True)
    scaled_first = intervened(model, Scale("resid_post", 0, 3.0), inputs=ids, sites=(), logits=True)

    # RMSNorm(3x) = 3x / sqrt(9 ms(x) + eps) differs from RMSNorm(x) only through eps: a relative
    # ~(4/9) eps / ms(x), about 1e-7 for the tiny model (ms ~ 34, eps 1e-5) and less for SmolLM2
    # (ms ~ 430). Measured logits relative error: 2.1e-7 (tiny), 3.6e-7 (bundled), float32 rounding.
    assert relative_error(scaled_last.logits, clean) <= 1e-5
    # Measured 0.62 (tiny) and 0.98 (bundled).
    assert relative_error(scaled_first.logits, clean) > 0.1


# ----------------------------------------------------------------------------------------------------
# 3. Effects: one per (intervention, layer), with planted sizes


def test_effects_report_every_placement_with_its_size(tiny):
    batch = [list(range(10, 10 + n)) for n in (4, 7, 2)]
    real_tokens = 4 + 7 + 2
    vector = random_vector(tiny.d_model, seed=6)
    recording = tiny.run(batch, interventions=[
        Add("resid_pre", 0, vector, scale=0.5),
        Scale("mlp_act", [1, 2], 3.0),
        Add("attn_out", 1, np.zeros(tiny.d_model)),
        Add("resid_post", 2, vector, positions=[-1]),
    ])
    effects = {(effect.site, effect.layer): effect for effect in recording.effects}

    assert len(recording.effects) == len(effects) == 5
    # resid_pre[0] is the embedding: ||0.5 v|| on each real token against the embeddings' norm.
    embeddings = tiny.run(batch, sites=["embed"])["embed"]  # padding zeroed
    planted = 0.5 * np.linalg.norm(vector) * np.sqrt(real_tokens) / np.linalg.norm(embeddings)
    assert effects["resid_pre", 0].relative_change == pytest.approx(planted, rel=1e-5)
    for layer in (1, 2):
        assert effects["mlp_act", layer].relative_change == pytest.approx(2.0, rel=1e-5)  # |3 - 1|
    assert effects["attn_out", 1].relative_change == 0.0
    assert effects["resid_post", 2].relative_change > 0
    assert effects["resid_post", 2].tokens_touched == len(batch)  # one last token per sequence
    for place in [("resid_pre", 0), ("mlp_act", 1), ("mlp_act", 2), ("attn_out", 1)]:
        assert effects[place].tokens_touched == real_tokens  # padding never counts
    assert effects["attn_out", 1].intervention == "Add('attn_out', layer=1)"


# ----------------------------------------------------------------------------------------------------
# 4. Bad input: MlxscanError with a pointed message, before anything runs


def with_intervention(make):
    """A call that runs TEXT with the intervention `make(model)` builds."""
    return lambda model: model.run(TEXT, interventions=[make(model)])


def ones(model, width=None):
    return np.ones(model.d_model if width is None else width, np.float32)


# case -> (the call, a regex its message must match); the tiny model has 3 layers, d_model 64, d_mlp 128.
ERROR_CASES = {
    "unknown site": (lambda m: m.run(TEXT, sites=["resid"]), r"unknown site 'resid'"),
    "unknown intervention site": (with_intervention(lambda m: Add("residual", 0, ones(m))), r"unknown site 'residual'"),
    "recorded layer out of range": (lambda m: m.run(TEXT, sites=["resid_post"], layers=[m.n_layers]),
                                    r"layer 3 does not exist"),
    "intervention layer out of range": (with_intervention(lambda m: Add("resid_post", m.n_layers, ones(m))),
                                        r"layer 3 does not exist"),
    "per-layer site without a layer": (with_intervention(lambda m: Add("resid_post", None, ones(m))), r"needs a layer"),
    "embed with a layer": (with_intervention(lambda m: Add("embed", 0, ones(m))), r"has no layers"),
    "vector of the wrong width": (with_intervention(lambda m: Add("resid_post", 0, ones(m, m.d_model - 1))),
                                  r"63 values but site 'resid_post' is 64 wide"),
    "d_model vector on the mlp_act site": (with_intervention(lambda m: Add("mlp_act", 0, ones(m))),
                                           r"64 values but site 'mlp_act' is 128 wide"),
    "zero direction in Project": (with_intervention(lambda m: Project("resid_mid", 0, np.zeros(m.d_model))),
                                  r"all zeros"),
    "zero direction in Scale": (with_intervention(lambda m: Scale("resid_mid", 0, 2.0, direction=np.zeros(m.d_model))),
                                r"all zeros"),
    "ablated unit out of range": (with_intervention(lambda m: Ablate("mlp_act", 0, [1, m.d_mlp])),
                                  r"unit indices must lie in 0\.\.127"),
    "mean ablation without a mean": (with_intervention(lambda m: Ablate("mlp_act", 0, [1], mode="mean")),
                                     r"needs mean="),
    "not an intervention": (with_intervention(lambda m: ("resid_post", 0)), r"is not an intervention"),
    "empty text": (lambda m: m.run(""), r"input 0 is an empty text"),
    "blank text in a batch": (lambda m: m.run([TEXT, "   "]), r"input 1 is an empty text"),
    "token id past the vocabulary": (lambda m: m.run([[5, m.vocab_size]]), r"outside 0\.\.359"),
    "negative token id": (lambda m: m.run([[-1, 5]]), r"outside 0\.\.359"),
    "longer than the context": (lambda m: m.run([list(range(10, 310))]),
                                r"300 tokens, longer than the model's context of 256"),
}


@pytest.fixture
def forbid_forward_pass(monkeypatch):
    """Fail the test if a block is even built: input errors must come before the model runs."""
    def refuse(*args):
        raise AssertionError("the forward pass started before the input was rejected")

    monkeypatch.setattr(forward, "_block", refuse)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_rejected_before_running(tiny, forbid_forward_pass, case):
    call, message = ERROR_CASES[case]
    with pytest.raises(MlxscanError, match=message):
        call(tiny)


def test_unknown_site_message_lists_the_valid_sites(tiny):
    with pytest.raises(MlxscanError) as caught:
        tiny.run(TEXT, sites=["mlp_post"])
    assert all(site in str(caught.value) for site in mlxscan.ALL_SITES), str(caught.value)


# ----------------------------------------------------------------------------------------------------
# 5. Hooks are temporary, even when a run fails half-way


class ExplodingIntervention(mlxscan.Intervention):
    """Passes every check, then fails inside the forward pass."""

    def transform(self, x):
        raise RuntimeError("exploded mid-pass")


@pytest.mark.parametrize("site", ["mlp_act", "resid_post"])
def test_hooks_are_removed_after_runs_and_failures(tiny, site):
    originals = down_projs(tiny)
    clean = tiny.run(TEXT, logits=True).logits

    tiny.run(TEXT, sites=["mlp_act"])
    assert all(now is before for now, before in zip(down_projs(tiny), originals))
    with pytest.raises(RuntimeError, match="exploded mid-pass"):  # down_proj is wrapped when it explodes
        tiny.run(TEXT, sites=["mlp_act"], logits=True, interventions=[ExplodingIntervention(site, 1)])
    assert all(now is before for now, before in zip(down_projs(tiny), originals))
    assert np.array_equal(tiny.run(TEXT, logits=True).logits, clean)


# ----------------------------------------------------------------------------------------------------
# 6. With nothing attached, the hooked forward is mlx-lm's forward


def bare_forward_difference(model, ids, *, fast_cpu_math: bool = False) -> float:
    """Largest |logit| difference between mlx-lm's own Model call and our hooked run.

    With fast_cpu_math off our MLP activation is MLX's own op, as in mlx-lm, so the runs can be identical.
    """
    theirs = np.array(model.module(mx.array([ids]))[0])
    model.fast_cpu_math = fast_cpu_math
    try:
        ours = model.run(ids, logits=True).logits[0]
    finally:
        model.fast_cpu_math = True
    return float(np.abs(ours - theirs).max())


def test_fast_cpu_activation_stays_at_float32_rounding(bundled):
    ids = bundled.tokenize(TEXT)
    scale = float(np.abs(np.array(bundled.module(mx.array([ids]))[0])).max())
    # The polynomial exp is within 2e-7 relative; through 30 layers the logits moved 1.9e-6 of their range.
    assert bare_forward_difference(bundled, ids, fast_cpu_math=True) <= 2e-5 * scale


# The same modules, except attention on the CPU: the query heads that share a key/value head go through one
# product (forward._grouped_attention), the same arithmetic in another order. Measured: the bundled model's
# logits 2.0e-5 apart (1e-6 of their range); with mlx-lm's own attention, 0.0.
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bare_forward_equals_mlx_lm_on_tiny_models(tiny_models, family, monkeypatch):
    model = tiny_models(family)
    ids = model.tokenize(TEXT)
    scale = float(np.abs(np.array(model.module(mx.array([ids]))[0])).max())
    assert bare_forward_difference(model, ids) <= 2e-6 * scale
    monkeypatch.setattr(forward, "GROUPED_CPU_ATTENTION", False)
    assert bare_forward_difference(model, ids) <= 1e-6


def test_bare_forward_equals_mlx_lm_on_the_bundled_model(bundled, monkeypatch):
    ids = bundled.tokenize(TEXT)
    scale = float(np.abs(np.array(bundled.module(mx.array([ids]))[0])).max())
    assert bare_forward_difference(bundled, ids) <= 2e-6 * scale
    monkeypatch.setattr(forward, "GROUPED_CPU_ATTENTION", False)
    assert bare_forward_difference(bundled, ids) <= 1e-6


def test_gemma2_equals_mlx_lm_inside_the_sliding_window_only(tiny_models):
    model = tiny_models("gemma2")
    ids = model.tokenize(TEXT)
    assert len(ids) > SLIDING_WINDOW
    assert bare_forward_difference(model, ids[: SLIDING_WINDOW - 1]) <= 1e-6  # measured 0.0
    # mlx-lm's gemma2 attends to everything; ours keeps the window on local layers (measured 5.3).
    assert bare_forward_difference(model, ids) > 1e-2


# ----------------------------------------------------------------------------------------------------
# 7. Batching: right padding changes nothing on the real tokens


@pytest.fixture(scope="session")
def bundled_batch(bundled):
    return bundled.run(list(BATCH_TEXTS), sites=list(mlxscan.ALL_SITES))


def test_batch_bookkeeping(bundled, bundled_batch):
    lengths = [len(bundled.tokenize(text)) for text in BATCH_TEXTS]
    assert bundled_batch.lengths.tolist() == lengths
    assert len(set(lengths)) == len(lengths)  # unequal, so every sequence but the longest is padded
    assert bundled_batch.layers == tuple(range(bundled.n_layers))
    for site in mlxscan.ALL_SITES:
        array = bundled_batch[site]
        assert not np.isnan(array).any(), site
        for row, length in enumerate(lengths):
            unpadded = bundled_batch.unpadded(site, row)
            width = array.shape[-1]
            expected = (bundled.n_layers, length, width) if site in mlxscan.LAYER_SITES else (length, width)
            assert unpadded.shape == expected, site
            assert np.all(array[row, ..., length:, :] == 0), f"{site}: padding of sequence {row} is not zero"


def test_batched_run_equals_one_by_one_runs(bundled, bundled_batch):
    worst = {}
    for row, text in enumerate(BATCH_TEXTS):
        alone = bundled.run(text, sites=list(mlxscan.ALL_SITES))
        for site in mlxscan.ALL_SITES:
            error = max_relative_error(bundled_batch.unpadded(site, row), alone[site][0])
            worst[site] = max(worst.get(site, 0.0), error)
    # Measured at most 2.2e-6 (logits); other sites 2e-7..1.6e-6. Different matmul shapes round differently.
    assert max(worst.values()) <= 1e-5, worst


FRAMED_TEXTS = tuple(f"She wrote the word {word} on the board." for word in
                     ("dog", "strawberry", "hammer", "blue", "elephant", "seven"))
TOKEN_SITES = tuple(site for site in mlxscan.ALL_SITES if site not in ("attn_head", "attn_pattern"))


@pytest.fixture
def prefix_runs(monkeypatch):
    """How many batches ran through the shared-prefix path (taken for any saving, however small)."""
    monkeypatch.setattr(forward, "MIN_TOKENS_SAVED", 1)
    calls = []
    original = forward._run_after_shared_prefix
    monkeypatch.setattr(forward, "_run_after_shared_prefix", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("model_name", ["bundled", "qwen2"])
def test_a_shared_prefix_runs_once_and_every_row_equals_its_own_run(request, tiny_models, model_name, prefix_runs):
    model = request.getfixturevalue("bundled") if model_name == "bundled" else tiny_models(model_name)
    token_lists = [model.tokenize(text) for text in FRAMED_TEXTS]
    assert forward.shared_prefix_length(token_lists) >= 4  # "She wrote the word"
    batch = forward.run_tokens(model, token_lists, sites=TOKEN_SITES, prefix_reuse=forward.PrefixReuse())
    weights = np.random.default_rng(0).random((len(token_lists), max(map(len, token_lists)))).astype(np.float32)
    weights[np.arange(weights.shape[1])[None, :] >= np.array([len(t) for t in token_lists])[:, None]] = 0
    pooled = forward.run_tokens(model, token_lists, sites=TOKEN_SITES, pool_weights=weights,
                                prefix_reuse=forward.PrefixReuse())
    assert len(prefix_runs) == 2
    for row, tokens in enumerate(token_lists):
        alone = forward.run_tokens(model, [tokens], sites=TOKEN_SITES)
        for site in TOKEN_SITES:
            assert max_relative_error(batch.unpadded(site, row), alone[site][0]) <= 1e-5, site
            expected = np.tensordot(weights[row, :len(tokens)], alone[site][0], axes=([0], [-2]))
            assert max_relative_error(pooled[site][row], expected) <= 1e-5, site


def test_prefix_reuse_runs_a_frame_s_prefix_once_across_batches(bundled, monkeypatch):
    monkeypatch.setattr(forward, "MIN_TOKENS_SAVED", 1)
    passes = []
    original = forward._prefix_pass
    monkeypatch.setattr(forward, "_prefix_pass", lambda *a, **k: passes.append(1) or original(*a, **k))
    first, second = ([bundled.tokenize(text) for text in FRAMED_TEXTS[i:i + 3]] for i in (0, 3))
    other = [bundled.tokenize(f"Please say {word} out loud.") for word in ("dog", "hammer", "seven", "blue", "nurse")]
    reuse = forward.PrefixReuse()
    runs = [forward.run_tokens(bundled, batch, sites=["resid_post", "mlp_act"], prefix_reuse=reuse)
            for batch in (first, second, other)]
    assert len(passes) == 2  # "She wrote the word" once for two batches, "Please say" once
    for batch, run in zip((first, second, other), runs):
        fresh = forward.run_tokens(bundled, batch, sites=["resid_post", "mlp_act"], prefix_reuse=forward.PrefixReuse())
        for site in ("resid_post", "mlp_act"):
            assert np.array_equal(run[site], fresh[site]), site


def test_interventions_head_sites_and_plain_calls_take_the_plain_path(bundled, prefix_runs):
    token_lists = [bundled.tokenize(text) for text in FRAMED_TEXTS]
    forward.run_tokens(bundled, token_lists, sites=["attn_head"], layers=[3], prefix_reuse=forward.PrefixReuse())
    forward.run_tokens(bundled, token_lists, sites=["resid_post"], prefix_reuse=forward.PrefixReuse(),
                       interventions=[mlxscan.Scale("resid_post", 2, 0.5)])
    forward.run_tokens(bundled, token_lists, sites=["resid_post"])  # off unless asked for
    assert not prefix_runs


def test_a_batch_without_a_shared_prefix_worth_a_pass_takes_the_plain_path():
    assert forward.shared_prefix_length([[1, 2, 3], [4, 2, 3]] * 20) == 0
    assert forward.shared_prefix_length([[1, 2, 3]] * 32) == 2  # every row keeps a token of its own
    assert forward.shared_prefix_length([[1, 2, 3], [1, 2, 4]]) == 0  # 2 tokens saved: less than a pass costs
    assert forward.shared_prefix_length([[1, 2, 3], [1, 2, 4]] * 9) == 2  # 34 saved


def test_selected_layers_come_back_in_order_and_equal_the_full_run(bundled, bundled_batch):
    subset = bundled.run(list(BATCH_TEXTS), sites=["resid_post", "mlp_act"], layers=[2, 5])
    assert subset.layers == (2, 5)
    for site in ("resid_post", "mlp_act"):
        assert subset[site].shape[1] == 2
        assert np.array_equal(subset[site], bundled_batch[site][:, [2, 5]]), site


def test_layer_index_follows_the_requested_layers_in_any_order(tiny, tiny_base):
    subset = tiny.run(TEXT, sites=["resid_post"], layers=[2, 0])
    assert subset["resid_post"].shape[1] == 2
    mismatched = [layer for layer in subset.layers
                  if not np.array_equal(at(subset, "resid_post", layer), at(tiny_base, "resid_post", layer))]
    assert not mismatched, f"layers={subset.layers}: layer_index points at the wrong values for {mismatched}"


# ----------------------------------------------------------------------------------------------------
# 8. The runtime path never imports torch or transformers


def test_runtime_path_imports_neither_torch_nor_transformers():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed, so it could not leak in")
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import mlxscan

        model = mlxscan.load()
        steer = mlxscan.Add("resid_post", 3, np.ones(model.d_model, np.float32))
        recording = model.run(["The cat sat", "Hi"], sites=["resid_post", "mlp_act"], logits=True,
                              interventions=[steer])
        assert recording.effects[0].relative_change > 0
        leaked = [name for name in ("torch", "transformers") if name in sys.modules]
        assert not leaked, f"imported on the runtime path: {leaked}"
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------
# 9. The bundled model, known answers


def test_bundled_model_shape_tokens_and_answer(bundled):
    assert (bundled.n_layers, bundled.d_model, bundled.d_mlp) == (30, 576, 1536)
    ids = bundled.tokenize("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314]
    next_token = int(bundled.run(ids, logits=True).logits[0, -1].argmax())
    assert bundled.tokenizer.decode([next_token]) == " Paris"
