"""Graders: math with math-verify (plus normalisation around it), multiple choice by robust letter extraction.

Math (``grade_math``), in order:

1. **Gold.** Unescaped ``$`` are removed (``$69$,$84$``, Minerva's ``x_0 \\cos(\\omega t)+$ $\\dot x_0 ...``), a
   list rendered as a string (``"['$2$']"``) is joined, ``np.`` functions become LaTeX, a trailing period goes.
   A gold that is a number (``27.0``, ``-1./3``, ``4.5e33``, ``\\frac{3}{56}``, ``\\$32,\\!348``, ``62.5%``,
   ``90^\\circ``) is compared as a number (below); a gold that is a letter (``C``, ``(C)``, ``\\text{(C)}``)
   against the letter of the answer; anything else through math-verify's ``parse``/``verify``.
2. **The answer.** The last ``\\boxed{}`` (or ``\\fbox{}``) wins; else the last final-answer marker
   ("The answer is", "final answer is", "Final answer:", "**Answer:**", "Answer:") and what follows it up
   to the end of its sentence (a ``$...$`` right after the marker is taken whole), so checking arithmetic
   written after a stated answer does not count; else (no marker) math-verify's last expression of the
   whole text, stopping before a sanity check ("Sanity check:", "To double-check", "Let's verify") that
   follows a concluding sentence, so the check's numbers are not graded; a gold that is a word
   (``\\text{Evelyn}``) is accepted when the concluding sentence names it ("Therefore, Evelyn has the greatest
   average speed."), not negated. With ``truncated=True`` (the generation hit the token limit) an answer
   without a marker gets no credit and reports ``None``. A hallucinated new turn (``### Instruction:``, the
   Alpaca preamble) and everything after it are cut off first, for math and multiple choice alike.
3. **Numbers.** e-notation is read as a number everywhere (``4.5e33``, ``4.5E+33``) and the model's
   ``4.5 \\times 10^{33}``, ``4.5\\cdot 10^{33}``, ``4.5*10^33``, ``10^{-5}`` are accepted; thousands commas
   and thin spaces (``1\\,000``), ``\\$``, degree signs, ``\\text{...}`` units and a leading ``x =`` are dropped;
   numbers side by side (``1 1``) are not one number (math-verify would add them). Integers and fractions must
   be equal (relative 1e-9). A gold written as a decimal or in e-notation is approximate: an answer written
   as a decimal (or e-notation) is accepted when it rounds to the gold at the gold's last digit (``4.46e33``
   for ``4.5e33``; ``4.4e33`` is rejected); an exact answer (``\\frac{1}{3}`` for ``0.33``) must be equal. Percent: ``25``, ``25\\%`` are accepted for a gold ``25`` or ``25\\%``; ``0.25`` is *not*
   accepted for ``25\\%`` (conservative), but ``25\\%`` is accepted for a fraction-of-one gold ``0.25``.
4. **Letters** (AMC-style golds): ``\\text{(C)}``, ``\\textbf{(B)}\\ 12``, ``(C)``, "The answer is (C)". A
   letter-labelled answer (``\\textbf{(B)}\\ 12``) against a numeric gold is graded on its number.

math-verify's own timeouts (``MV_TIMEOUT_S``) bound each parse and comparison.

Multiple choice (``extract_choice``): an explicit statement wins ("The answer is C", "Answer: b",
"**Answer:** B", "The correct option is B", "Option C is correct", "I would choose D", ``\\boxed{C}``,
"Answer - B"; the last one counts; negated letters, "not A", are dropped first, so "not A; it is C" is C),
then a bare letter ("**C**", "[B]", "C. Pancreas", "B)", "(B)", "Option B"; a first line that is a lone
letter, lowercase too: "b", "c.", "(b)"), then an option's text when
exactly one option is named. A sentence that starts with the article "A" is not option A. Nothing parsed
is ``None``: counted wrong, never defaulted.
"""

