"""Activation patching and head ablation on a tiny random Llama (model_factory), against answers known exactly.

The planted answers: patching the whole residual at the last layer (or the last position of
resid_post at the last layer) recovers 100%; patching nothing recovers 0%; at layer 0, resid_pre is
the embedding, so the tokens where clean and corrupted differ carry the whole difference (100%) and
every other position none (0%). Each batched cell is also checked against a single direct run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxscan  # before mlx.core: the fast BLAS

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxscan.capture.interventions import AblateHeads, Map  # noqa: E402
from mlxscan.errors import MlxscanError  # noqa: E402
from mlxscan.experiments import patching  # noqa: E402
from mlxscan.experiments.patching import PromptPair  # noqa: E402

# Subjects " cat" and " dog" are two tokens each in the tiny tokenizer, so every pair is equally long.
PROMPTS = (("The cat sat on the", "The dog sat on the", " sea", " and"),
           ("I saw the cat near", "I saw the dog near", " the", " to"),
           ("She paid for the cat and", "She paid for the dog and", " of", " in"))
N_LAYERS = 3


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    pytest.importorskip("torch")  # model_factory builds the weights with transformers
    pytest.importorskip("transformers")
    from model_factory import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", num_hidden_layers=N_LAYERS)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return mlxscan.load(tiny_folder)


@pytest.fixture(scope="module")
def pairs_file(tiny, tmp_path_factory) -> Path:
    """The pairs, each answer pair ordered so that the random model's LD is larger on the clean prompt."""
    rows = []
    for clean, corrupted, answer, wrong in PROMPTS:
        pair = PromptPair(clean, corrupted, answer, wrong)
        tokens = patching.tokenize_pairs(tiny, [pair])
        diffs = [patching.logit_diffs(tiny, t, tokens.answer_ids, tokens.corrupted_answer_ids)[0]
                 for t in (tokens.clean, tokens.corrupted)]
        if diffs[0] < diffs[1]:
            answer, wrong = wrong, answer
        rows.append({"clean": clean, "corrupted": corrupted, "answer": answer, "corrupted_answer": wrong})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pairs(tiny, pairs_file):
    return patching.tokenize_pairs(tiny, patching.load_pairs(pairs_file))


@pytest.fixture(scope="module")
def resid_pre(tiny, pairs):
    return patching.run_patching(tiny, pairs, "resid_pre")


def test_pairs_file_errors_name_every_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"clean": "a", "corrupted": "b", "answer": " c"}\nnot json\n'
                    '{"clean": "a", "corrupted": "b", "answer": " c", "corrupted_answer": " d", "colour": "x"}\n')
    with pytest.raises(MlxscanError) as caught:
        patching.load_pairs(path)
    message = str(caught.value)
    assert "line 1: missing corrupted_answer" in message and "line 2: not JSON" in message
    assert "line 3: unknown field colour" in message


def test_unequal_lengths_and_multi_token_answers_name_the_pair(tiny):
    bad = [PromptPair("The cat sat on the", "The river sat on the", " sea", " and"),
           PromptPair("The cat sat on the", "The dog sat on the", " dog", " and"),
           PromptPair("The cat sat on the", "The cat sat on the", " sea", " and")]
    with pytest.raises(MlxscanError) as caught:
        patching.tokenize_pairs(tiny, bad)
    assert "pair 1" in str(caught.value) and "same length" in str(caught.value)
    assert "pair 2: answer ' dog' is 2 tokens" in str(caught.value)
    assert "pair 3 ('The cat sat on the'): clean and corrupted are the same tokens" in str(caught.value)


