"""Letter scoring follows lm-evaluation-harness: the log-prob of exactly " A".." D", from the full vocabulary.

On the tiny model and every multiple-choice fixture item: the HF backend's scores equal a hand computation
(logits -> log_softmax -> the ids of " A".." D"), lowercase and unspaced variants never count, and (where
lm-eval is installed, the dev extra) lm-eval's own loglikelihoods of " A".." D" agree item by item.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from asft_repro.config import ConfigError
from eval.backends import HFBackend, OpenAIServerBackend, letter_token_ids
from eval.runner import _score_batch, build_prompt, load_items

MC_BENCHMARKS = ("medqa", "medmcqa", "mmlu_medical")


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    return HFBackend(tiny_model_path, batch_size=8)


@pytest.fixture(scope="module")
def mc_items(demo_data):
    items = []
    for name in MC_BENCHMARKS:
        items += load_items(name, demo_data / "benchmarks", None)[0]
    assert len(items) >= 90 and all(item["kind"] == "multiple_choice" for item in items)
    return items


def _prompts(items, tokenizer):
    return [build_prompt(item, "alpaca", tokenizer, "loglik") for item in items]


def _single_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens for the tiny tokenizer"
    return ids[0]


@torch.no_grad()
def _hand_scores(model, tokenizer, prompt: str, letters: str) -> dict[str, float]:
    """One prompt, no padding: logits at the last position -> log_softmax -> the ids of " A".." D"."""
    enc = tokenizer(prompt, return_tensors="pt")
    logp = torch.log_softmax(model(**enc).logits[0, -1].float(), dim=-1)
    return {letter: logp[_single_token(tokenizer, f" {letter}")].item() for letter in letters}


def test_letter_ids_are_exactly_the_spaced_capitals(hf):
    ids = letter_token_ids(lambda text: hf.tokenizer.encode(text, add_special_tokens=False), "ABCD")
    assert ids == {letter: _single_token(hf.tokenizer, f" {letter}") for letter in "ABCD"}
    variants = {_single_token(hf.tokenizer, v) for letter in "ABCD" for v in (letter, f" {letter.lower()}")
                if len(hf.tokenizer.encode(v, add_special_tokens=False)) == 1}
    assert variants and not variants & set(ids.values())  # "A", " a", ... are other tokens, never read


def test_hf_letter_scores_equal_the_hand_computation_on_every_fixture_item(hf, mc_items):
    prompts = _prompts(mc_items, hf.tokenizer)
    scores = hf.choice_logprobs(prompts, "ABCD")
    for item, prompt, got in zip(mc_items, prompts, scores):
        want = _hand_scores(hf.model, hf.tokenizer, prompt, "ABCD")
        assert set(got) == set("ABCD")
        for letter in "ABCD":
            assert got[letter] == pytest.approx(want[letter], abs=1e-4), (item["benchmark"], item["id"], letter)


class _BoostLowercase(torch.nn.Module):
    """The tiny model with the variants "A", " a", "a", ... made far likelier than " A".." D"."""

    def __init__(self, model, token_ids: list[int], boost: float = 30.0) -> None:
        super().__init__()
        self.inner, self.token_ids, self.boost = model, token_ids, boost

    @property
    def device(self):
        return self.inner.device

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits[..., self.token_ids] += self.boost
        return out


def test_lowercase_and_unspaced_letters_never_count(hf, mc_items, monkeypatch):
    variants = [hf.tokenizer.encode(v, add_special_tokens=False) for letter in "ABCD"
                for v in (letter, f" {letter.lower()}", letter.lower())]
    boosted = _BoostLowercase(hf.model, sorted({ids[0] for ids in variants if len(ids) == 1}))
    items = mc_items[:24]
    prompts = _prompts(items, hf.tokenizer)
    plain = hf.choice_logprobs(prompts, "ABCD")
    monkeypatch.setattr(hf, "model", boosted)
    scores = hf.choice_logprobs(prompts, "ABCD")
    cfg = SimpleNamespace(mc_mode="loglik")
    records = _score_batch(items, prompts, hf, cfg, None, [0] * len(items))
    for prompt, before, after, record in zip(prompts, plain, scores, records):
        want = _hand_scores(boosted, hf.tokenizer, prompt, "ABCD")
        assert after == pytest.approx(want, abs=1e-4)
        assert sum(math.exp(v) for v in after.values()) < 1e-6  # the boosted variants' mass is not counted
        assert max(after, key=after.get) == max(before, key=before.get) == record["parsed"][0]  # same choice
        assert record["parsed"][0] in "ABCD"


def test_a_letter_of_several_tokens_is_refused():
    vocab = {"Answer:": [1], "Answer: A": [1, 2], "Answer: B": [1, 3, 4]}
    assert letter_token_ids(lambda text: vocab[text], "A") == {"A": 2}
    with pytest.raises(ConfigError, match="mc_mode=generate"):
        letter_token_ids(lambda text: vocab[text], "AB")


def test_openai_letter_reading_is_by_id_or_exact_text():
    backend = OpenAIServerBackend("http://127.0.0.1:9/v1", "m", timeout=1)
    row = {"A": 10, "B": 11}
    by_id = SimpleNamespace(logprobs=SimpleNamespace(top_logprobs=[{"token_id:10": -1.5, "token_id:11": -0.5, "token_id:7": -0.1}]))
    assert backend._read_letters(by_id, row) == {"A": -1.5, "B": -0.5}
    by_text = SimpleNamespace(logprobs=SimpleNamespace(top_logprobs=[{" a": -0.1, "B": -0.2, " B": -3.0}]))
    assert backend._read_letters(by_text, row) == {"A": -math.inf, "B": -3.0}
    missing = SimpleNamespace(logprobs=SimpleNamespace(top_logprobs=[{"token_id:10": -1.5}]))
    with pytest.raises(ConfigError, match="logprob_token_ids"):
        backend._read_letters(missing, row)


LM_EVAL_TASK = """\
task: asft_medqa_letters
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{prompt.strip()}}}}\\n\\nOptions:\\n{{% for c in choices %}}{{{{'ABCD'[loop.index0]}}}}. {{{{c.strip()}}}}\\n{{% endfor %}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_item_level_agreement_with_lm_evaluation_harness(hf, demo_data, tiny_model_path, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra (pip install -e '.[dev]')")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    data_file = demo_data / "benchmarks" / "medqa" / "test.jsonl"
    (tmp_path / "asft_medqa_letters.yaml").write_text(LM_EVAL_TASK.format(data_file=data_file))
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)  # not indexing its 14k task files (~30 s)
    result = simple_evaluate(model="hf", model_args=f"pretrained={tiny_model_path},dtype=float32",
                             tasks=["asft_medqa_letters"], task_manager=tasks, log_samples=True, batch_size=4, device="cpu")
    samples = sorted(result["samples"]["asft_medqa_letters"], key=lambda s: s["doc_id"])
    items = load_items("medqa", demo_data / "benchmarks", None)[0]
    assert len(samples) == len(items) == 24
    prompts = _prompts(items, hf.tokenizer)
    ours = hf.choice_logprobs(prompts, "ABCD")
    for item, prompt, sample, scores in zip(items, prompts, samples, ours):
        assert [tuple(arg) for arg in sample["arguments"]] == [(prompt, f" {letter}") for letter in "ABCD"]
        theirs = {letter: resp[0][0] for letter, resp in zip("ABCD", sample["resps"])}
        assert scores == pytest.approx(theirs, abs=1e-4), item["id"]
        assert max(scores, key=scores.get) == max(theirs, key=theirs.get)
    ours_acc = sum(max(s, key=s.get) == item["answer"] for s, item in zip(ours, items)) / len(items)
    assert result["results"]["asft_medqa_letters"]["acc,none"] == pytest.approx(ours_acc)
