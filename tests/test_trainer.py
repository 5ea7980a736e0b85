"""ASFTTrainer: gradient accumulation never rescales the objective, the console gets one line per step,
and a collapsed model is detected."""

from __future__ import annotations

import logging

import pytest
from omegaconf import OmegaConf
from transformers import TrainingArguments

from asft_repro.config import MethodConfig
from asft_repro.data import PadCollator, load_train_dataset
from asft_repro.modeling import load_model, load_tokenizer
from asft_repro.trainer import ASFTTrainer, CollapseMonitor, training_callbacks
from conftest import compose_config


def first_step_grad_norm(tmp_path, demo_data, tiny_model_path, per_device: int, accepts_loss_kwargs: bool) -> float:
    cfg = OmegaConf.to_object(compose_config("config", ["experiment=demo", f"data.data_dir={demo_data}", "data.size=64"]))
    tokenizer = load_tokenizer(tiny_model_path)
    model = load_model(tiny_model_path, cfg.model, tokenizer)
    model.accepts_loss_kwargs = accepts_loss_kwargs  # how transformers learns whether forward takes num_items_in_batch
    args = TrainingArguments(output_dir=str(tmp_path / f"gn{per_device}"), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=16 // per_device, max_steps=1, learning_rate=1e-9,
                             report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = ASFTTrainer(model=model, args=args, train_dataset=load_train_dataset(cfg.data, tokenizer),
                          data_collator=PadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                          method=MethodConfig(name="sft"))
    trainer.train()
    return next(row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_gradient_accumulation_keeps_the_gradient(tmp_path, demo_data, tiny_model_path, accepts_loss_kwargs):
    norms = [first_step_grad_norm(tmp_path, demo_data, tiny_model_path, n, accepts_loss_kwargs) for n in (16, 4)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # was 4x larger for a forward without loss kwargs


def test_console_line_per_logging_step(caplog, tmp_path):
    from types import SimpleNamespace

    callback = training_callbacks(tmp_path / "metrics.jsonl", vocab_size=100)[1]
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, max_steps=10)
    with caplog.at_level(logging.INFO, logger="asft_repro.train"):
        callback.on_log(None, state, None, logs={"loss": 0.5, "ce": 1.25, "kl_forward": 0.01, "learning_rate": 1e-4,
                                                 "grad_norm": 0.7, "epoch": 0.3})
    assert caplog.messages == ["step 3/10 | loss 0.5000 | ce 1.2500 | kl 0.0100 | lr 1.00e-04 | gnorm 0.700"]


def test_collapse_monitor_flags_uniform_or_frozen_models():
    from types import SimpleNamespace

    monitor = CollapseMonitor(vocab_size=100, patience=3)
    state = SimpleNamespace(global_step=0)
    for step in range(1, 6):
        state.global_step = step
        monitor.on_log(None, state, None, logs={"ce": 1.0, "token_prob_mean": 0.5 if step < 3 else 0.01, "grad_norm": 0.3})
    assert monitor.reason and "uniform floor for 3 logging steps up to step 5" in monitor.reason
    healthy = CollapseMonitor(vocab_size=100, patience=3)
    for step in range(10):
        healthy.on_log(None, state, None, logs={"ce": 1.0, "token_prob_mean": 0.4, "grad_norm": 0.0 if step % 2 else 0.1})
    assert healthy.reason is None


@pytest.mark.slow
def test_a_diverged_run_is_flagged_not_silently_complete(tmp_path, demo_data, tiny_model_path):
    import json

    from asft_repro.train import run

    out = run(compose_config("config", ["experiment=demo", f"data.data_dir={demo_data}", "data.size=64", "method=sft",
                                        f"output_dir={tmp_path}/run", "train.learning_rate=30", "train.max_steps=12",
                                        "train.report_to=[]", "train.save_strategy=no", "eval.after_train=false"]))
    record = json.loads((out / "run.json").read_text())
    assert record["train_status"] == "complete" and record["collapsed"] is True
    assert "cross-entropy above a uniform guess" in record["collapse_reason"]


@pytest.mark.slow
def test_trainer_fused_head_matches_the_logits_path(tmp_path, demo_data, asft_run):
    import json

    from safetensors.torch import load_file

    from asft_repro.train import run
    from conftest import ASFT_RUN

    def trained(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]
        return rows, load_file(str(out / "final" / "model.safetensors"))

    logits_run = run(compose_config("config", [*ASFT_RUN, f"data.data_dir={demo_data}", f"output_dir={tmp_path}/logits",
                                               "train.fused_head=false", "train.save_strategy=no"]))
    (rows, weights), (ref_rows, ref_weights) = trained(asft_run), trained(logits_run)  # asft_run: the fused head
    for row, ref in zip(rows, ref_rows, strict=True):
        for key in ("loss", "ce", "dft", "kl_forward", "kl_reverse", "dft_weight_ess", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) < 1e-5
