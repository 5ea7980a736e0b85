"""Hydra entry point: ``python -m asft_repro.train [experiment=...] [overrides]``.

Trains one cell (model x data x method) into ``outputs/<experiment_name>/<run_name>/`` on every
rank of the job (torchrun, accelerate launch, or one SLURM / submitit task per GPU), then, with
``eval.after_train=true``, scores the final model in a fresh process (``python -m eval.run
run_dir=...``), so evaluation never shares a process group or GPU memory with training.
Bookkeeping (run.json, config.yaml, metrics.jsonl, wandb, the lock) happens on rank 0 only.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments

from asft_repro import distributed, lora
from asft_repro.anchor import find_anchor_cache
from asft_repro.hydra_cli import hydra_task, process_main, run_cli
from asft_repro.config import BASE_METHOD, Config, ConfigError, register_configs
from asft_repro.data import PadCollator, data_manifest, load_train_dataset
from asft_repro.diskspace import naming_disk_errors, training_footprint, warn_if_short
from asft_repro.fsdp import fsdp2_arguments, launched, shards_this_launch
from asft_repro.identity import config_hash, task_overrides, training_identity
from asft_repro.modeling import check_model_config, load_model, load_tokenizer, resolve_path, weight_dtypes
from asft_repro.padding_free import PaddingFreeCollator, enable_padding_free
from asft_repro.paths import CONF_DIR
from asft_repro.preemption import Preemption
from asft_repro.rundir import (FINAL_DIR, METRICS_FILE, RunDirError, RunLock, check_run_dir, checkpoint_step,
                               final_problem, has_weights, last_complete_checkpoint, publish_final, read_record,
                               redo_final_command, trim_metrics, write_record)
from asft_repro.shards import layout_change
from asft_repro.trainer import ASFTTrainer, training_callbacks
from asft_repro.wandb_setup import finish_wandb, init_wandb

ZERO3_CONFIG = Path(CONF_DIR) / "deepspeed" / "zero3.json"
log = logging.getLogger("asft_repro.train")
register_configs()
transformers.utils.logging.disable_progress_bar()  # weight loading / saving bars: noise beside the step lines


# ---- what to build -------------------------------------------------------------------------------

def strategy_arguments(cfg: Config, launcher: bool = True) -> dict[str, Any]:
    """TrainingArguments fields for ``train.strategy``: FSDP2 full_shard (GPUs or CPU gloo ranks, see asft_repro/fsdp.py;
    one process not started by a launcher has nothing to shard and trains as ddp does) or ZeRO-3 (CUDA GPUs)."""
    t = cfg.train
    if t.strategy == "fsdp2" and launcher:
        os.environ["ACCELERATE_USE_FSDP"] = "true"  # transformers then loads weights on rank 0 only
        return fsdp2_arguments(t.gradient_checkpointing)
    for var in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING"):  # left by an fsdp2 job earlier in this process
        os.environ.pop(var, None)
    if t.strategy in ("ddp", "fsdp2"):
        return {"gradient_checkpointing": t.gradient_checkpointing}
    if not torch.cuda.is_available():
        raise ConfigError(f"train.strategy={t.strategy} needs CUDA GPUs (DeepSpeed shards only on GPU backends and "
                          f"would silently run DDP here); use train.strategy=fsdp2 or ddp on CPU")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("train.strategy=zero3 needs DeepSpeed: pip install deepspeed (or use train.strategy=fsdp2)") from None
    return {"deepspeed": t.deepspeed or str(ZERO3_CONFIG), "gradient_checkpointing": t.gradient_checkpointing}


def gradient_accumulation(cfg: Config, world_size: int) -> int:
    per_step = cfg.train.per_device_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
                          f"per_device_batch_size x world_size = {cfg.train.per_device_batch_size} x {world_size}; "
                          f"set train.per_device_batch_size to a divisor of {cfg.train.global_batch_size // world_size}"
                          if cfg.train.global_batch_size % world_size == 0 else
                          f"train.global_batch_size={cfg.train.global_batch_size} does not split over {world_size} "
                          f"ranks; use a multiple of {per_step}")
    return cfg.train.global_batch_size // per_step


def training_arguments(cfg: Config, out: Path, world_size: int) -> TrainingArguments:
    """The Trainer's arguments; built before any model so ZeRO-3 / FSDP can load weights sharded."""
    t = cfg.train
    precision = t.resolved_precision(cfg.model.dtype)
    return TrainingArguments(
        output_dir=str(out), run_name=cfg.run_name, seed=t.seed,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation(cfg, world_size),
        learning_rate=t.learning_rate, num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim,
        bf16=precision == "bf16-mixed", fp16=precision == "fp16-mixed",
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=list(t.report_to), dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False, disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False, log_level="warning",
        **strategy_arguments(cfg, launcher=launched()),
    )


