"""Graders: math with math-verify, multiple choice by robust letter extraction."""

from __future__ import annotations

import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

LETTERS = "ABCD"
_PRED_CONFIG = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


def grade_math(generated: str, gold: str) -> tuple[bool, str | None]:
    """(correct, parsed prediction) using math-verify; the boxed answer wins, then the last expression."""
    predicted = parse(generated, extraction_config=_PRED_CONFIG)
    if not predicted:
        return False, None
    gold_text = gold if gold.strip().startswith("$") else f"${gold}$"
    target = parse(gold_text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    return bool(target) and bool(verify(target, predicted)), str(predicted[-1])


_MC_PATTERNS = [
    r"answer\s+(?:to\s+this\s+question\s+)?is\s*:?\s*\(?\**([A-D])\b",  # "So the answer to this question is C", "answer is (C)"
    r"answer\s*[:：]\s*\(?\**([A-D])\b",  # "Answer: C"
    r"\*\*\(?([A-D])\)?[.:)]?\*\*",  # "**C**", "**(C)**"
    r"^\s*\(?([A-D])\)?(?:[.:)]|\s|$)",  # "C." / "(C)" / "C" at the start
    r"\(([A-D])\)",  # "(C)" anywhere
]


def extract_choice(text: str, choices: list[str] | None = None) -> str | None:
    """The chosen letter, or None when nothing parses (counted as wrong, never defaulted)."""
    letters = LETTERS[: len(choices)] if choices else LETTERS
    for pattern in _MC_PATTERNS:
        matches = [m for m in re.findall(pattern, text, flags=re.IGNORECASE | re.MULTILINE) if m.upper() in letters]
        if matches:
            return matches[-1].upper() if pattern.startswith("answer") else matches[0].upper()
    if choices:  # the option text itself, when exactly one option appears
        lowered = text.lower()
        hits = [LETTERS[i] for i, c in enumerate(choices) if c and c.lower() in lowered]
        if len(hits) == 1:
            return hits[0]
    return None
