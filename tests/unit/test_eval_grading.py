"""Math answer extraction and matching (megatron_wmss.evaluation.grading)."""

from __future__ import annotations

import signal
import threading

import pytest

pytest.importorskip("math_verify")

from megatron_wmss.evaluation.grading import (  # noqa: E402
    answers_match,
    extract_answer,
    grade_math,
)


@pytest.mark.parametrize("response, expected", [
    ("So the answer is \\boxed{5}.", "5"),
    ("\\boxed{3} at first, but then \\boxed{4}", "4"),                    # the last box
    ("$\\boxed{\\frac{a_{1}}{b^{2}}}$", "\\frac{a_{1}}{b^{2}}"),           # nested braces
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\fbox{8}", "8"),
    ("\\boxed 7 is it", "7"),
    ("<think>maybe \\boxed{7}?</think>The final answer is $5$.", "5"),  # thinking ignored
    ("<think>a</think><think>b \\boxed{1}</think> \\boxed{2}", "2"),
    ("**Final Answer:** 12", "12"),
    ("Working...\nAnswer: 42.", "42"),
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("<answer>14</answer>", "14"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response", [
    "I could not solve it.",
    "<think>\\boxed{5}</think>I give up.",  # a box inside the thinking does not count
    "\\boxed{5",                             # truncated mid-box
    "",
])
def test_no_answer_extracts_none_and_is_wrong(response):
    assert extract_answer(response) is None
    assert grade_math(response, "5") == (None, False)


@pytest.mark.parametrize("extracted, gold", [
    ("073", "73"),
    ("73", "073"),
    ("576", "576.0"),                        # WMSS authors' gsm8k answers
    ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("-3", "-3"),
    ("-\\frac{2}{3}", "-2/3"),
    ("1,000", "1000"),
    ("1{,}234{,}567", "1234567"),
    ("3\\,000", "3000"),
    ("10\\ 000", "10000"),
    ("5\\text{ cm}", "5"),
    ("12 \\text{ dollars}", "12"),
    ("9\\text{ m}^2", "9"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("10\\%", "10"),
    ("\\$18.90", "18.90"),
    ("\\text{(C)}", "C"),
    ("x^2 + 1", "1 + x^2"),
    ("3\\sqrt{2}", "\\sqrt{18}"),
    ("\\left( 2, 5 \\right)", "(2,5)"),
])
def test_equivalent_answers_match(extracted, gold):
    assert answers_match(extracted, gold)


@pytest.mark.parametrize("extracted, gold", [
    ("6", "5"),
    ("-5", "5"),
    ("\\frac{1}{3}", "0.33"),
    ("1,001", "1000"),
    ("\\sqrt{2}", "2"),
    ("\\text{(B)}", "C"),
    ("50", "5"),
    ("", "5"),
    (None, "5"),
])
def test_different_answers_do_not_match(extracted, gold):
    assert not answers_match(extracted, gold)


def test_grade_math_returns_extracted_and_verdict():
    assert grade_math("so the answer is \\boxed{\\dfrac{1}{2}}", "1/2") == ("\\dfrac{1}{2}", True)
    assert grade_math("so the answer is \\boxed{3}", "4") == ("3", False)


def test_grading_in_a_worker_thread():
    # math-verify's SIGALRM is main-thread only; off it the grader must still give verdicts.
    out = []
    worker = threading.Thread(target=lambda: out.extend([
        grade_math("\\boxed{\\frac{2}{4}}", "0.5"), grade_math("\\boxed{x^2}", "x^3")]))
    worker.start()
    worker.join()
    assert out == [("\\frac{2}{4}", True), ("x^2", False)]


def test_grading_keeps_a_callers_alarm():
    # math-verify's alarm(0) on exit would cancel an alarm the caller set.
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert grade_math("\\boxed{x^2 + 2x + 1}", "(x+1)^2")[1]
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 90.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