# ---- rank 0: check the input, then the run directory ---------------------------------------------

def preflight(cfg: Config) -> None:
    """Everything that can be wrong with the input, checked before anything is written."""
    model_path = resolve_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    check_model_config(model_path, cfg.model.trust_remote_code)
    lora.check_peft(cfg)  # peft=lora / qlora: target modules, CUDA + bitsandbytes for qlora
    if cfg.method.name != BASE_METHOD:
        # bad / empty data, or max_length cutting every response
        dataset = load_train_dataset(cfg.data, tokenizer, with_keys=uses_anchor_cache(cfg))
        if uses_anchor_cache(cfg):  # a missing, half-built, corrupt or mismatched cache fails here, before any write
            find_anchor_cache(cfg, dataset["record_key"], verify=True)


def uses_anchor_cache(cfg: Config) -> bool:
    """method.anchor=cache and the run needs a base (ASFT / SFT+KL, or KL logging): read the cache, load no base."""
    return cfg.method.anchor == "cache" and cfg.method.name != BASE_METHOD and (cfg.method.uses_kl or cfg.train.log_kl)


def log_to_file(out: Path) -> logging.Handler:
    """<run>/train.log receives the console's lines (rank 0)."""
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def open_run(cfg_node: DictConfig, cfg: Config, out: Path, lock: RunLock, world_size: int) -> dict[str, Any]:
    """Take the lock, check identity, write config.yaml / run.json; returns what to do next."""
    identity = training_identity(cfg_node)
    manifest = data_manifest(cfg.data) if cfg.method.name != BASE_METHOD else {}
    out.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    check_run_dir(out, cfg.train.resume, identity, manifest.get("sha256"))
    if not (out / "config.yaml").exists():
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg_node, resolve=True))
    record = read_record(out)
    if not record:
        write_record(out, run_name=cfg.run_name, experiment=cfg.experiment_name, method=cfg.method.name,
                     overrides=task_overrides(), data_manifest=manifest, identity=identity,
                     config_hash=config_hash(identity))
    if cfg.method.name == BASE_METHOD:
        write_record(out, train_status="complete", model_path=resolve_path(cfg.model))
        return {"action": "none"}
    if record.get("train_status") == "complete" and has_weights(Path(record.get("model_path", out / FINAL_DIR))):
        if not reuse_refused(out, record, cfg.train.redo_final):
            log.info("%s: training already complete, reusing %s", out, record["model_path"])
            return {"action": "none"}
    checkpoint = last_complete_checkpoint(out, set_aside=True) if cfg.train.resume else None
    change = checkpoint and layout_change(checkpoint, cfg.train.strategy, shards_this_launch(cfg.train.strategy), world_size)
    if change:  # a sharded checkpoint resumes only on the layout that wrote it; nothing touched yet
        raise RunDirError(change)
    if checkpoint is None:
        (out / METRICS_FILE).unlink(missing_ok=True)  # nothing to continue from: restart at step 0
    else:
        step, max_steps = checkpoint_step(checkpoint)
        trim_metrics(out, step)
        log.info("%s: resuming from %s (step %d)", out, checkpoint.name, step)
    write_record(out, train_status="running", world_size=world_size, strategy=cfg.train.strategy,
                 precision=cfg.train.resolved_precision(cfg.model.dtype))
    finished = checkpoint is not None and 0 < max_steps <= step  # killed while writing final/
    return {"action": "save_only" if finished else "train", "checkpoint": str(checkpoint) if checkpoint else None}


