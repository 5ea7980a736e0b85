"""The paper's evaluation, exactly: prompts byte for byte, the eval=paper preset, acc / mean_acc / pass@k, the
paper's medical fallback, MedMCQA explanations, the released chichi56/ASFT files and pinned hub revisions."""

from __future__ import annotations

import json

import datasets
import pytest
from omegaconf import OmegaConf

from asft_repro import prompts
from asft_repro.config import ConfigError, EvalConfig
from conftest import ROOT, compose_config

FIXTURES = ROOT / "data_prep" / "fixtures"
TABLE1 = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")
                if p.stem.startswith(("table1_", "math_", "medical_")))


# --- prompts ----------------------------------------------------------------------------------------------

def test_prompts_byte_for_byte():
    head = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    train = prompts.render_prompt("What is 2+3?", None, "alpaca")
    assert train == head + "### Instruction:\nWhat is 2+3?\n\n### Response:"  # the paper's train.py: no newline
    assert prompts.render_prompt("What is 2+3?", None, "alpaca_newline") == train + "\n"  # its math evaluator adds it
    assert prompts.render_mcq_scoring("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Lung"]) == (
        "Question: Which organ makes insulin?\n\nOptions:\nA. Liver\nB. Pancreas\nC. Kidney\nD. Lung\n\nAnswer:")
    assert prompts.render_mcq("Q?", ["a", "b"]) == "Question: Q?\n\nOptions:\nA. a\nB. b"  # training instruction
    assert prompts.MCQ_ANSWER_SENTENCE.format(letter="C") == "So the answer to this question is C."
    assert prompts.PAPER_STOP == ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")
    assert prompts.stop_strings(None) == list(prompts.PAPER_STOP) and prompts.stop_strings([]) == []
    assert prompts.truncate_at_stop("x = 4<|im_end|>junk</s>", prompts.PAPER_STOP) == "x = 4"


def test_one_prompt_module():
    """Training, prep and evaluation use the same objects: no second copy of a prompt anywhere."""
    import asft_repro.data as data
    import data_prep.formatting as formatting
    import eval.runner as runner

    assert data.render_prompt is prompts.render_prompt
    assert formatting.render_mcq is prompts.render_mcq and formatting.LETTERS is prompts.LETTERS
    math_item = {"kind": "math", "prompt": "1+1?"}
    mc_item = {"kind": "multiple_choice", "prompt": "Q?", "choices": ["a", "b", "c", "d"]}
    assert runner.build_prompt(math_item, "alpaca_newline", None, "loglik").endswith("1+1?\n\n### Response:\n")
    for mode in ("loglik", "paper_fallback"):
        assert runner.build_prompt(mc_item, "alpaca", None, mode) == prompts.render_mcq_scoring("Q?", ["a", "b", "c", "d"])
    assert runner.build_prompt(mc_item, "alpaca", None, "generate") == prompts.render_prompt(
        prompts.render_mcq("Q?", ["a", "b", "c", "d"]), None, "alpaca")
    for path in [*ROOT.glob("asft_repro/*.py"), *ROOT.glob("eval/*.py"), *ROOT.glob("data_prep/*.py")]:
        if path.name not in ("prompts.py", "make_fixtures.py"):
            text = path.read_text()
            assert "Write a response that appropriately" not in text and '"\\n\\nAnswer:"' not in text, path


def test_training_prompt_has_no_trailing_newline(tiny_model_path):
    from asft_repro.data import encode
    from asft_repro.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    enc = encode({"instruction": "2+2?", "response": "4"}, tok, "alpaca", 512)
    prompt_len = sum(label == -100 for label in enc["labels"])
    assert tok.decode(enc["input_ids"][:prompt_len]).endswith("### Response:")


# --- the eval=paper preset --------------------------------------------------------------------------------

def test_paper_preset_composes_with_the_papers_values():
    ecfg = OmegaConf.to_object(compose_config("config", ["eval=paper"])).eval
    assert (ecfg.backend, ecfg.template, ecfg.mc_mode) == ("vllm", "alpaca_newline", "loglik")
    assert (ecfg.n_samples, ecfg.temperature, ecfg.top_p, ecfg.max_new_tokens, ecfg.seed) == (16, 1.0, 1.0, 4096, 0)
    assert ecfg.stop is None and prompts.stop_strings(ecfg.stop) == list(prompts.PAPER_STOP)
    assert len(TABLE1) == 2 + 2 * 10  # table1_{math,medical}, then per domain 9 cells and the base row
    for name in TABLE1:
        cell = OmegaConf.to_object(compose_config("config", [f"experiment={name}"])).eval
        assert (cell.n_samples, cell.temperature, cell.template) == (16, 1.0, "alpaca_newline"), name
    greedy = OmegaConf.to_object(compose_config("config", ["experiment=math_asft_10k", "eval=default"])).eval
    assert (greedy.n_samples, greedy.temperature, greedy.template) == (1, 0.0, None)
    old = OmegaConf.to_object(compose_config("config", ["eval=paper_sampling"])).eval
    assert old == ecfg


