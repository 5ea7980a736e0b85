"""``make gpu-check`` as far as it runs without a GPU: its refusal, its report, its tokenizer, its step runner."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from asft_repro import gpu_check
from asft_repro.gpu_check import Check, Context, padded_tokenizer, run_checks, write_summary


def test_refuses_without_cuda_in_one_line(monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    message = str(exit_info.value.code)
    assert message.startswith("asft_repro.gpu_check: no CUDA GPU is visible") and "\n" not in message


def test_summary_json_and_markdown_from_fake_results(tmp_path):
    results = [Check("model", "pass", "random Qwen2, hidden 3584", 12.0, {"params": 1.5e9}),
               Check("fsdp2_all_gpus", "skip", "one GPU visible", 0.0),
               Check("kill_resume", "fail", "final weights max |diff| 3.0e-02 (bound 1e-5)", 80.5)]
    info = {"gpus": 1, "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.x", "cuda": "12.x", "vllm": True}
    json_path, md_path = write_summary(results, tmp_path / "gpu_check", info)
    payload = json.loads(json_path.read_text())
    assert payload["passed"] is False and payload["seconds"] == 92.5 and payload["machine"]["gpus"] == 1
    assert [c["status"] for c in payload["checks"]] == ["pass", "skip", "fail"]
    md = md_path.read_text()
    assert md.startswith("# GPU check: FAILED") and "1 x NVIDIA H100 80GB HBM3" in md
    assert "| kill_resume | fail | 80 | final weights max /diff/ 3.0e-02 (bound 1e-5) |" in md  # pipes escaped
    assert write_summary(results[:2], tmp_path / "ok", info) and \
        json.loads((tmp_path / "ok" / "summary.json").read_text())["passed"] is True  # a skip is no failure


def test_a_failing_step_is_its_row_and_a_failed_model_stops_the_run(tmp_path, capsys):
    def model(ctx):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    def later(ctx):
        raise AssertionError("must not run")

    ctx = Context(out=tmp_path, shape={}, layers=2, gpus=1)
    (check,) = run_checks(ctx, [model, later])
    assert (check.name, check.status, check.detail) == ("model", "fail", "RuntimeError: CUDA out of memory.")
    assert "[gpu-check] model: fail" in capsys.readouterr().out


def test_tokenizer_padded_to_a_real_vocabulary_decodes_every_id():
    tokenizer = padded_tokenizer(2000)
    assert len(tokenizer) == 2000
    assert tokenizer.decode([1999]).startswith("<") and tokenizer.decode([1999]).endswith(">")
    text = "Find x such that 2x + 3 = 7."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"


def test_makefile_target_runs_the_module():
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    assert "gpu-check:" in makefile and "-m asft_repro.gpu_check" in makefile


def test_lora_step_trains_lora_on_one_gpu_and_skips_qlora_without_bitsandbytes(tmp_path, monkeypatch):
    launched = []

    def fake_torchrun(ranks, module, args, timeout):
        launched.append((ranks, module, args))
        final = Path(next(a for a in args if a.startswith("output_dir=")).split("=", 1)[1]) / "final"
        (final / "adapter").mkdir(parents=True)
        (final / "config.json").write_text("{}")
        (final / "adapter" / "adapter_config.json").write_text("{}")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(gpu_check, "torchrun", fake_torchrun)
    monkeypatch.setattr(gpu_check, "_imports", lambda module: False)
    ctx = gpu_check.Context(out=tmp_path, shape=gpu_check.SMOKE_SHAPE, layers=2, gpus=8, smoke=True)
    check = gpu_check.lora(ctx)
    assert check.status == "pass" and "peft=qlora skipped: bitsandbytes is not installed" in check.detail
    ((ranks, module, args),) = launched
    assert (ranks, module) == (1, "asft_repro.train")
    assert {"peft=lora", "train.strategy=ddp", "train.global_batch_size=4"} <= set(args)
    monkeypatch.setattr(gpu_check, "_imports", lambda module: module == "bitsandbytes")
    launched.clear()
    assert gpu_check.lora(ctx).status == "pass" and [a for *_, args in launched for a in args if a.startswith("peft=")] \
        == ["peft=lora", "peft=qlora"]


def test_checks_option_runs_a_subset_with_what_it_needs_and_refuses_unknown_names():
    names = [step.__name__ for step in gpu_check.selected_steps("kill_resume, lora")]
    assert names == ["build_model", "prepare_data", "one_gpu", "lora", "kill_resume"]  # STEPS' order, needs added
    assert gpu_check.selected_steps("") == list(gpu_check.STEPS.values())
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--checks", "lora,qlora"])
    message = str(exit_info.value.code)
    assert "unknown check(s) qlora" in message and "kill_resume" in message and "\n" not in message


def test_the_summary_is_rewritten_after_every_check(tmp_path):
    seen = []

    def first(ctx):
        return Check("model", "pass", "ok")

    def second(ctx):
        seen.append(json.loads((tmp_path / "summary.json").read_text()))  # what a machine taken back now leaves
        return Check("fsdp2_1gpu", "pass", "ok")

    ctx = Context(out=tmp_path, shape={}, layers=2, gpus=1)
    run_checks(ctx, [first, second], report=lambda rows: write_summary(rows, tmp_path, {}))
    assert [c["name"] for c in seen[0]["checks"]] == ["model"]
    assert [c["name"] for c in json.loads((tmp_path / "summary.json").read_text())["checks"]] == ["model", "fsdp2_1gpu"]


def test_children_keep_an_existing_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")  # packages installed with pip install --target on a bare machine
    path = gpu_check._env(None)["PYTHONPATH"].split(os.pathsep)
    assert path == [str(gpu_check.REPO_ROOT), "/tmp/site"]


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_counts_matmul_parameters_not_the_embedding_lookup(tied):
    with gpu_check.torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    total = sum(p.numel() for p in model.parameters())
    assert gpu_check.matmul_params(model) == (total if tied else total - 1000 * 64)  # a tied table is the head's matmul