def reuse_refused(out: Path, record: dict[str, Any], redo_final: bool) -> bool:
    """Whether a complete run's final/ must be re-saved (it differs from run.json's ``final_files`` and
    ``train.redo_final=true``); a difference without redo_final is refused in one line, never reused."""
    problem = final_problem(Path(record["model_path"]), record)
    if problem is None:
        return False
    if not redo_final:
        raise RunDirError(f"{problem}, so the finished run in {out} is not reused; re-save final/ from the last "
                          f"checkpoint with `{redo_final_command(record)}` (or retrain into a new experiment_name)")
    log.warning("%s: %s; re-saving final/ from the last checkpoint (train.redo_final=true)", out, problem)
    return True


def warn_about_space(cfg: Config, out: Path, model: torch.nn.Module) -> None:
    """One warning line when ``out``'s filesystem cannot hold the run's checkpoints and final model (estimate:
    :func:`asft_repro.diskspace.training_footprint`; checkpoints = train.save_total_limit, 1 when unlimited, 0 with
    save_strategy=no)."""
    t = cfg.train
    kept = 0 if t.save_strategy == "no" else (t.save_total_limit or 1)  # unlimited: at least one
    if cfg.peft.enabled:  # checkpoints: the fp32 adapter alone (+ AdamW); final/: the merged model in the base's dtype
        params, weight_bytes = sum(p.numel() for p in model.parameters() if p.requires_grad), 4
        merged = sum(p.numel() * (4 if p.dtype == torch.uint8 else p.element_size()) for p in model.parameters())
        need = training_footprint(params, weight_bytes, kept, False) + (merged if t.save_final_model else 0)
    else:
        params, weight_bytes = sum(p.numel() for p in model.parameters()), next(model.parameters()).element_size()
        need = training_footprint(params, weight_bytes, kept, t.save_final_model)
    warn_if_short(out, need, f"{kept} checkpoint(s) of {params / 1e6:.1f}M parameters x ({weight_bytes} + 8 AdamW) "
                             f"bytes" + (" + final/" if t.save_final_model else ""))


def close_run(out: Path, final: Path, collapse: str | None) -> None:
    write_record(out, train_status="complete", model_path=str(final), collapsed=collapse is not None,
                 collapse_reason=collapse)
    if collapse:
        log.warning("%s: the model collapsed (%s); it is flagged in run.json and in the tables", out, collapse)


# ---- all ranks: training -------------------------------------------------------------------------

def train(cfg: Config, out: Path, plan: dict[str, Any]) -> Path:
    """Fine-tune with ``cfg.method`` on every rank; returns the published ``final/`` folder."""
    state = distributed.PartialState()
    args = training_arguments(cfg, out, state.num_processes)
    model_path = resolve_path(cfg.model)
    policy_dtype, base_dtype = weight_dtypes(cfg)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    wants_base = (cfg.method.uses_kl or cfg.train.log_kl) and not uses_anchor_cache(cfg)
    if cfg.peft.enabled:  # a frozen half-precision (or 4-bit) base under fp32 adapters; the anchor is its adapter-off pass
        model = load_model(model_path, cfg.model, tokenizer, dtype=base_dtype, **lora.load_kwargs(cfg.peft, base_dtype))
        model = lora.wrap(model, cfg.peft, cfg.train.gradient_checkpointing, cfg.train.seed)
        base = None
    else:
        model = load_model(model_path, cfg.model, tokenizer, dtype=policy_dtype)
        base = load_model(model_path, cfg.model, tokenizer, dtype=base_dtype) if wants_base else None
    with args.main_process_first(desc="tokenising"):
        dataset = load_train_dataset(cfg.data, tokenizer, with_keys=uses_anchor_cache(cfg))
    anchor_cache = None
    if uses_anchor_cache(cfg):  # checked by rank 0's preflight (sha256 included); every rank maps the shards
        anchor_cache = find_anchor_cache(cfg, dataset["record_key"], verify=False)
        if anchor_cache.vocab_size != model.get_output_embeddings().weight.shape[0]:
            raise ConfigError(f"the anchor cache {anchor_cache.folder} has a vocabulary of {anchor_cache.vocab_size}, the "
                              f"model {model.get_output_embeddings().weight.shape[0]}; rebuild it with `python -m asft_repro.anchor ...`")
        log.info("base anchor: %s (top-%d, no base model loaded)", anchor_cache.folder, anchor_cache.k)
    if "wandb" in args.report_to and state.is_main_process:
        write_record(out, wandb_id=init_wandb(cfg, out))
    distributed.on_main(warn_about_space, cfg, out, model)
    preemption = Preemption()  # SIGTERM / SIGUSR1: save a checkpoint at the step's end and stop (asft_repro/preemption.py)
    # train.padding_free: packed rows when policy and base support them, else padded batches (one warning line)
    padding_free = cfg.train.padding_free and enable_padding_free(model, base)
    collator = PaddingFreeCollator() if padding_free else PadCollator(tokenizer.pad_token_id)
    trainer = ASFTTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator,
        processing_class=tokenizer, method=cfg.method, base_model=base, loss_chunk_rows=cfg.train.loss_chunk_rows,
        fused_head=cfg.train.fused_head, anchor_cache=anchor_cache, adapter_anchor=cfg.peft.enabled and wants_base,
        callbacks=[*training_callbacks(out / METRICS_FILE, len(tokenizer)), preemption],
    )
    if plan["action"] == "save_only":  # killed after the last checkpoint, before final/: no extra step
        # private, on purpose: the public train(resume_from_checkpoint=...) would load the same way but also redo the
        # end-of-training bookkeeping (a second summary row in metrics.jsonl); this loads the weights only, as the
        # Trainer saved them (DDP, FSDP2 sharded or DeepSpeed layouts alike)
        trainer._load_from_checkpoint(plan["checkpoint"])
    else:
        with preemption.installed():
            trainer.train(resume_from_checkpoint=plan["checkpoint"])
        preemption.stop_if_preempted(out)
    staging = out / f"{FINAL_DIR}.tmp"
    distributed.on_main(lambda: shutil.rmtree(staging, ignore_errors=True))
    with naming_disk_errors("the final model", staging, RunDirError, "rerun with train.resume=true"):
        if cfg.train.save_final_model:
            trainer.save_model(str(staging))  # collective under FSDP / ZeRO-3
        distributed.barrier()
        final = distributed.on_main(publish_final, out, staging) if cfg.train.save_final_model else out / FINAL_DIR
    distributed.on_main(close_run, out, final, trainer.collapse_reason())
    del trainer, model, base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return final