def test_resume_from_a_recorded_residual_equals_the_full_run(tiny, pairs):
    full = patching.logit_diffs(tiny, pairs.corrupted, pairs.answer_ids, pairs.corrupted_answer_ids)
    starts = tiny.run(pairs.corrupted, sites=["resid_pre"], layers=[2])["resid_pre"][:, 0]
    resumed = patching.logit_diffs(tiny, pairs.corrupted, pairs.answer_ids, pairs.corrupted_answer_ids,
                                   resume=(2, starts))
    np.testing.assert_allclose(resumed, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(MlxscanError, match="cannot record or change anything before it"):
        patching.run_tokens(tiny, pairs.corrupted, sites=["resid_post"], layers=[0], resume=(2, starts))


def test_full_patch_recovers_everything_and_nothing_recovers_nothing(tiny, pairs, resid_pre):
    columns = list(resid_pre.columns)
    assert resid_pre.recovered[-1, columns.index("all")] == pytest.approx(1.0, abs=1e-5)
    assert resid_pre.recovered_nothing == pytest.approx(0.0, abs=1e-6)
    post = patching.run_patching(tiny, pairs, "resid_post", layers=[N_LAYERS - 1])
    # After the last block, the final logits read the last position only.
    assert post.recovered[0, list(post.columns).index("-1")] == pytest.approx(1.0, abs=1e-5)
    assert np.abs(post.recovered[0, : list(post.columns).index("-1")]).max() < 1e-6


def test_layer_zero_difference_lives_only_in_the_changed_tokens(pairs, resid_pre):
    columns = list(resid_pre.columns)
    first = resid_pre.recovered[0]
    assert first[columns.index("changed")] == pytest.approx(1.0, abs=1e-5)
    # "-1" is the last token, never the subject: identical embeddings, nothing to recover.
    assert first[columns.index("-1")] == pytest.approx(0.0, abs=1e-6)
    assert first[columns.index("all")] == pytest.approx(1.0, abs=1e-5)


def test_each_batched_cell_equals_a_direct_run(tiny, pairs, resid_pre):
    layer, column = 1, list(resid_pre.columns).index("-1")
    clean = tiny.run(pairs.clean, sites=["resid_pre"], layers=[layer])["resid_pre"][:, 0]
    direct = []
    for i in range(len(pairs)):
        values = mx.array(clean[i: i + 1, : pairs.lengths[i]])
        mask = np.zeros((1, pairs.lengths[i], 1), bool)
        mask[0, -1] = True
        patch = Map("resid_pre", layer, fn=lambda x, v=values, m=mx.array(mask): mx.where(m, v, x))
        direct.append(patching.logit_diffs(tiny, [pairs.corrupted[i]], pairs.answer_ids[i: i + 1],
                                           pairs.corrupted_answer_ids[i: i + 1], [patch])[0])
    np.testing.assert_allclose(resid_pre.patched_ld[layer, column], direct, rtol=1e-4, atol=1e-4)


def test_all_heads_patched_equals_attn_out_patched(tiny, pairs):
    heads = patching.run_patching(tiny, pairs, "attn_head", layers=[1])
    branch = patching.run_patching(tiny, pairs, "attn_out", layers=[1])
    assert heads.columns == ("0", "1", "2", "3", "all")
    np.testing.assert_allclose(heads.patched_ld[0, -1], branch.patched_ld[0, -1], rtol=1e-4, atol=1e-4)


def test_head_ablation_rows_match_direct_ablation(tiny, pairs):
    result = patching.run_head_ablation(tiny, pairs, layers=[0, 2], mode="zero")
    assert result.effect.shape == (2, tiny.n_heads)
    direct = patching.logit_diffs(tiny, pairs.clean, pairs.answer_ids, pairs.corrupted_answer_ids,
                                  [AblateHeads("attn_head", 2, heads=[3])])
    np.testing.assert_allclose(result.ablated_ld[1, 3], direct, rtol=1e-4, atol=1e-4)
    gap = result.clean_ld.mean() - result.corrupted_ld.mean()
    assert result.effect[1, 3] == pytest.approx((direct.mean() - result.clean_ld.mean()) / gap, abs=1e-4)


def test_bad_site_layer_and_positions_are_refused(tiny, pairs):
    with pytest.raises(MlxscanError, match="cannot patch site"):
        patching.run_patching(tiny, pairs, "mlp_act")
    with pytest.raises(MlxscanError, match="do not exist"):
        patching.run_patching(tiny, pairs, layers=[N_LAYERS])
    with pytest.raises(MlxscanError, match="positions must lie in"):
        patching.run_patching(tiny, pairs, positions=99)
    swapped = patching.TokenizedPairs(pairs.clean, pairs.corrupted, pairs.corrupted_answer_ids, pairs.answer_ids,
                                      pairs.lengths)
    with pytest.raises(MlxscanError, match="does not prefer the clean answers"):
        patching.run_patching(tiny, swapped)


def invoke(*args):
    from mlxscan.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_patch_json_and_out(tiny_folder, pairs_file, tmp_path):
    out = tmp_path / "out"
    result = invoke("patch", "--model", tiny_folder, "--pairs", pairs_file, "--layers", "0,2", "--ablate-heads",
                    "--json", "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    (entry,) = record["sets"]
    assert entry["name"] == "pairs" and entry["layers"] == [0, 2] and entry["n_pairs"] == len(PROMPTS)
    assert entry["recovered_all_at_last_layer"] == pytest.approx(1.0, abs=1e-5)
    assert abs(entry["recovered_nothing"]) < 1e-6
    assert len(entry["head_ablation"]["effect"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["head_ablation_pairs.png", "patch.json", "patch.npz",
                                                     "patch_pairs.png"]
    arrays = np.load(out / "patch.npz")
    np.testing.assert_allclose(arrays["pairs/recovered"], entry["recovered"])


def test_cli_patch_table_and_bad_input(tiny_folder, pairs_file, tmp_path):
    table = invoke("patch", "--model", tiny_folder, "--pairs", pairs_file, "--layers", "2", "--site", "attn_head")
    assert table.exit_code == 0, table.output
    assert "heads recovering most" in table.output and "every head at layer 2 recovers" in table.output
    positions = invoke("patch", "--model", tiny_folder, "--pairs", pairs_file, "--layers", "2", "--site", "resid_post")
    assert "everything at layer 2 recovers 1.000" in positions.output, positions.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "The cat sat", "corrupted": "The river sat", "answer": " sea", "corrupted_answer": " and"}\n')
    out = tmp_path / "never"
    result = invoke("patch", "--model", tiny_folder, "--pairs", bad, "--out", out)
    assert result.exit_code == 2 and "pair 1" in result.output and "Traceback" not in result.output
    assert not out.exists()
    assert invoke("patch", "--positions", "0").exit_code == 2
    too_long = invoke("patch", "--model", tiny_folder, "--pairs", pairs_file, "--positions", "50")
    assert too_long.exit_code == 2 and "shortest prompt" in too_long.output
    assert invoke("patch", "--help").exit_code == 0
