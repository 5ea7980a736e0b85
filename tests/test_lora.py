"""peft=lora (issue 20): the adapter-off anchor equals a separately loaded frozen base, a LoRA run resumes exactly
after a kill, final/ is the merged model (eval.run scores it) plus final/adapter/, and bad peft input is one line."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from asft_repro import lora
from asft_repro.config import ConfigError, MethodConfig, PeftConfig
from asft_repro.data import PadCollator, load_train_dataset
from asft_repro.modeling import load_model, load_tokenizer
from asft_repro.rundir import RunDirError
from asft_repro.trainer import ASFTTrainer
from conftest import ASFT_RUN, compose_config

LORA = ["peft=lora", "train.learning_rate=5e-3"]


# ---- item 2: the anchor under LoRA ---------------------------------------------------------------------------------

def _trainer(tmp_path: Path, model, tokenizer, method: MethodConfig, **kwargs) -> ASFTTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    return ASFTTrainer(model=model, args=args, processing_class=tokenizer, method=method, **kwargs)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("name", ["asft", "sft_kl"])
def test_adapter_off_anchor_equals_a_separately_loaded_frozen_base(tmp_path, demo_data, tiny_model_path, name, direction):
    """Loss, every metric and the adapter gradients against the adapter-off pass = against a second, frozen copy of the
    base (fp32, 1e-6), on the fused head and on the logits path."""
    cfg = OmegaConf.to_object(compose_config("config", ["experiment=demo", f"data.data_dir={demo_data}", "data.size=64"]))
    tokenizer = load_tokenizer(tiny_model_path)
    batch = PadCollator(tokenizer.pad_token_id)([load_train_dataset(cfg.data, tokenizer)[i] for i in range(6)])
    torch.manual_seed(0)
    policy = lora.wrap(load_model(tiny_model_path, cfg.model, tokenizer), PeftConfig(method="lora", r=4), False)
    for pname, param in policy.named_parameters():
        if "lora_B" in pname:  # a trained adapter: the policy differs from the base
            torch.nn.init.normal_(param, std=0.2)
    method = MethodConfig(name=name, kl_coef=0.3, kl_direction=direction)
    twin = copy.deepcopy(policy)  # before the trainer patches forward (a closure over its model)
    shared = _trainer(tmp_path / "a", policy, tokenizer, method, adapter_anchor=True)
    separate = _trainer(tmp_path / "b", twin, tokenizer, method, base_model=load_model(tiny_model_path, cfg.model, tokenizer))
    assert shared.base_model is None and shared.fused_head
    for fused in (True, False):
        results = []
        for trainer in (shared, separate):
            trainer.fused_head = fused
            trainer.model.zero_grad()
            trainer._metric_sums.clear()
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
            results.append((loss.item(), dict(trainer._metric_sums), grads))
        (loss, sums, grads), (ref_loss, ref_sums, ref_grads) = results
        assert loss == pytest.approx(ref_loss, abs=1e-6) and sums["kl_forward_sum"] > 1.0  # the anchor is not the policy
        assert sums.keys() == ref_sums.keys() and all(sums[k] == pytest.approx(ref_sums[k], abs=1e-5, rel=1e-6) for k in sums)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # lora_A, lora_B x 7 linears x 2 layers
        assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) < 1e-6, fused
        assert all(p.grad is None for n, p in shared.model.named_parameters() if not p.requires_grad)  # base frozen


# ---- items 1, 3: a tiny peft=lora ASFT run ------------------------------------------------------------------------

def lora_cfg(demo_data: Path, out: Path, *extra: str):
    return compose_config("config", [*ASFT_RUN, *LORA, f"data.data_dir={demo_data}", f"output_dir={out}", *extra])


def steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


class Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise Killed("killed after the step-2 checkpoint")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, demo_data, tiny_model_path) -> Path:
    from asft_repro.train import run

    return run(lora_cfg(demo_data, tmp_path_factory.mktemp("lora") / "run"))


@pytest.mark.slow
def test_a_lora_run_killed_after_a_checkpoint_resumes_identically(tmp_path, demo_data, lora_run, monkeypatch):
    import asft_repro.train as train_module

    out = tmp_path / "run"
    real = train_module.training_callbacks
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "training_callbacks", lambda *a: [*real(*a), KillAfterSave()])
        with pytest.raises(Killed):
            train_module.run(lora_cfg(demo_data, out))
    checkpoint = out / "checkpoint-2"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= \
        {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()  # the adapter alone, not the frozen base
    assert not (out / "final").exists()
    # resumed without the peft settings: one line naming them, nothing touched
    record = (out / "run.json").read_text()
    with pytest.raises(RunDirError, match="trained with peft=lora .*resume with the same peft settings: peft=lora") as err:
        train_module.run(compose_config("config", [*ASFT_RUN, "train.learning_rate=5e-3", f"data.data_dir={demo_data}",
                                                   f"output_dir={out}", "train.resume=true"]))
    assert "\n" not in str(err.value) and (out / "run.json").read_text() == record
    train_module.run(lora_cfg(demo_data, out, "train.resume=true"))
    assert [r["step"] for r in steps(out)] == [1, 2, 3, 4]
    assert steps(out) == steps(lora_run)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        got, want = load_file(str(out / "final" / name)), load_file(str(lora_run / "final" / name))
        assert got.keys() == want.keys() and max((got[k] - want[k]).abs().max().item() for k in got) == 0.0


@pytest.mark.slow
def test_killed_while_saving_final_the_resume_publishes_it_from_the_adapter_checkpoint(tmp_path, demo_data, lora_run):
    from asft_repro.train import run

    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    shutil.rmtree(out / "final")
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "train_status": "running"}))
    before = (out / "metrics.jsonl").read_text()
    run(lora_cfg(demo_data, out, "train.resume=true"))
    assert (out / "metrics.jsonl").read_text() == before  # no extra step: the adapter of checkpoint-4, merged
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        got, want = load_file(str(out / "final" / name)), load_file(str(lora_run / "final" / name))
        assert max((got[k] - want[k]).abs().max().item() for k in got) == 0.0


@pytest.mark.slow
def test_final_is_the_merged_model_with_the_adapter_beside_it(lora_run, demo_data, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import eval.run as eval_run

    record = json.loads((lora_run / "run.json").read_text())
    assert "-asft-kl0.05-lora_r8-s42-" in record["run_name"]  # the run name shows the peft settings
    assert record["identity"]["peft.method"] == "lora" and record["identity"]["peft.r"] == 8
    adapter = lora_run / "final" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()  # what a user does with the adapter
    final = load_file(str(lora_run / "final" / "model.safetensors"))
    state = merged.state_dict()
    assert max((final[k] - state[k]).abs().max().item() for k in final) < 1e-6
    assert max((final[k] - base_w).abs().max().item()  # the adapter trained: the merged model is not the base
               for k, base_w in AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict().items()
               if k in final) > 1e-4
    overrides = [f"run_dir={lora_run}", f"eval.benchmarks_dir={demo_data}/benchmarks", "eval.limit=2",
                 "eval.max_new_tokens=4", "benchmarks=[math500]"]
    metrics = eval_run.run(compose_config("eval_run", overrides), overrides)  # eval.run unchanged, from final/
    assert "math500" in json.dumps(metrics)


def test_peft_none_keeps_the_identity_and_lora_names_the_run():
    from asft_repro.identity import config_hash, run_name, training_identity

    plain = training_identity(compose_config("config", ["experiment=demo"]))
    assert not any(k.startswith("peft.") for k in plain)  # peft=none hashes as before peft existed
    assert config_hash(plain) == config_hash(training_identity(compose_config("config", ["experiment=demo", "peft=none"])))
    lora_cell = compose_config("config", ["experiment=demo", "peft=lora", "peft.r=16"])
    assert "-asft-kl0.05-lora_r16-s42-" in run_name(lora_cell)
    assert config_hash(training_identity(lora_cell)) != config_hash(plain)


# ---- item 6: bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["peft=lora", "peft.target_modules=[q_proj,qkv]"],
     "peft.target_modules: qkv is not a linear layer of the decoder blocks of tiny (those are down_proj, gate_proj, "
     "k_proj, o_proj, q_proj, up_proj, v_proj); fix the name, or set null for all of them"),
    (["peft=lora", "peft.r=0"], "peft.r=0 is invalid; set a positive LoRA rank, e.g. 8"),
    (["peft=qlora"], "peft=qlora needs a CUDA GPU (bitsandbytes' 4-bit NF4 base); use peft=lora on this machine"),
])
def test_bad_peft_input_is_one_line_and_writes_nothing(tmp_path, demo_data, tiny_model_path, overrides, message):
    from asft_repro.train import run

    if torch.cuda.is_available() and overrides == ["peft=qlora"]:
        pytest.skip("the CPU-only refusal")
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        run(compose_config("config", [*ASFT_RUN, f"data.data_dir={demo_data}", f"output_dir={out}", *overrides]))
    assert str(err.value) == message
    assert not out.exists()


def test_qlora_needs_bitsandbytes_and_one_gpu_and_peft_refuses_zero3(monkeypatch):
    import builtins

    cfg = lambda *o: OmegaConf.to_object(compose_config("config", ["experiment=demo", *o]))  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match=r"^peft=qlora needs bitsandbytes: pip install 'asft-repro\[qlora\]'"):
        lora.check_peft(cfg("peft=qlora"))
    monkeypatch.setattr(builtins, "__import__", real_import)
    with pytest.raises(ConfigError, match="^peft=lora runs with train.strategy=ddp .* not zero3; set train.strategy=ddp$"):
        lora.check_peft(cfg("peft=lora", "train.strategy=zero3"))
    lora.check_peft(cfg("peft=lora", "peft.target_modules=[q_proj,v_proj]"))  # fine
    lora.check_peft(cfg("peft=none", "peft.target_modules=[nothing]"))  # peft off: not looked at