def evaluate_in_subprocess(cfg: Config, out: Path) -> None:
    """``python -m eval.run run_dir=OUT`` in a fresh process with this run's eval settings."""
    overrides = [f"eval.{k}={json.dumps(v)}" for k, v in OmegaConf.to_container(OmegaConf.structured(cfg.eval)).items()]
    command = [sys.executable, "-m", "eval.run", f"run_dir={json.dumps(str(out))}", *overrides]
    log.info("evaluating in a fresh process: %s", " ".join(command[:4]))
    result = subprocess.run(command, env=distributed.child_env(), stderr=subprocess.PIPE, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr[-4000:])
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RunDirError(f"evaluation of {out} failed ({last}); the training is saved: rerun "
                          f"`python -m eval.run run_dir={out}`")


def run(cfg_node: DictConfig) -> Path:
    """Train (unless method=base or already done), then evaluate in a fresh process; returns the run dir."""
    cfg: Config = OmegaConf.to_object(cfg_node)
    if cfg.eval.after_train and not cfg.train.save_final_model and cfg.method.name != BASE_METHOD:
        raise ConfigError("eval.after_train=true needs the final model; set train.save_final_model=true, "
                          "or eval.after_train=false")
    state = distributed.setup()
    is_main = state.is_main_process
    out = Path(cfg.output_dir).absolute()  # run.json's model_path must not depend on the cwd of a later reader
    lock = RunLock(out) if is_main else None
    handler = None
    finished = False
    try:
        distributed.on_main(preflight, cfg)
        plan = distributed.on_main(open_run, cfg_node, cfg, out, lock, state.num_processes)
        handler = log_to_file(out) if is_main else None
        if plan["action"] != "none":
            train(cfg, out, plan)
        finished = True
    finally:
        if lock is not None:
            lock.release()
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        finish_wandb(failed=not finished)
        distributed.teardown(synchronize=finished)  # after a failure a rank may be elsewhere: no barrier
    if is_main and cfg.eval.after_train:
        evaluate_in_subprocess(cfg, out)
    return out


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@hydra_task("asft_repro.train")
def _main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    run_cli("asft_repro.train", "config", _main)


if __name__ == "__main__":
    process_main(main)
