"""Hydra entry point: ``python -m asft_repro.train [experiment=...] [overrides]``.

Trains one cell (model x data x method) into ``outputs/<experiment_name>/<run_name>/`` and,
with ``eval.after_train=true``, scores the final model on the domain's benchmarks.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments

from asft_repro.config import BASE_METHOD, Config, ConfigError, register_configs
from asft_repro.data import PadCollator, data_manifest, load_train_dataset
from asft_repro.modeling import load_frozen_base, load_model, load_tokenizer, resolve_path
from asft_repro.rundir import METRICS_FILE, RunDirError, check_run_dir, last_checkpoint, read_record, trim_metrics, write_record
from asft_repro.trainer import ASFTTrainer, JsonlMetricsCallback, NonFiniteLossError
from asft_repro.wandb_setup import init_wandb

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


def training_arguments(cfg: Config, out: Path) -> TrainingArguments:
    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = t.per_device_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"per_device_batch_size x world_size = {per_step}")
    return TrainingArguments(
        output_dir=str(out), run_name=cfg.run_name, seed=t.seed,
        per_device_train_batch_size=t.per_device_batch_size, gradient_accumulation_steps=t.global_batch_size // per_step,
        learning_rate=t.learning_rate, num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim, gradient_checkpointing=t.gradient_checkpointing,
        bf16=cfg.model.dtype == "bfloat16", fp16=cfg.model.dtype == "float16",
        logging_steps=t.logging_steps, logging_first_step=True, save_strategy=t.save_strategy, save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=list(t.report_to), deepspeed=t.deepspeed, fsdp=t.fsdp or "",
        fsdp_config=t.fsdp_config, dataloader_num_workers=t.dataloader_num_workers, remove_unused_columns=False,
    )


def train(cfg: Config, out: Path) -> Path:
    """Fine-tune with ``cfg.method``; returns the folder of the final model."""
    model_path = resolve_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = load_model(model_path, cfg.model, tokenizer)
    wants_base = cfg.method.uses_kl or cfg.train.log_kl
    base = load_frozen_base(model_path, cfg.model, tokenizer) if wants_base else None
    dataset = load_train_dataset(cfg.data, tokenizer)
    args = training_arguments(cfg, out)
    if "wandb" in args.report_to and args.process_index == 0:
        init_wandb(cfg, out)
    trainer = ASFTTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, method=cfg.method, base_model=base, loss_chunk_rows=cfg.train.loss_chunk_rows,
        callbacks=[JsonlMetricsCallback(out / METRICS_FILE)],
    )
    checkpoint = last_checkpoint(out) if cfg.train.resume else None
    if checkpoint:
        step = int(Path(checkpoint).name.split("-")[-1])
        trim_metrics(out, step)
        print(f"[asft_repro] resuming {out} from {checkpoint}")
    elif cfg.train.resume and (out / METRICS_FILE).exists():
        (out / METRICS_FILE).unlink()  # no checkpoint to continue from: the run restarts from step 0
    trainer.train(resume_from_checkpoint=checkpoint)
    final = out / "final"
    if cfg.train.save_final_model:
        trainer.save_model(str(final))
    if "wandb" in args.report_to and args.process_index == 0:
        import wandb

        wandb.finish()
    is_main = trainer.is_world_process_zero()
    del trainer, model, base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not is_main:
        sys.exit(0)  # evaluation and bookkeeping run on the main process only
    return final


def run(cfg_node: DictConfig) -> Path:
    """Train (unless method=base), then evaluate; returns the run directory."""
    cfg: Config = OmegaConf.to_object(cfg_node)
    out = Path(cfg.output_dir)
    check_run_dir(out, cfg.train.resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg_node, resolve=True))
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    write_record(out, run_name=cfg.run_name, experiment=cfg.experiment_name, method=cfg.method.name,
                 overrides=overrides, data_manifest=data_manifest(cfg.data) if cfg.method.name != BASE_METHOD else {})
    if cfg.method.name == BASE_METHOD:
        model_path = resolve_path(cfg.model)
        write_record(out, train_status="complete", model_path=model_path)
    elif read_record(out).get("train_status") == "complete":
        model_path = read_record(out)["model_path"]
        print(f"[asft_repro] {out}: training already complete, reusing {model_path}")
    else:
        write_record(out, train_status="running")
        model_path = str(train(cfg, out))
        write_record(out, train_status="complete", model_path=model_path)
    if cfg.eval.after_train:
        from eval.runner import evaluate

        evaluate(cfg, model_path, out / "eval")
    return out


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, RunDirError, FileNotFoundError, NonFiniteLossError) as err:
        sys.exit(f"asft_repro.train: {err}")


if __name__ == "__main__":
    main()
