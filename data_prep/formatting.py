"""Source rows -> training records (prompt/response chat messages) and benchmark items."""

from __future__ import annotations

from typing import Any, Callable

from asft_repro.prompts import LETTERS, MCQ_ANSWER_SENTENCE as ANSWER_SENTENCE, render_mcq  # the one prompt module


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _record(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def numina(row: dict, spec: Any = None) -> dict | str:
    """NuminaMath-CoT: problem -> solution. Returns a record or the reason it is dropped."""
    problem, solution = _text(row.get("problem")), _text(row.get("solution"))
    if not problem or not solution:
        return "empty problem or solution"
    return _record(problem, solution)


def medmcqa(row: dict, spec: Any = None) -> dict | str:
    """MedMCQA: question + 4 options -> explanation + 'So the answer to this question is X.'

    Rows without an explanation are dropped ("no explanation"), as in the paper's released file, unless the
    source sets ``require_explanation: false`` (conf/prep/sources.yaml): then they keep the answer sentence alone.
    """
    require_explanation = True if spec is None else bool(spec.get("require_explanation", True))
    question = _text(row.get("question"))
    options = [_text(row.get(k)) for k in ("opa", "opb", "opc", "opd")]
    cop = row.get("cop")
    if not question or not all(options):
        return "empty question or option"
    if not isinstance(cop, int) or not 0 <= cop < 4:
        return "answer index out of range"
    explanation = _text(row.get("exp"))
    if not explanation and require_explanation:
        return "no explanation"
    answer = ANSWER_SENTENCE.format(letter=LETTERS[cop])
    return _record(render_mcq(question, options), f"{explanation}\n{answer}" if explanation else answer)


def instruction_response(row: dict, spec: Any = None) -> dict | str:
    """The paper's released files: instruction / response."""
    instruction, response = _text(row.get("instruction")), _text(row.get("response"))
    if not instruction or not response:
        return "empty instruction or response"
    return _record(instruction, response)


# formatter(row, spec): spec is the source's entry in conf/prep/sources.yaml (options such as require_explanation)
FORMATTERS: dict[str, Callable[[dict, Any], dict | str]] = {
    "numina": numina, "medmcqa": medmcqa, "instruction_response": instruction_response,
}
# the fields each formatter reads: a source without them is refused before anything is written
FORMATTER_FIELDS: dict[str, tuple[str, ...]] = {
    "numina": ("problem", "solution"), "medmcqa": ("question", "opa", "opb", "opc", "opd", "cop"),
    "instruction_response": ("instruction", "response"),
}


def benchmark_fields(spec: Any) -> list[str]:
    """The fields ``benchmark_item`` reads for ``spec`` (question, answer, options)."""
    options = spec.get("options")
    options = [options] if isinstance(options, str) else list(options or [])
    return [spec.question, spec.answer, *options]


def _answer_letter(value: Any, n_options: int) -> str | None:
    if isinstance(value, int) and 0 <= value < n_options:
        return LETTERS[value]
    if isinstance(value, str) and value.strip().upper() in LETTERS[:n_options]:
        return value.strip().upper()
    return None


def benchmark_item(name: str, spec: Any, row: dict, index: int) -> dict | str:
    """One normalised benchmark item: id, benchmark, prompt, answer, choices, kind."""
    question = _text(row.get(spec.question))
    if not question:
        return "empty question"
    item_id = str(row.get(spec.get("id"), index)) if spec.get("id") else str(index)
    if spec.kind == "math":
        answer = row.get(spec.answer)
        if isinstance(answer, list):  # OlympiadBench: a list of final answers
            answer = answer[0] if answer else None
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        answer = str(answer).strip() if answer is not None else ""
        if not answer:
            return "empty answer"
        return {"id": item_id, "benchmark": name, "prompt": question, "answer": answer, "choices": None, "kind": "math"}
    fields = spec.options
    raw = [row.get(f) for f in fields] if not isinstance(fields, str) else row.get(fields)
    if isinstance(raw, dict):  # MedQA: {"A": .., "B": ..}
        raw = [raw.get(letter) for letter in LETTERS if letter in raw]
    choices = [_text(c) for c in (raw or [])]
    if len(choices) < 2 or not all(choices) or len(choices) > len(LETTERS):
        return "bad options"
    letter = _answer_letter(row.get(spec.answer), len(choices))
    if letter is None:
        return "answer out of range"
    return {"id": item_id, "benchmark": name, "prompt": question, "answer": letter, "choices": choices, "kind": "multiple_choice"}