def test_demo_stays_greedy_and_fast():
    ecfg = OmegaConf.to_object(compose_config("config", ["experiment=demo"])).eval
    assert (ecfg.backend, ecfg.n_samples, ecfg.temperature, ecfg.mc_mode) == ("hf", 1, 0.0, "loglik")
    assert ecfg.max_new_tokens <= 64 and ecfg.template is None


def test_config_time_checks_are_one_line():
    with pytest.raises(ConfigError) as err:
        OmegaConf.to_object(compose_config("config", ["experiment=math_asft_10k", "eval=default", "eval.n_samples=4"]))
    assert str(err.value).startswith("eval.n_samples=4 is invalid") and "eval.temperature=1.0" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=4096 is invalid with eval.max_model_len=4096.*; lower"):
        EvalConfig(max_new_tokens=4096, max_model_len=4096)
    EvalConfig(max_new_tokens=4096, max_model_len=8192)
    EvalConfig(max_new_tokens=4096)  # max_model_len unset: the model's own limit
    with pytest.raises(ConfigError, match="eval.mc_mode='best' is invalid; use loglik, generate or paper_fallback"):
        EvalConfig(mc_mode="best")
    with pytest.raises(ConfigError, match="eval.stop=.* is invalid"):
        EvalConfig(stop=[""])
    with pytest.raises(ConfigError, match="eval.template='alpaca_nl' is invalid"):
        EvalConfig(template="alpaca_nl")


# --- metrics ----------------------------------------------------------------------------------------------

