"""Grading a math answer: extract the final answer from a response, compare it with the gold one.

The extraction reads only what follows the last ``</think>`` (the thinking may try and discard
several boxed answers) and takes, in order of preference, the last ``\\boxed{...}`` /
``\\fbox{...}``, else the last final-answer statement ("the final answer is X", "Answer: X",
``#### X``, ``<answer>X</answer>``). The comparison is math-verify's (gold first, both parsed as
``$...$``) after a light normalisation that removes presentation only (spacing, units after a
number, thousands separators, degrees, percent and dollar signs).

This differs from the WMSS authors' grader, which hands the whole response, thinking included,
to math-verify with boxed answers first and without unanchored extraction: there a boxed answer
in the thinking beats the final statement, and "The answer is 5." is wrong.

math-verify bounds its work with ``signal.alarm``, which only the main thread may use; off the
main thread (and inside a caller's own alarm, which it would cancel) it runs without a time
limit.
"""

from __future__ import annotations

import re
import signal
import threading
from typing import Optional

__all__ = ["answers_match", "extract_answer", "grade_math", "normalize_answer"]

_THINK_END = "</think>"
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# A final-answer statement; the answer runs to the end of its line.
_FINAL_LINE_RE = re.compile(
    r"(?:final\s+answer[*_]*\s*(?:is|:)|answer\s+is|^[\s*_#]*answer[*_]*\s*:|####)\s*(.+)$",
    re.IGNORECASE | re.MULTILINE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_UNIT_AFTER_NUMBER_RE = re.compile(
    r"(?<=[\d}])\s*\\(?:text|textrm|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .^0-9]*\}\s*(?:\^\{?\d\}?)?$")
_SPACING_RE = re.compile(r"\\[,!;: ]|\\q?quad\b")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_NUMERIC_TOLERANCE = 1e-9


def _last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (nested braces
    balanced; ``\\boxed 5`` without braces too), or None."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    while start >= 0:
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
        pos = start + len(cmd)
        if pos < len(text) and text[pos] == " ":
            match = re.match(r"\s*([^\s$]+)", text[pos:])
            if match:
                return match.group(1)
        if pos < len(text) and text[pos] == "{":
            depth = 0
            for end in range(pos, len(text)):
                if text[end] == "{":
                    depth += 1
                elif text[end] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[pos + 1:end]
        # Unbalanced (truncated) box: try an earlier one.
        start = max(text.rfind(c, 0, start) for c in _BOX_COMMANDS)
    return None


def _clean_statement(answer: str) -> str:
    """A final-answer statement's answer without the wrapping prose marks."""
    inner = _FINAL_LINE_RE.search(answer)
    while inner is not None:  # "Final Answer: The final answer is 7", "answer is #### 7"
        answer = inner.group(1)
        inner = _FINAL_LINE_RE.search(answer)
    answer = answer.strip().strip("*").strip()
    boxed = _last_boxed(answer)
    if boxed is not None:
        return boxed.strip()
    answer = re.sub(r"(?:\s*(?:I hope it is correct|\.))+\s*$", "", answer).strip()
    if answer.startswith("$") and answer.endswith("$") and len(answer) > 1:
        answer = answer.strip("$").strip()
    if answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2].strip()
    return answer.rstrip(".").strip()


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a response, or None when it states none (see the module docstring)."""
    if _THINK_END in text:
        text = text.rsplit(_THINK_END, 1)[1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    candidates = [(m.start(), m.group(1)) for m in _FINAL_LINE_RE.finditer(text)]
    candidates += [(m.start(), m.group(1)) for m in _ANSWER_TAG_RE.finditer(text)]
    for _, answer in sorted(candidates, reverse=True):
        cleaned = _clean_statement(answer)
        if cleaned:
            return cleaned
    return None


def normalize_answer(answer: str) -> str:
    """``answer`` without presentation: LaTeX spacing, a unit after a number, thousands
    separators, ``\\dfrac``, degrees, percent and dollar signs, a trailing period."""
    text = answer.strip()
    text = _SPACING_RE.sub("", text)
    text = text.replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _DEGREE_RE.sub("", text)
    text = text.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    text = text.replace("{,}", ",")
    text = text.strip().rstrip(".").strip()
    text = _UNIT_AFTER_NUMBER_RE.sub("", text).strip()
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    return text


def _as_number(text: str) -> Optional[float]:
    if not _NUMBER_RE.fullmatch(text):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _alarm_free() -> bool:
    """True when math-verify may use SIGALRM: the main thread, and no caller's timer running
    (its ``alarm(0)`` on exit would cancel it)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    return signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def _math_verify(gold: str, extracted: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = 5 if _alarm_free() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=config, parsing_timeout=timeout)
    pred_parsed = parse(f"${extracted}$", extraction_config=config, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def answers_match(extracted: Optional[str], gold: str) -> bool:
    """True when the extracted answer equals the gold one (None never does)."""
    if extracted is None:
        return False
    pred, ref = normalize_answer(extracted), normalize_answer(str(gold))
    if not pred:
        return False
    if pred == ref:
        return True
    pred_num, ref_num = _as_number(pred), _as_number(ref)
    if pred_num is not None and ref_num is not None:  # "073" == "73" == "73.0"
        return abs(pred_num - ref_num) <= _NUMERIC_TOLERANCE * max(1.0, abs(ref_num))
    try:
        return _math_verify(ref, pred)
    except Exception:  # noqa: BLE001 - math-verify raises on timeouts and odd LaTeX: wrong
        return False


def grade_math(prediction: str, gold: str) -> tuple[Optional[str], bool]:
    """(the extracted answer, whether it matches ``gold``) for one response."""
    extracted = extract_answer(prediction)
    return extracted, answers_match(extracted, gold)
