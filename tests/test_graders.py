"""Grader tables: math via math-verify, multiple choice by letter extraction."""

import json
import re
import time
from pathlib import Path

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


@pytest.mark.parametrize(
    "generated,gold,correct",
    [
        (r"The answer is $\boxed{4.5 \times 10^{33}}$", "4.5e33", True),  # e-notation gold, model's a x 10^b
        (r"$\boxed{4.5\cdot 10^{33}}$", "4.5e33", True),
        (r"$\boxed{4.5e33}$", "4.5e33", True),
        (r"$\boxed{4.2 \times 10^{33}}$", "4.5e33", False),
        (r"$\boxed{2 \times 10^{-8}}$", "1e-8", False),  # math-verify's 6-decimal rounding called these equal
        (r"$\boxed{-\frac{1}{3}}$", "-1./3", True),
        (r"$\boxed{25\%}$", "25", True),  # percent: 25 and 25% both ways; 0.25 only for a fraction-of-one gold
        (r"$\boxed{25}$", r"25\%", True),
        (r"$\boxed{0.25}$", r"25\%", False),
        (r"$\boxed{25\%}$", "0.25", True),
        (r"$\boxed{\textbf{(B)}\ 12}$", r"\text{(B)}", True),  # AMC letters
        (r"$\boxed{\text{(C)}}$", "C", True),
        ("The answer is (C).", r"\text{(C)}", True),
        (r"$\boxed{\textbf{(B)}\ 12}$", "12", True),
        (r"$\boxed{\textbf{(B)}\ 12}$", r"\text{(C)}", False),
        ("The answer is 385.\nCheck: 5 * 77 = 385, and 385 + 15 = 400.", "385", True),  # marker beats checking
        (r"$\boxed{x_0\cos(\omega t)+\frac{\dot{x}_0}{\omega}\sin(\omega t)}$",
         r"x_{0} \cos (\omega t)+$ $\dot{x}_{0} \sin (\omega t) / \omega", True),  # a gold with $ inside
        (r"$\boxed{69, 84}$", r"$69$,$84$", True),
    ],
)
def test_grade_math_categories(generated, gold, correct):
    assert grade_math(generated, gold)[0] is correct


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The correct option is B.", "B"), ("Option C is correct", "C"), ("**Answer:** B", "B"), (r"\boxed{C}", "C"),
        ("I would choose D", "D"), ("[B]", "B"), ("Answer - B", "B"), ("The answer is not A; it is C", "C"),
        ("answer: b", "B"), ("B)", "B"), ("Option B", "B"), ("the answer is B because the kidney...", "B"),
        ("A patient with diabetes lacks insulin.", None),  # the article is not option A
        ("Options: (A) Liver (B) Kidney (C) Pancreas (D) Lung", None),  # options echoed back
        ("The answer is either B or C.", None),
    ],
)
def test_extract_choice_phrasings(text, expected):
    assert extract_choice(text, CHOICES) == expected


# --- the hand-labelled set (tests/grader_cases.py): agreement with a careful human, per category ---------


def grader_agreement(grade=grade_math, choose=extract_choice, cases=None) -> dict[str, tuple[int, int]]:
    """{category: (agreeing, total)} of the graders against the human labels."""
    from grader_cases import CASES

    table: dict[str, tuple[int, int]] = {}
    for category, generated, gold, expected in cases or CASES:
        if category.startswith("mc_"):
            got = choose(generated, list(gold))
        elif category == "truncated":
            got = grade(generated, gold, truncated=True)[0]
        else:
            got = grade(generated, gold)[0]
        agree, total = table.get(category, (0, 0))
        table[category] = (agree + (got == expected), total + 1)
    return table


def format_agreement(table: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'category':<16} {'agree':>5} / {'n':<4} {'rate':>6}"]
    for category, (agree, total) in table.items():
        lines.append(f"{category:<16} {agree:>5} / {total:<4} {agree / total:>6.3f}")
    agree, total = sum(a for a, _ in table.values()), sum(n for _, n in table.values())
    lines.append(f"{'overall':<16} {agree:>5} / {total:<4} {agree / total:>6.3f}")
    return "\n".join(lines)


