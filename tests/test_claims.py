"""Claims and the gate, on synthetic data with planted answers (no model, no mlx)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from mlxscan.claims import (Claim, GateThresholds, claims_from_json, claims_to_json, correct, file_record, judge,
                            thresholds_from_dict)
from mlxscan.errors import MlxscanError
from mlxscan.study.evidence import grouped_evidence, split_halves, weighted_mean

N_CATEGORIES, WORDS_PER_CATEGORY, FRAMES = 4, 10, 4


def design():
    """(groups [n], categories [n]): 40 words in 4 categories, each word in 4 frames."""
    words = np.repeat(np.arange(N_CATEGORIES * WORDS_PER_CATEGORY), FRAMES)
    return words.astype(str), words // WORDS_PER_CATEGORY


def per_stimulus(effect_by_word, rng, noise=1.0, word_noise=0.5):
    """effect + word random effect + stimulus noise, for every stimulus."""
    groups, _ = design()
    words = groups.astype(int)
    word_effect = effect_by_word + word_noise * rng.standard_normal(len(effect_by_word))
    return word_effect[words] + noise * rng.standard_normal(len(words))


def claim_from(evidence, name="planted", value=None, control_value=0.0, **extra) -> Claim:
    return Claim(id=name, analysis="synthetic", hypothesis="the planted difference is positive",
                 statistic="mean per-stimulus difference", value=evidence.effect if value is None else value,
                 control="zero", control_value=control_value, effect=evidence.effect, ci=evidence.ci, p=evidence.p,
                 test=evidence.test, replication=evidence.replication, data_files=[], **extra)


def evidence_for(values, seed=0):
    groups, categories = design()
    return grouped_evidence(weighted_mean(values), groups, strata=categories, seed=seed)


# ---------------------------------------------------------------------------------------------
# The three planted answers


def test_planted_effect_is_supported():
    rng = np.random.default_rng(1)
    values = per_stimulus(np.full(40, 0.8), rng)
    [judged] = judge([claim_from(evidence_for(values))])
    assert judged.verdict == "supported", judged.reason
    assert judged.ci[0] > 0 and judged.p < 1e-4
    assert judged.replication["passed"]
    assert judged.correction == "holm over 1 tests"


def test_planted_null_is_null():
    rng = np.random.default_rng(2)
    values = per_stimulus(np.zeros(40), rng)
    [judged] = judge([claim_from(evidence_for(values))])
    assert judged.verdict == "null", judged.reason
    assert judged.p > 0.05


def test_null_p_values_are_calibrated():
    """Under a planted null, p < 0.05 about 5% of the time (bootstrap z-test over words)."""
    rejections = []
    for seed in range(200):
        values = per_stimulus(np.zeros(40), np.random.default_rng(100 + seed))
        groups, categories = design()
        evidence = grouped_evidence(weighted_mean(values), groups, strata=categories, seed=seed, resamples=400)
        rejections.append(evidence.p < 0.05)
    assert 0.01 <= np.mean(rejections) <= 0.11


def test_effect_that_vanishes_on_the_second_half_is_not_supported():
    """The effect lives in one word half only: strong overall, absent in the other half, so no replication."""
    groups, categories = design()
    in_a = split_halves(groups, categories, seed=0)
    word_in_a = np.array([in_a[groups == str(w)][0] for w in range(40)])
    values = per_stimulus(np.where(word_in_a, 1.5, 0.0), np.random.default_rng(3))
    evidence = evidence_for(values)
    assert evidence.p < 1e-3  # the pooled effect alone would pass
    [judged] = judge([claim_from(evidence)])
    assert not judged.replication["passed"]
    assert judged.verdict == "null" and "replicate" in judged.reason


def test_halves_are_word_disjoint_and_balanced_by_category():
    groups, categories = design()
    in_a = split_halves(groups, categories, seed=5)
    assert not set(groups[in_a]) & set(groups[~in_a])
    assert all(in_a[categories == c].mean() == 0.5 for c in range(N_CATEGORIES))


# ---------------------------------------------------------------------------------------------
# The gate's rules


def synthetic(name, p, effect=0.3, ci=(0.1, 0.5), passed=True, **extra) -> Claim:
    return Claim(id=name, analysis="synthetic", hypothesis="h", statistic="s", value=effect, control="control",
                 control_value=0.0, effect=effect, ci=ci, p=p, test="t",
                 replication={"kind": "second seed", "value": effect, "passed": passed}, data_files=[], **extra)


def test_holm_matches_hand_computation():
    # sorted p: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    np.testing.assert_allclose(correct([0.01, 0.04, 0.03], "holm"), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(correct([0.01, 0.04, 0.03], "bonferroni"), [0.03, 0.12, 0.09])
    np.testing.assert_allclose(correct([0.5, 0.9], "holm"), [1.0, 1.0])
    assert correct([math.nan], "holm")[0] == 1.0


def test_correction_counts_every_test_of_the_study():
    """p = 0.02 passes alone but not among 10 tests (Holm: 0.02 x 10 = 0.2)."""
    [alone] = judge([synthetic("a", 0.02)])
    assert alone.verdict == "supported"
    family = judge([synthetic("a", 0.02)] + [synthetic(f"n{i}", 0.9) for i in range(9)])
    assert family[0].verdict == "null" and family[0].p_corrected == pytest.approx(0.2)
    assert family[0].correction == "holm over 10 tests"


def test_each_condition_can_block_support():
    cases = {
        "ci_touches_zero": synthetic("ci", 1e-6, ci=(-0.01, 0.5)),
        "not_replicated": synthetic("rep", 1e-6, passed=False),
        "negative_effect": synthetic("neg", 1e-6, effect=-0.3, ci=(-0.5, -0.1)),
        "too_small": synthetic("small", 1e-6, effect=0.05, ci=(0.01, 0.09)),
    }
    judged = {claim.id: claim for claim in judge(list(cases.values()), GateThresholds(min_effect=0.1))}
    assert {name: claim.verdict for name, claim in judged.items()} == {name: "null" for name in judged}
    two_sided = judge([synthetic("two", 1e-6, effect=-0.3, ci=(-0.5, -0.1), two_sided=True)])[0]
    assert two_sided.verdict == "supported", two_sided.reason


def test_replication_can_be_waived_explicitly():
    claim = synthetic("rep", 1e-6, passed=False)
    assert judge([claim], GateThresholds(require_replication=False))[0].verdict == "supported"


def test_failed_control_when_chance_is_beaten_but_not_the_control():
    beats_chance = synthetic("fc", 0.4, ci=(-0.1, 0.3), chance_p=1e-8)
    neither = synthetic("nn", 0.4, ci=(-0.1, 0.3), chance_p=0.5)
    judged = judge([beats_chance, neither])
    assert [claim.verdict for claim in judged] == ["failed-control", "null"]
    assert "beats chance" in judged[0].reason


def test_judge_returns_new_claims_and_keeps_inputs():
    claim = synthetic("a", 0.001)
    judged = judge([claim])[0]
    assert claim.verdict is None and judged.verdict == "supported" and judged is not claim


def test_bad_claims_and_thresholds_are_refused():
    with pytest.raises(MlxscanError, match="unique"):
        judge([synthetic("a", 0.1), synthetic("a", 0.2)])
    with pytest.raises(MlxscanError, match="replication"):
        dataclasses.replace(synthetic("a", 0.1), replication={"kind": "x"})
    with pytest.raises(MlxscanError, match="p must"):
        synthetic("a", 1.5)
    with pytest.raises(MlxscanError, match="ci"):
        synthetic("a", 0.1, ci=(0.5, 0.1))
    with pytest.raises(MlxscanError, match="correction"):
        GateThresholds(correction="sidak")
    with pytest.raises(MlxscanError, match="unknown gate"):
        thresholds_from_dict({"alpha": 0.01, "alhpa": 0.1})
    assert thresholds_from_dict({"alpha": 0.01}).alpha == 0.01


# ---------------------------------------------------------------------------------------------
# Files and JSON


def test_json_round_trip_keeps_everything(tmp_path):
    claims = judge([synthetic("a", 0.001), synthetic("b", math.nan, ci=(math.nan, math.nan))])
    text = claims_to_json(claims, GateThresholds(alpha=0.01))
    record = json.loads(text)  # strict JSON: NaN written as null
    assert record["n_tests"] == 2 and record["thresholds"]["alpha"] == 0.01
    assert record["claims"][1]["p"] is None
    back = claims_from_json(text)
    assert back[0] == claims[0]
    assert math.isnan(back[1].p) and back[1].verdict == "untestable"  # a NaN p is no test (issue 21 item 7)
    (tmp_path / "claims.json").write_text(text)
    assert claims_from_json(tmp_path / "claims.json")[0] == claims[0]
    assert claims_from_json(record)[0] == claims[0]


def test_file_record_is_relative_and_hashes_the_bytes(tmp_path):
    (tmp_path / "steps" / "a").mkdir(parents=True)
    path = tmp_path / "steps" / "a" / "x.npz"
    path.write_bytes(b"abc")
    record = file_record(path, tmp_path)
    assert record == {"path": "steps/a/x.npz",
                      "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    with pytest.raises(MlxscanError, match="outside"):
        file_record(path, tmp_path / "steps" / "b")


def test_untestable_claims_leave_the_family_and_say_why():
    # Two real tests and one whose null was degenerate: Holm runs over the two, the third says why.
    claims = [synthetic("a", 0.02), synthetic("b", 0.02), synthetic("c", 0.001)]
    from mlxscan.claims import untestable_claim
    claims[2] = untestable_claim(claims[2], "the clean readout does not beat chance")
    judged = judge(claims)
    assert judged[2].verdict == "untestable" and "does not beat chance" in judged[2].reason
    assert math.isnan(judged[2].p_corrected)
    assert judged[0].p_corrected == pytest.approx(0.04) and judged[0].correction == "holm over 2 tests"
