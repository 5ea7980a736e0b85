"""Every prompt text the project writes, in one place: training, evaluation and data prep import it from here.

The texts are the paper's (github zhuchichi56/ASFT) byte for byte; ``tests/test_paper_eval.py`` pins them.

* ``alpaca``: the Alpaca template of the paper's train.py, ending ``### Response:`` with no newline; the
  response (then eos) follows directly. Training's default (``data.template=alpaca``).
* ``alpaca_newline``: the same, ending ``### Response:\\n``: the paper's math evaluator (Qwen2.5-Math
  harness, ``--prompt_type alpaca``) adds the newline. ``eval=paper`` scores math with it.
* ``chat``: the tokenizer's chat template with a generation prompt.
* The medical multiple-choice prompt: ``Question: {q}\\n\\nOptions:\\nA. ..\\nB. ..\\n\\nAnswer:`` (the paper's
  ``render_mcq_prompt``); training files hold it without the ``\\n\\nAnswer:`` tail (their instruction field),
  the letter-scoring evaluators add it.
* ``PAPER_STOP``: the stop strings of the paper's math evaluator.

Nothing here imports the rest of the project (config, data and eval all import this module).
"""

from __future__ import annotations

from typing import Any, Sequence

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# the paper's math evaluator: the training prompt plus the newline its harness puts after "### Response:"
ALPACA_EVAL_PROMPT = ALPACA_PROMPT + "\n"

EVAL_TEMPLATES = ("alpaca", "alpaca_newline", "chat")  # eval.template (null = data.template)

LETTERS = "ABCD"
MCQ_ANSWER_CUE = "\n\nAnswer:"
MCQ_ANSWER_SENTENCE = "So the answer to this question is {letter}."  # medical training responses end with it

# the paper's math evaluator's stop strings (it also stops on token ids 151645 / 151643 for qwen2 models,
# which are <|im_end|> and <|endoftext|>, both in this list)
PAPER_STOP = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


def render_prompt(prompt: str, tokenizer: Any, template: str, system: str | None = None) -> str:
    """The text before the response: ``alpaca`` / ``alpaca_newline`` (the paper's) or the tokenizer's chat template."""
    if template == "alpaca":
        return ALPACA_PROMPT.format(instruction=prompt)
    if template == "alpaca_newline":
        return ALPACA_EVAL_PROMPT.format(instruction=prompt)
    if template != "chat":
        raise ValueError(f"template={template!r} is not known; use one of {', '.join(EVAL_TEMPLATES)}")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_mcq(question: str, options: Sequence[str]) -> str:
    """The paper's multiple-choice prompt body, without the answer cue (the instruction of its training files)."""
    lines = [f"Question: {question.strip()}", "", "Options:"]
    lines += [f"{LETTERS[i]}. {str(opt).strip()}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def render_mcq_scoring(question: str, options: Sequence[str]) -> str:
    """The paper's medical evaluator prompt: the body plus ``\\n\\nAnswer:``; the next token is the letter."""
    return render_mcq(question, options) + MCQ_ANSWER_CUE


def stop_strings(stop: Sequence[str] | None) -> list[str]:
    """``eval.stop``: null = the paper's list; an empty list = no stop strings."""
    return list(PAPER_STOP if stop is None else stop)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut at the first stop string (for backends that cannot stop on strings themselves)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]