def test_agreement_with_human_labels():
    from grader_cases import CASES

    assert len(CASES) >= 300
    table = grader_agreement()
    print("\n" + format_agreement(table))
    agree, total = sum(a for a, _ in table.values()), sum(n for _, n in table.values())
    assert agree / total >= 0.97, format_agreement(table)
    low = {c: round(a / n, 3) for c, (a, n) in table.items() if a / n < 0.9}
    assert not low, f"categories below 0.9: {low}"


def test_held_out_gaps_are_graded_as_a_human_would():
    """Lone lowercase letters, hallucinated new turns, sanity checks after the answer, unboxed word answers, spaces
    between numbers."""
    from grader_cases import HELD_OUT

    table = grader_agreement(cases=HELD_OUT)
    assert set(table) == {"mc_lone_letter", "mc_new_turn", "sanity_check", "word_answer", "math_new_turn", "spaced_numbers"}
    assert all(agree == total for agree, total in table.values()), format_agreement(table)


def test_truncated_needs_a_final_answer_marker():
    cut = "Total so far: 6 * 7 = 42. Next we subtract those who left, giving 42"
    assert grade_math(cut, "42")[0] is True  # the last number, as before, for a finished generation
    assert grade_math(cut, "42", truncated=True) == (False, None)
    assert grade_math(r"So $\boxed{42}$. Checking: 6 * 7 =", "42", truncated=True)[0] is True


# --- the real golds of the five math benchmarks (../shared/benchmarks) ----------------------------------

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
GOLD_FIELDS = {"math500.jsonl": "answer", "minerva_math.jsonl": "answer", "olympiadbench.jsonl": "final_answer",
               "aime24.jsonl": "answer", "amc23.jsonl": "answer"}
_E_GOLD = re.compile(r"^([-+]?\d*\.?\d+)[eE]([-+]?\d+)$")


def _gold(value) -> str:
    """The gold as the project's data prep stores it (OlympiadBench: its list of final answers, joined)."""
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _as_model(gold: str) -> str:
    """The gold written as a model would: boxed, without $ delimiters, e-notation as a x 10^{b}."""
    m = _E_GOLD.match(gold.strip())
    body = f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}" if m else re.sub(r"(?<!\\)\$", "", gold).strip()
    return f"The answer is $\\boxed{{{body}}}$."


def _same_value(a: str, b: str) -> bool:
    """Golds that are mathematically the same (``120`` and ``120^\\circ``, ``5`` and ``x=5``): not a negative
    pair. Judged without the grader: equal after dropping decoration, or equal as numbers."""
    def norm(s: str) -> str:
        s = re.sub(r"(?<!\\)\$|\s|\\[,!;: ]|\^\{?\\circ\}?|\\(?:left|right)\b", "", s)
        return re.sub(r"^[a-zA-Z]=", "", s).rstrip(".")
    na, nb = norm(a), norm(b)
    if na == nb:
        return True
    try:
        return float(na) == float(nb)
    except ValueError:
        return False


def _real_golds(name: str) -> list[str]:
    if not BENCHMARKS.is_dir():
        pytest.skip(f"{BENCHMARKS} not found (the shared benchmarks sit next to the repository)")
    rows = [json.loads(line) for line in (BENCHMARKS / name).read_text().splitlines() if line.strip()]
    return [_gold(row[GOLD_FIELDS[name]]) for row in rows]


@pytest.mark.parametrize("name", list(GOLD_FIELDS))
def test_real_golds_accepted_and_others_rejected(name):
    golds = _real_golds(name)
    start = time.perf_counter()
    not_accepted = [g for g in golds if not grade_math(_as_model(g), g)[0]]
    pairs = [(golds[i], golds[(i + 1) % len(golds)]) for i in range(len(golds))]
    pairs = [(g, other) for g, other in pairs if not _same_value(g, other)]
    wrongly_accepted = [(g, other) for g, other in pairs if grade_math(_as_model(other), g)[0]]
    print(f"\n{name}: accepted {len(golds) - len(not_accepted)}/{len(golds)}, rejected "
          f"{len(pairs) - len(wrongly_accepted)}/{len(pairs)} other golds ({time.perf_counter() - start:.1f} s)")
    assert not not_accepted, not_accepted[:10]
    assert not wrongly_accepted, wrongly_accepted[:10]