from __future__ import annotations

import ast
import functools
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

LETTERS = "ABCD"
MV_TIMEOUT_S = 3  # per math-verify parse / verify call (signal based: main thread only)
_EXTRACTION = {"pred": [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
               "gold": [LatexExtractionConfig(), ExprExtractionConfig()]}

# ----------------------------------------------------------------------------------------------------------
# text helpers


def _balanced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the ``{...}`` opening at ``text[start]`` and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def _last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        got = _balanced(text, m.end())
        if got is not None:
            found = got[0]
    return found


_MARKER = re.compile(
    r"(?:final\s+answer(?:\s+is)?|answer\s+is|answer\s*(?:\*\*)?\s*[:：]|\bans\s*[:：])\s*(?:\*\*)?\s*[:：]?",
    re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n|;\s|,\s+(?=(?:because|since|which|as|so|and|but|where|I|we)\b)"
                           r"|\s+(?=(?:because|since|which|as\s+required|I\s+hope)\b)", re.IGNORECASE)


def _after_marker(text: str) -> str | None:
    """What follows the last final-answer marker, up to the end of its sentence; None without a marker."""
    for m in reversed(list(_MARKER.finditer(text))):
        rest = text[m.end():].lstrip(" \t*:")
        if rest.startswith("\n"):
            rest = rest.lstrip()
        for open_, close in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
            if rest.startswith(open_):
                end = rest.find(close, len(open_))
                if end > 0 and _has_content(rest[len(open_):end]):
                    return rest[len(open_):end].strip()
                break
        cut = _SENTENCE_END.search(rest)
        region = (rest[:cut.start()] if cut else rest).strip().strip("*").strip()
        if _has_content(region):
            return region
    return None


def _has_content(region: str) -> bool:
    """False for an empty answer such as ``$\\boxed{}$``."""
    return bool(re.sub(r"\\(?:boxed|fbox)|[\s{}$]", "", region))


_NEW_TURN = re.compile(r"^[ \t]*#{2,}[ \t]*(?:Instruction|Input)[ \t]*:|Below is an instruction that describes a task",
                       re.IGNORECASE | re.MULTILINE)


def first_turn(text: str) -> str:
    """The generation up to a hallucinated new prompt turn (``### Instruction:``, the Alpaca preamble)."""
    m = _NEW_TURN.search(text)
    return text[:m.start()] if m else text


_CHECK = re.compile(r"(?:sanity|double)[\s-]?check|\bto\s+(?:double[\s-]?)?(?:check|verify)\b"
                    r"|\blet(?:'s|’s|\s+us)\s+(?:double[\s-]?)?(?:check|verify)\b|\b(?:check|checking|verification)\s*:"
                    r"|\bas\s+a\s+check\b", re.IGNORECASE)
_CONCLUSION = re.compile(r"\b(?:so|thus|therefore|hence|total|altogether|in\s+all|answer|result|final|we\s+get|gives|"
                         r"equals?|makes|is|are|was|were)\b|=", re.IGNORECASE)  # a sentence that states a value
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")


def _before_check(text: str) -> str:
    """The text before a sanity check that follows a concluding sentence; the whole text otherwise."""
    m = _CHECK.search(text)
    if m is None:
        return text
    sentences = [s for s in _SENTENCES.split(text[:m.start()]) if s.strip()]
    return text[:m.start()] if sentences and _CONCLUSION.search(sentences[-1]) and re.search(r"\d", sentences[-1]) else text


_SPACED_NUMBERS = re.compile(r"[-+]?\d+(?:\.\d+)?(?:\s+[-+]?\d+(?:\.\d+)?)+")
_WORD_GOLD = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")


def _names_word_gold(text: str, gold_text: str) -> str | None:
    """The gold word when the concluding sentence's last clause names it (not negated), else None."""
    word = re.sub(r"\\(?:text|textbf|mathrm|mbox|textrm)\s*\{([^{}]*)\}", r"\1", gold_text).strip()
    if not _WORD_GOLD.fullmatch(word):
        return None
    sentences = [s for s in _SENTENCES.split(text.strip()) if re.search(r"[A-Za-z]", s)]
    clause = re.split(r"[;:]", sentences[-1])[-1] if sentences else ""
    w = re.escape(word)
    named = re.search(rf"(?<![\w]){w}(?![\w])", clause, re.IGNORECASE)
    negated = re.search(rf"\b(?:not|n't|never|no)\s+(?:\w+\s+)?{w}\b|\b{w}\s+(?:\w+\s+)?(?:not|n't|never)\b", clause,
                        re.IGNORECASE)
    return word if named and not negated else None


# ----------------------------------------------------------------------------------------------------------
# numbers

_NUM = r"[-+−]?(?:\d+(?:\.\d*)?|\.\d+)"
_SCI = re.compile(rf"^({_NUM})\s*(?:[eE]\s*([-+−]?\d+)|(?:\\times|\\cdot|\*|×|x|·)\s*10\s*\^\s*\{{?\s*([-+−]?\d+)\s*\}}?)$")
_POW10 = re.compile(r"^([-+−]?)10\s*\^\s*\{?\s*([-+−]?\d+)\s*\}?$")
_FRAC = re.compile(rf"^([-+−]?)\s*\\[dt]?frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}$")
_SLASH = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")
_UNIT_WORD = r"(?:[A-Za-z]{2,}|[mgsKJWVNLΩ])(?:\s*\^\s*\{?-?\d\}?)?"
_TRAILING_UNITS = re.compile(rf"^(.*?\d\.?)\s+{_UNIT_WORD}(?:\s*(?:/|\s|\\cdot)\s*{_UNIT_WORD})*\s*$")
_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+\.?\d*|\.\d+)\s?[eE]\s?([-+]?\d+)(?![\w.])")


