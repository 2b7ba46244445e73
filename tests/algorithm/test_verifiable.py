"""Verifiable rewards: math-verify accuracy (answer forms, time limits), format, DAPO's overlong penalty,
maj@k, and the kwargs that build them from params.yaml."""

from __future__ import annotations

import time

import pytest

from grpo_steps.grpo.rewards import resolve_reward_function
from grpo_steps.grpo.verifiable import FormatReward, MathAccuracy, OverlongPenalty
from grpo_steps.stages.evaluate import answer_keys, majority_accuracy


@pytest.fixture(scope="module")
def math_accuracy():
    judge = MathAccuracy(timeout_s=1)
    yield judge
    judge.close()


def test_math_accuracy_reads_the_final_answer_in_its_usual_forms(math_accuracy):
    completions = ["#### 49", r"\boxed{49}", "49.0", r"\frac{98}{2}", "48",
                   "She had 12 and bought 37 more: 12 + 37 = 49.\n#### 49",
                   "<think>7 * 7 = 49</think> The answer is \\boxed{49}.",
                   "20 + 29 = 49, so minus one is 48.\n#### 48", "no number here", ""]
    scores = math_accuracy(["q"] * len(completions), completions, ["49"] * len(completions))
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # a reference in LaTeX, an equivalent decimal
    assert math_accuracy(["q", "q"], ["#### 0.5", "#### 0.4"], [r"\frac{1}{2}", r"\frac{1}{2}"]) == [1.0, 0.0]


def test_a_completion_that_hangs_the_verifier_scores_zero_within_its_time_limit(math_accuracy):
    t0 = time.perf_counter()
    scores = math_accuracy(["q", "q"], [r"$9^{9^{9^{9}}}$", "#### 49"], ["49", "49"])
    assert scores == [0.0, 1.0]
    assert time.perf_counter() - t0 < 20, "bounded by the per-completion limit (1 s per call), not the sympy work"


def test_the_backstop_stops_a_worker_that_never_answers(caplog):
    from tests.support.hang import never_returns

    judge = MathAccuracy(timeout_s=1, backstop_s=2)
    try:
        t0 = time.perf_counter()
        assert judge._run(never_returns, 1, 0.0, ["a", "b"]) == [0.0, 0.0]
        assert time.perf_counter() - t0 < 30
        assert "not checked within" in caplog.text
        assert judge(["q"], ["#### 3"], ["3"]) == [1.0], "a fresh worker serves the next batch"
    finally:
        judge.close()


def test_a_crashed_worker_loses_only_its_chunk(caplog):
    from tests.support.hang import crashes

    judge = MathAccuracy(timeout_s=1)
    try:
        assert judge._run(crashes, 1, 0.0, ["a"] * 3) == [0.0] * 3 and "lost the worker" in caplog.text
        many = ["#### 3"] * (MathAccuracy.CHUNK + 5)
        assert judge(["q"] * len(many), many, ["3"] * len(many)) == [1.0] * len(many), "chunked, fresh worker"
    finally:
        judge.close()


def test_format_reward_and_its_pattern():
    fmt = FormatReward()
    assert fmt([""] * 4, ["<think>1+1</think> 2", "<think>\nsteps\n</think>\n#### 2", "2", "<think>x</think>"]) == [
        1.0, 1.0, 0.0, 0.0]
    assert FormatReward(r".*#### -?\d+")([""] * 2, ["so #### 4", "so 4"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="not a regular expression"):
        FormatReward("(")


def test_overlong_penalty_is_dapos_soft_punishment():
    pen = OverlongPenalty(max_length=100, buffer=20)
    assert pen([""] * 5, [""] * 5, completion_lengths=[10, 80, 90, 100, 120]) == [0.0, 0.0, -0.5, -1.0, -2.0]
    assert OverlongPenalty(max_length=8).buffer == 2
    with pytest.raises(ValueError, match="buffer"):
        OverlongPenalty(max_length=8, buffer=9)


def test_rewards_are_built_from_their_kwargs():
    assert resolve_reward_function("format", {"pattern": "a+"})(["p"], ["aaa"]) == [1.0]
    assert resolve_reward_function("overlong_penalty", {"max_length": 4, "buffer": 2}).max_length == 4
    with pytest.raises(ValueError, match="takes no kwargs"):
        resolve_reward_function("exact_match", {"x": 1})
    with pytest.raises(ValueError, match="bad kwargs"):
        resolve_reward_function("format", {"patern": "a"})


def test_majority_vote(math_accuracy):
    completions = ["#### 49", r"\boxed{49}", "#### 48", "#### 48",
                   "#### 7", "#### 8", "#### 8", "nothing"]
    hits = math_accuracy(["q"] * 8, completions, ["49"] * 4 + ["8"] * 4)
    keys = answer_keys(math_accuracy, completions)
    assert keys[0] == keys[1] == "49" and keys[7] is None
    assert len(set(math_accuracy.extract(["#### 85", "#### 85.0", r"\frac{170}{2}"]))) == 1, "equal numbers, one vote"
    # prompt 1: a tie, the first answer seen (49) wins; prompt 2: 8 beats 7
    assert majority_accuracy(keys, hits, 4) == 1.0
    assert majority_accuracy(["3", "4", "4", None], [1.0, 0.0, 0.0, 0.0], 4) == 0.0
    assert majority_accuracy([None] * 4, [0.0] * 4, 4) == 0.0