def test_pass_at_k_against_hand_values():
    from eval.runner import pass_at_k

    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(3, 3, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_acc_is_the_first_sample():
    from eval.runner import benchmark_scores

    items = [{"benchmark": "b", "id": str(i)} for i in range(2)]
    done = {"b/0": {"correct": [True, False, False, False], "parsed": ["1", "2", "3", None]},
            "b/1": {"correct": [False, False, True, False], "parsed": ["1", "2", "3", "4"]}}
    scores = benchmark_scores(items, done)
    assert scores["acc"] == scores["accuracy"] == 50.0  # the paper's table: first sample
    assert scores["mean_acc"] == 25.0 and scores["pass@1"] == 25.0 and scores["pass@4"] == 100.0
    assert (scores["num_items"], scores["num_samples"], scores["unparsed"]) == (2, 8, 1)
    one = benchmark_scores(items, {"b/0": {"correct": [True], "parsed": ["A"]}, "b/1": {"correct": [False], "parsed": ["B"]}})
    assert one["acc"] == one["mean_acc"] == one["pass@1"] == 50.0 and "defaulted_to_A" not in one
    assert [k for k in one if k.startswith("pass@")] == ["pass@1"]


# --- the paper's medical evaluator (mc_mode=paper_fallback) ----------------------------------------------

def test_paper_fallback_rules():
    from eval.runner import paper_mc_answer

    # later variants overwrite earlier ones: " A" (-0.1) is replaced by "a" (-5.0), so B (-1.0) wins
    assert paper_mc_answer([(" A", -0.1), ("B", -1.0), ("The", -2.0), ("a", -5.0)], " A") == ("B", "topk")
    assert paper_mc_answer([(" A", -0.1), ("B", -1.0)], " A") == ("A", "topk")
    assert paper_mc_answer([("▁C", -0.5), (" D", -0.7)], "x") == ("D", "topk")  # "▁C" is not a letter after strip
    # no A-D among the top tokens: the first standalone A-D letter of the generated text
    assert paper_mc_answer([("The", -0.1), ("(", -0.2)], "(c)") == ("C", "text")
    assert paper_mc_answer([("The", -0.1)], "d.") == ("D", "text")
    # nothing: "A", which the paper counts silently
    assert paper_mc_answer([("The", -0.1), ("AB", -0.3)], "The") == ("A", "default")
    assert paper_mc_answer([], "") == ("A", "default")
    assert paper_mc_answer([("", -0.1), ("  ", -0.2)], "") == ("A", "default")  # empty tokens are no letter


class FakeTopK:
    """A backend that reports fixed top first tokens (decoded text, log-prob) per prompt."""

    def __init__(self, answers):
        self.answers = answers

    def next_token_topk(self, prompts, k):
        assert k == 10 and all(p.endswith("\n\nAnswer:") for p in prompts)
        return [self.answers[i] for i in range(len(prompts))]


def test_paper_fallback_records_and_defaulted_to_A():
    from types import SimpleNamespace

    from eval.runner import _score_batch, benchmark_scores, check_mc_mode, make_sampling

    batch = [{"id": str(i), "benchmark": "medqa", "kind": "multiple_choice", "prompt": "Q?",
              "choices": ["a", "b", "c", "d"], "answer": gold} for i, gold in enumerate("BCA")]
    backend = FakeTopK([{"text": " B", "top": [(" B", -0.2), ("A", -1.0)]},
                        {"text": "C)", "top": [("C)", -0.1), ("The", -0.5)]},
                        {"text": "The", "top": [("The", -0.1), ("It", -0.5)]}])
    cfg = SimpleNamespace(**{**vars(EvalConfig()), "mc_mode": "paper_fallback"})
    prompts_ = [prompts.render_mcq_scoring(it["prompt"], it["choices"]) for it in batch]
    records = _score_batch(batch, prompts_, backend, cfg, make_sampling(cfg), [0, 1, 2])
    assert [r["parsed"][0] for r in records] == ["B", "C", "A"]
    assert [r["mc_source"] for r in records] == ["topk", "text", "default"]
    scores = benchmark_scores(batch, {f"medqa/{r['id']}": r for r in records})
    assert scores["acc"] == 100.0 and scores["defaulted_to_A"] == 1 and scores["fell_back_to_text"] == 1
    check_mc_mode(cfg, ["medqa"], backend)
    with pytest.raises(ConfigError, match="eval.mc_mode=paper_fallback is invalid with eval.backend=hf"):
        check_mc_mode(cfg, ["medqa"], object())
    check_mc_mode(cfg, ["math500"], object())  # no multiple choice, nothing to check


def test_paper_fallback_end_to_end_on_hf(demo_data, tiny_model_path, tmp_path):
    """The HF backend's top-10 first tokens drive the fallback; metrics.json reports defaulted_to_A."""
    import eval.run as eval_run

    overrides = [f"model_path={tiny_model_path}", f"eval.benchmarks_dir={demo_data}/benchmarks", "eval.limit=4",
                 "benchmarks=[medqa]", "data=demo_medical", "eval.mc_mode=paper_fallback", f"out_dir={tmp_path / 'ev'}"]
    metrics = eval_run.run(compose_config("eval_run", overrides), overrides)
    med = metrics["benchmarks"]["medqa"]
    assert med["num_items"] == 4 and med["unparsed"] == 0 and 0 <= med["defaulted_to_A"] <= 4
    rows = [json.loads(line) for line in (tmp_path / "ev" / metrics["settings_hash"] / "medqa.jsonl").read_text().splitlines()]
    assert all(len(r["top_tokens"]) == 10 and r["mc_source"] in ("topk", "text", "default") for r in rows)
    assert metrics["settings"]["mc_mode"] == "paper_fallback" and metrics["settings"]["stop"] == list(prompts.PAPER_STOP)


# --- data -------------------------------------------------------------------------------------------------

MEDMCQA_ROW = {"question": "Which organ makes insulin?", "opa": "Liver", "opb": "Pancreas", "opc": "Kidney",
               "opd": "Lung", "cop": 1, "exp": "Beta cells of the islets secrete insulin.", "id": "x"}


def test_medmcqa_formatter_requires_an_explanation_by_default():
    from data_prep.formatting import medmcqa

    assert medmcqa({**MEDMCQA_ROW, "exp": None}) == "no explanation"
    assert medmcqa({**MEDMCQA_ROW, "exp": "  "}, {"require_explanation": True}) == "no explanation"
    kept = medmcqa({**MEDMCQA_ROW, "exp": None}, {"require_explanation": False})
    assert kept["messages"][1]["content"] == "So the answer to this question is B."
    full = medmcqa(MEDMCQA_ROW)
    assert full["messages"][0]["content"] == prompts.render_mcq("Which organ makes insulin?", ["Liver", "Pancreas", "Kidney", "Lung"])
    assert full["messages"][1]["content"] == "Beta cells of the islets secrete insulin.\nSo the answer to this question is B."


def test_medmcqa_prep_drops_rows_without_explanation_unless_asked(tmp_path):
    from data_prep.__main__ import prepare_training

    local = tmp_path / "local"
    local.mkdir()
    rows = [{**MEDMCQA_ROW, "id": str(i), "exp": None if i % 3 == 0 else "why"} for i in range(9)]
    (local / "medmcqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = [f"local_dir={local}", "sizes=[6]", "sampling=head"]
    prepare_training("medmcqa", compose_config("prep", [*base, f"out_dir={tmp_path / 'a'}"]))
    manifest = json.loads((tmp_path / "a" / "medmcqa" / "6" / "manifest.json").read_text())
    assert manifest["dropped_by_reason"] == {"no explanation": 3} and manifest["valid_records"] == 6
    keep = [*base, f"out_dir={tmp_path / 'b'}", "sources.training.medmcqa.require_explanation=false"]
    prepare_training("medmcqa", compose_config("prep", keep))
    manifest = json.loads((tmp_path / "b" / "medmcqa" / "6" / "manifest.json").read_text())
    assert manifest["dropped"] == 0 and manifest["valid_records"] == 9


def test_the_three_chichi56_sizes_resolve_locally(tmp_path):
    from data_prep.__main__ import prepare_training

    local = tmp_path / "local" / "asft_release"
    local.mkdir(parents=True)
    lines = (FIXTURES / "asft_release" / "numina_cot_10k.jsonl").read_text().splitlines(keepends=True)
    for size, count in (("10k", 5), ("30k", 10), ("100k", 20)):
        (local / f"numina_cot_{size}.jsonl").write_text("".join(lines[:count]))
    cfg = compose_config("prep", [f"local_dir={tmp_path / 'local'}", f"out_dir={tmp_path / 'out'}", "sizes=[10k,30k,100k]"])
    prepare_training("asft_numina_cot", cfg)
    for size, count in (("10k", 5), ("30k", 10), ("100k", 20)):
        folder = tmp_path / "out" / "asft_numina_cot" / size
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (manifest["data_files"], manifest["count"], manifest["sampling"]) == (f"numina_cot_{size}.jsonl", count, "file")
        records = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
        assert [r["messages"][0]["content"] for r in records] == [json.loads(line)["instruction"].strip() for line in lines[:count]]


def test_chichi56_files_and_pinned_revision_from_the_hub(tmp_path, monkeypatch):
    """Each size loads its own file of chichi56/ASFT at the pinned revision, which the manifest records."""
    import data_prep.sources as sources
    from data_prep.__main__ import prepare_training

    calls = []
    row = {"instruction": "1+1?", "response": "2"}

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, kwargs["data_files"], kwargs["revision"], kwargs["split"]))
        return datasets.Dataset.from_list([row] * 3)

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load_dataset)
    cfg = compose_config("prep", [f"out_dir={tmp_path}", "sizes=[10k,30k,100k]",
                                  "sources.training.asft_numina_cot.revision=0123abc"])
    prepare_training("asft_numina_cot", cfg)
    assert calls == [("chichi56/ASFT", f"numina_cot_{s}.jsonl", "0123abc", "train") for s in ("10k", "30k", "100k")]
    for size in ("10k", "30k", "100k"):
        manifest = json.loads((tmp_path / "asft_numina_cot" / size / "manifest.json").read_text())
        assert manifest["revision"] == "0123abc" and manifest["source"] == "hub:chichi56/ASFT"
    latest = compose_config("prep", [f"out_dir={tmp_path / 'latest'}", "sizes=[10k]"])
    prepare_training("asft_medmcqa", latest)
    assert calls[-1] == ("chichi56/ASFT", "train_medmcqa_alpaca_10k.jsonl", None, "train")
    sources_yaml = OmegaConf.load(ROOT / "conf" / "prep" / "sources.yaml")
    assert all("revision" in spec for spec in sources_yaml.training.values())
    assert sources_yaml.benchmarks.medmcqa.split == "validation"


def test_docs_name_the_scored_medmcqa_split():
    text = (ROOT / "docs" / "runs.md").read_text()
    assert "MedMCQA" in text and "validation" in text and "eval=paper" in text