_SIMPLE_LHS = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[\w\\ ]+\}?)?(?:\([A-Za-z0-9]\))?")


def _clean_number_text(s: str) -> tuple[str, bool]:
    """Strip LaTeX decoration around a number; returns (text, had a percent sign)."""
    s = s.strip()
    s = re.sub(r"(?<!\\)\$", "", s)
    s = re.sub(r"\\(?:left|right|displaystyle)\b", "", s)
    s = re.sub(r"\\[,;:! ]|~|\\quad|\\qquad", " ", s)
    s = s.replace("\\$", "").replace("−", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    percent = bool(re.search(r"\\?%|\\percent\b|\bpercent\b", s))
    s = re.sub(r"\\?%|\\percent\b|\bpercent\b", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree\b|\\circ\b", "", s)
    s = re.sub(r"\\(?:text|textrm|mathrm|mbox|rm|textbf|mathbf)\s*\{([^{}]*)\}", r" \1 ", s)  # units as words
    s = re.sub(r"\{,\}", ",", s)
    s = s.strip().rstrip(".").strip()
    if re.search(r"\\approx|≈", s):
        s = re.split(r"\\approx|≈", s)[-1]
    if "=" in s:  # "x = 5", "6 \\times 7 = 42": the value; an equation such as "y' + ry = 0" is not a number
        *lhs, s = s.split("=")
        if not all(_SIMPLE_LHS.fullmatch(side.strip()) or not re.search(
                r"[A-Za-z]", re.sub(r"\\(?:times|cdot|frac|dfrac|left|right)\b", "", side)) for side in lhs):
            return "", percent
    s = re.sub(r"^\\(?:approx|sim)\s*", "", s.strip())
    s = re.sub(r"\s+", " ", s).strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?:\s.*)?", s):  # thousands separators
        s = s.replace(",", "")
    elif re.fullmatch(r"[-+]?\d{1,3}(?: \d{3})+(?:\.\d+)?", s):  # thin-space thousands: 1\,000
        s = s.replace(" ", "")
    m = _TRAILING_UNITS.match(s)
    if m:
        s = m.group(1)
    return s.strip().rstrip("."), percent


def _to_fraction(num: str) -> Fraction:
    return Fraction(num.replace("−", "-"))


def _parse_number(text: str) -> tuple[Fraction, bool, Fraction | None] | None:
    """(value, percent, tolerance) of a number written as text, or None.

    The tolerance is half a unit in the last written digit for decimals and e-notation (approximate
    values), None for integers and fractions (exact)."""
    s, percent = _clean_number_text(text)
    if not s:
        return None
    s = re.sub(r"^\{(.*)\}$", r"\1", s)
    try:
        if re.fullmatch(_NUM, s):
            value = _to_fraction(s)
            return value, percent, _half_ulp(s) if "." in s else None
        m = _SCI.match(s)
        if m:
            mant, exp = m.group(1), m.group(2) or m.group(3)
            return _to_fraction(f"{mant}e{exp.replace('−', '-')}"), percent, _half_ulp(f"{mant}e{exp.replace('−', '-')}")
        m = _POW10.match(s)
        if m:
            exp = int(m.group(2).replace("−", "-"))
            value = Fraction(10) ** exp
            return (-value if m.group(1) in "-−" and m.group(1) else value), percent, None
        m = _FRAC.match(s)
        if m:
            value = _to_fraction(m.group(2)) / _to_fraction(m.group(3))
            return (-value if m.group(1) else value), percent, None
        m = _SLASH.match(s)
        if m:
            return _to_fraction(m.group(1)) / _to_fraction(m.group(2)), percent, None
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _half_ulp(num: str) -> Fraction | None:
    try:
        exponent = Decimal(num.replace("−", "-").lstrip("+")).as_tuple().exponent
    except InvalidOperation:
        return None
    return Fraction(1, 2) * Fraction(10) ** exponent if isinstance(exponent, int) else None


def _numbers_match(pred: Fraction | float, gold: Fraction, tol: Fraction | None) -> bool:
    diff = abs(Fraction(pred) - gold) if isinstance(pred, Fraction) else abs(float(pred) - float(gold))
    if tol is not None and diff <= tol * Fraction(1000000001, 1000000000):
        return True
    return diff <= Fraction(1, 10 ** 9) * abs(gold) if gold else diff <= Fraction(1, 10 ** 12)


def _e_notation_to_latex(text: str) -> str:
    """``4.5e33`` -> ``4.5\\times 10^{33}`` so that math-verify does not read ``e`` as Euler's number."""
    return _E_NOTATION.sub(lambda m: f"{m.group(1)}\\times 10^{{{m.group(2)}}}", text)


# ----------------------------------------------------------------------------------------------------------
# letters (AMC-style choices inside math answers)

_LETTER_GOLD = re.compile(r"^\(?\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-E])\s*\)?\s*\}?\s*\)?$")
_LETTER_IN_ANSWER = [
    re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{\s*\(\s*([A-E])\s*\)\s*\}"),  # \textbf{(B)}
    re.compile(r"\(\s*\\(?:text|textbf|mathrm|mathbf)\s*\{\s*([A-E])\s*\}\s*\)"),  # (\text{B})
    re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{\s*([A-E])\s*\}"),  # \text{B}
    re.compile(r"\(\s*([A-E])\s*\)"),  # (B)
    re.compile(r"^\s*([A-E])\s*(?:[.:)]|$)"),  # B / B. / B)
]
_LETTER_LABEL = re.compile(r"^\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*\(?\s*[A-E]\s*\)?\s*\}|\(\s*[A-E]\s*\)|[A-E]\))"
                           r"(?:\s|\\[ ,;:!]|~|\\quad|:)*")


def _letter_of(answer: str, last: bool = False) -> str | None:
    hits: list[tuple[int, str]] = []
    for pattern in _LETTER_IN_ANSWER:
        hits += [(m.start(), m.group(1)) for m in pattern.finditer(answer)]
        if hits and not last:
            return min(hits)[1]
    return max(hits)[1] if hits else None


# ----------------------------------------------------------------------------------------------------------
# math

@functools.lru_cache(maxsize=4096)
def _mv_parse(text: str, kind: str) -> list:
    """math-verify's parse of ``text`` with the ``kind`` ("pred" / "gold") extraction settings and our timeout ([] on
    a parse failure or timeout). Cached: a gold is parsed once for all the samples of its item (callers only read
    the list)."""
    return parse(text, extraction_config=_EXTRACTION[kind], parsing_timeout=MV_TIMEOUT_S)


def _mv_verify(gold: list, pred: list) -> bool:
    """math-verify's verify with our timeout (False on a timeout)."""
    return bool(verify(gold, pred, timeout_seconds=MV_TIMEOUT_S))


def _normalize_gold(gold: str) -> str:
    gold = str(gold).strip()
    if gold.startswith("[") and gold.endswith("]"):  # an OlympiadBench list rendered as a string
        try:
            items = ast.literal_eval(gold)
        except (ValueError, SyntaxError):
            items = None
        if not (isinstance(items, list) and items and all(isinstance(i, str) for i in items)) or any(
                re.search(r"[\x00-\x1f]", i) for i in items):  # rendered without escaping: split by hand
            inner = re.fullmatch(r"\[\s*(['\"])(.*)\1\s*\]", gold, re.DOTALL)
            items = re.split(r"['\"]\s*,\s*['\"]", inner.group(2)) if inner else None
        if items and all(isinstance(i, str) for i in items):
            gold = ", ".join(items)
    gold = re.sub(r"(?<!\\)\$", "", gold)
    gold = re.sub(r"\bnp\.(arc)?(sin|cos|tan|exp|log|sqrt)\b", r"\\\1\2", gold)
    gold = re.sub(r"(?<=\d)\.(?=\s*/)", "", gold)  # -1./3
    gold = re.sub(r"^\\quad\s*", "", gold.strip())
    return gold.strip().rstrip(".").strip()


def _simple_text(s: str) -> str:
    """A string for a plain comparison: text wrappers, spacing commands, spaces and a final period dropped."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|textrm)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,;:! ]|\\(?:q?quad|left|right)\b|(?<!\\)\$|\s", "", s)
    return s.rstrip(".").lower()


def _pred_value(answer: str) -> tuple[Fraction | float, bool, Fraction | None] | None:
    """The number an answer string states (literal parse first, then math-verify), or None."""
    answer = _LETTER_LABEL.sub("", answer, count=1) if _LETTER_LABEL.match(answer) else answer
    got = _parse_number(answer)
    if got is None:
        spans = re.findall(r"(?<!\\)\$([^$]+)(?<!\\)\$", answer)
        if spans:
            got = _parse_number(spans[-1])
    if got is not None:
        return got
    _clean, percent = _clean_number_text(answer)
    parsed = _mv_parse(f"$\\boxed{{{_e_notation_to_latex(answer)}}}$", "pred")
    if parsed and not isinstance(parsed[0], str):
        expr = parsed[0]
        try:
            if getattr(expr, "free_symbols", {1}) == set() and getattr(expr, "is_number", False):
                value = complex(expr.evalf())
                if abs(value.imag) < 1e-12:
                    if percent:  # math-verify divides by 100; undo it, the percent flag is kept
                        return float(value.real) * 100, percent, None
                    return float(value.real), percent, None
        except (TypeError, ValueError, OverflowError):
            return None
    return None


def grade_math(generated: str, gold: str, truncated: bool = False) -> tuple[bool, str | None]:
    """(correct, parsed prediction). See the module docstring for the rules.

    ``truncated``: the generation hit the token limit; an answer without a final-answer marker (boxed,
    "The answer is", "Final answer:") then gets no credit and reports None."""
    gold_text = _normalize_gold(gold)
    generated = first_turn(generated)
    boxed = _last_boxed(generated)
    answer = boxed if boxed is not None and boxed.strip() else _after_marker(generated)
    if answer is None:
        if truncated:
            return False, None
        word = _names_word_gold(generated, gold_text)
        if word is not None:
            return True, word
        predicted = _mv_parse(_e_notation_to_latex(_before_check(generated)), "pred")
        if not predicted:
            return False, None
        answer = str(predicted[-1])
    answer = re.sub(r"\bnp\.(arc)?(sin|cos|tan|exp|log|sqrt)\b", r"\\\1\2", answer.strip())

    gold_letter = _LETTER_GOLD.match(gold_text)
    if gold_letter:
        letter = _letter_of(answer)
        if letter is None and boxed is None:
            letter = _letter_of(generated, last=True)
        return letter == gold_letter.group(1), letter

    gold_number = _parse_number(gold_text)
    if gold_number is not None:
        gold_value, gold_percent, tol = gold_number
        if _SPACED_NUMBERS.fullmatch(_clean_number_text(answer)[0]):
            return False, answer  # "\boxed{1\n1}": two numbers, not their sum (math-verify reads 1 1 as 2)
        got = _pred_value(answer)
        if got is None:
            return _mv_check(gold_text, answer)
        value, pred_percent, pred_tol = got
        tol = tol if pred_tol is not None else None  # rounding only for an answer written as a decimal
        candidates = [value]
        if pred_percent and not gold_percent:  # 25% for a gold 25, or for a fraction-of-one gold 0.25
            scaled = Fraction(value) / 100 if isinstance(value, Fraction) else value / 100
            candidates = [value] if abs(gold_value) > 1 else [scaled] if 0 < abs(gold_value) < 1 else [value, scaled]
        return any(_numbers_match(c, gold_value, tol) for c in candidates), answer
    return _mv_check(gold_text, answer)


def _for_mv(latex: str) -> str:
    """LaTeX math-verify reads: e-notation as powers of ten, ``_{\\text{red}}`` as ``_{red}``, ``y'`` as ``y^{\\prime}``."""
    latex = re.sub(r"_\{\s*\\(?:text|mathrm|rm|textrm)\s*\{\s*([^{}]*?)\s*\}\s*\}", r"_{\1}", latex)
    latex = re.sub(r"(?<=[A-Za-z])''", r"^{\\prime\\prime}", latex)  # y'' -> y^{\prime\prime}
    latex = re.sub(r"(?<=[A-Za-z])'", r"^{\\prime}", latex)
    return _e_notation_to_latex(latex)


def _mv_check(gold_text: str, answer: str) -> tuple[bool, str | None]:
    """math-verify on the normalised gold and the extracted answer (plain text answers compared as text)."""
    if _simple_text(answer) and _simple_text(answer) == _simple_text(gold_text):
        return True, answer
    target = _mv_parse(f"${_for_mv(gold_text)}$", "gold")
    answer_latex = _for_mv(_LETTER_LABEL.sub("", answer, count=1))
    predicted = _mv_parse(f"$\\boxed{{{answer_latex}}}$", "pred") or _mv_parse(answer_latex, "pred")
    if not predicted:
        return False, answer or None
    return bool(target) and _mv_verify(target, predicted), answer


# ----------------------------------------------------------------------------------------------------------
# multiple choice

_UP = r"(?:\*\*|__)?\s*[\[(]?\s*(?:\\text(?:bf)?\{\s*)?(?-i:([A-Z]))\s*\}?\s*[\])]?(?:\*\*|__)?(?![A-Za-z0-9'’\-])"
_LOW = (r"(?:\*\*|__)?\s*[\[(]?\s*(?-i:([a-z]))\s*[\])]?(?:\*\*|__)?"
        r"(?=\s*(?:[.,;:!?)\]]|\*\*|$)|\s+(?:because|since|as)\b)")
_OR_NEXT = r"(?!\s*(?:or|and|/|,|&)\s*(?:option\s+)?\(?(?-i:[A-Z])\)?(?![A-Za-z]))"  # "A or B": ambiguous
_TAKE = r"(?:option|choice|letter)?\s*"
_EXPLICIT = [
    r"\\boxed\s*\{\s*(?:\\text(?:bf)?\{)?\s*\(?\s*{L}\s*\)?\s*\}?\s*\}",
    r"(?:final\s+|correct\s+|best\s+|right\s+|most\s+\w+\s+)?(?:answer|ans\.?|option|choice|response)"
    r"(?:\s+to\s+(?:this|the)\s+question)?\s*(?:\*\*)?\s*"
    r"(?:is|would\s+be|should\s+be|will\s+be|must\s+be|=|:|：|-|–|—)\s*[:：]?\s*(?:\*\*)?\s*"
    r"(?:therefore\s+|then\s+|(?:most\s+)?likely\s+|probably\s+|clearly\s+|definitely\s+)?" + _TAKE + "{L}",
    r"(?:I(?:\s+would|\s+will|'d|’d)\s+(?:choose|select|pick|go\s+with)|I\s+(?:choose|select|pick)|"
    r"(?:let's|let\s+us|we)\s+(?:choose|select|go\s+with)|(?:go|going)\s+(?:to\s+go\s+)?with|left\s+with|leaves(?:\s+us\s+with)?|my\s+(?:final\s+)?(?:answer|choice|pick)\s+(?:is|would\s+be)|"
    r"\bchoose|\bselect)\s*:?\s*" + _TAKE + "{L}",
]
_EXPLICIT_UPPER = [  # letter before the verb: uppercase only ("a is correct" is not a statement)
    r"(?:(?i:option|choice)\s+)?\(?([A-Z])\)?\s+(?:is|seems|would\s+be|appears)\s+(?:to\s+be\s+)?(?:the\s+)?(?:most\s+)?"
    r"(?:correct|right|best|true|answer|accurate|appropriate)\b",
    r"(?i:it\s+is|it's|it’s|it\s+must\s+be|must\s+be|but(?:\s+rather)?|rather|instead,?)\s+(?i:option\s+|choice\s+)?\(?([A-Z])\)?(?=\s*(?:[.!;,)]|$))",
    r"\bis\s+\(?([A-Z])\)?\s*\.?\s*$",  # "... the diagnosis is B." at the very end
    r"(?i:so|thus|hence|therefore)[,:]?\s+(?i:option\s+|choice\s+)?\(?([A-Z])\)?\s*[.!]?\s*$",  # "... So C."
]
_BARE = [
    r"\*\*\s*\(?([A-Z])\)?[.:)]?\s*\*\*",  # **C**, **(C)**
    r"\[([A-Z])\]",  # [B]
    r"^\s*[\[(]?([A-Z])[\])]?(?:[.:)]|\s*[-–—]\s|\s*$)",  # "C. Pancreas", "B)", "(C)", "C" alone
    r"\(([A-Z])\)",  # (C) anywhere
    r"\b(?i:option|choice)\s+\(?([A-Z])\)?(?![A-Za-z0-9'’\-])",  # Option B
]
_NEGATED = re.compile(
    r"\b(?:not|isn't|isn’t|cannot\s+be|can't\s+be|can’t\s+be|rather\s+than|instead\s+of|except|excluding|eliminate|rule\s+out)\s+"
    r"(?:option\s+|choice\s+)?\(?([A-Za-z])\)?(?![A-Za-z0-9'’\-])"
    r"|\b(?:(?:option|choice)\s+)?\(?([A-Z])\)?\s+(?:is|seems|appears)\s+(?:not|incorrect|wrong|false|unlikely)\b",
    re.IGNORECASE)


def _compile(template: str, letter: str) -> re.Pattern:
    return re.compile(template.replace("{L}", letter), re.IGNORECASE | re.MULTILINE)


_EXPLICIT_RE = [_compile(p, _UP + _OR_NEXT) for p in _EXPLICIT] + [_compile(p, _LOW + _OR_NEXT) for p in _EXPLICIT]
_EXPLICIT_UPPER_RE = [re.compile(p, re.MULTILINE) for p in _EXPLICIT_UPPER]
_BARE_RE = [re.compile(p, re.MULTILINE) for p in _BARE]
_LONE_LETTER = re.compile(r"\A\s*[\[(]?\s*([A-Za-z])\s*[\])]?\s*[.:)]?[ \t]*(?:\n|\Z)")


def extract_choice(text: str, choices: list[str] | None = None) -> str | None:
    """The chosen letter, or None when nothing parses (counted as wrong, never defaulted)."""
    letters = LETTERS[: len(choices)] if choices else LETTERS
    if choices and len(choices) > len(LETTERS):
        letters = "ABCDEFGHIJ"[: len(choices)]
    text = first_turn(text)
    cleaned = _NEGATED.sub(" ", text)

    def pick(patterns: list[re.Pattern], last: bool) -> str | None:
        hits = []
        for pattern in patterns:
            for m in pattern.finditer(cleaned):
                letter = next(g for g in m.groups() if g).upper()
                if letter in letters:
                    hits.append((m.start(), letter))
        if not hits:
            return None
        return max(hits)[1] if last else min(hits)[1]

    found = pick(_EXPLICIT_RE + _EXPLICIT_UPPER_RE, last=True)
    if found:
        return found
    if choices:  # "C Pancreas": a letter followed by its own option's text
        for i, choice in enumerate(choices):
            if choice and re.search(rf"^\s*\(?{letters[i]}\)?\s+{re.escape(choice)}", text, re.MULTILINE | re.IGNORECASE):
                return letters[i]
    lone = _LONE_LETTER.match(text)  # "b", "c.", "(b)" as the whole first line
    if lone and lone.group(1).upper() in letters:
        return lone.group(1).upper()
    bare = {m.group(1) for pattern in _BARE_RE for m in pattern.finditer(cleaned) if m.group(1) in letters}
    found = pick(_BARE_RE, last=False) if len(bare) < 3 else None  # 3+ labels: the options echoed back
    if found:
        return found
    if choices:  # the option text itself, when exactly one option is named (and not negated)
        texts = [c.strip().lower().rstrip(".") for c in choices]
        found = _named_option(text, texts)
        if found is None:  # then an option's distinctive word ("Klebsiella" for "Klebsiella pneumoniae")
            words = [[w for w in re.findall(r"[a-z][a-z0-9-]{5,}", t)
                      if not any(w in re.findall(r"[a-z][a-z0-9-]{5,}", o) for j, o in enumerate(texts) if j != i)]
                     for i, t in enumerate(texts)]
            found = _named_option(text, [w[0] if len(w) == 1 and len(texts[i].split()) > 1 else "" for i, w in enumerate(words)])
        if found is not None:
            return letters[found]
    return None


def _named_option(text: str, texts: list[str]) -> int | None:
    """The index of the one option whose text the answer names (plural allowed, negated mentions dropped)."""
    lowered = text.lower()
    hits = []
    for i, c in enumerate(texts):
        if not c:
            continue
        spots = [m.start() for m in re.finditer(rf"(?<![\w]){re.escape(c)}(?:e?s)?(?![\w])", lowered)]
        named = [s for s in spots if not re.search(r"\b(?:not|isn't|rather than|instead of|except)\s+(?:the\s+|an?\s+)?$",
                                                    lowered[max(0, s - 30):s])]
        if named:
            hits.append((i, c))
    # a choice contained in another named choice ("liver" in "liver cirrhosis") does not count twice
    hits = [(i, c) for i, c in hits if not any(c != o and c in o for _j, o in hits)]
    return hits[0][0] if len(hits) == 1 else None
