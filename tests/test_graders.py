"""Grader tables: math via math-verify, multiple choice by letter extraction."""

import pytest

from eval.graders import extract_choice, grade_math


@pytest.mark.parametrize(
    "generated,gold,correct",
    [
        ("So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True),
        ("The answer is $\\boxed{\\dfrac{2}{4}}$", "\\frac{1}{2}", True),
        ("We get $\\boxed{12}$.", "12", True),
        ("Thus $x = \\boxed{3\\sqrt{2}}$", "\\sqrt{18}", True),
        ("The answer is \\boxed{(1, 2)}", "(1,2)", True),
        ("Total: $\\boxed{5\\text{ cm}}$", "5", True),
        ("so it is 12 then $\\boxed{13}$", "12", False),  # boxed answer wins over an earlier number
        ("The answer is $\\boxed{-7}$", "7", False),
        ("$\\boxed{\\frac{1}{3}}$", "0.33", False),
        ("I cannot solve this.", "4", False),
    ],
)
def test_grade_math(generated, gold, correct):
    assert grade_math(generated, gold)[0] is correct


def test_unparseable_math_reports_none():
    assert grade_math("no idea", "4") == (False, None)


CHOICES = ["Liver", "Kidney", "Pancreas", "Lung"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Beta cells secrete insulin.\nSo the answer to this question is C.", "C"),
        ("The answer is (C)", "C"),
        ("Answer: B", "B"),
        ("**D**", "D"),
        ("C. Pancreas", "C"),
        ("(A) is right", "A"),
        ("It is made in the pancreas.", "C"),
        ("Either the liver or the kidney.", None),  # two options named: ambiguous
        ("I am not sure.", None),  # never defaults to A
        ("The answer is E", None),
        ("A first guess was A, but the answer is B", "B"),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, CHOICES) == expected
