"""A run is its resolved training config: the readable run name and the config hash.

The run directory is ``<base>[-<swept key_value>...]-<hash8>``: the base names the Table 1
cell (model, data, size, method, lambda, KL direction, lambda schedule, LoRA / QLoRA rank, seed), each further value swept on the
command line is spelt out, and the hash covers every training-relevant value, so two runs
share a directory only when they would train the same model.
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from asft_repro.files import short_hash
from asft_repro.kl_schedule import SCHEDULE_KEYS, SCHEDULE_SETTINGS, schedule_tag
from asft_repro.methods import KL_METHOD_NAMES as KL_METHODS
# Keys that do not change what is trained (paths, bookkeeping, how the work is laid out).
NON_TRAINING_KEYS = frozenset({
    "data.data_dir", "train.resume", "train.redo_final", "train.report_to", "train.logging_steps", "train.save_strategy",
    "train.save_steps", "train.save_total_limit", "train.dataloader_num_workers", "train.log_kl",
    "train.loss_chunk_rows", "train.fused_head", "train.padding_free", "train.per_device_batch_size",
    "train.gradient_checkpointing", "train.strategy",
    "train.deepspeed", "train.save_final_model", "model.attn_implementation", "model.arch",
})
TRAINING_SECTIONS = ("model", "data", "method", "train", "peft")
# Overrides already spelt out by the base name, or not about training at all.
NAMED_BY_BASE = frozenset({"model", "model.name", "data", "data.name", "data.size", "method", "method.name",
                           "method.kl_coef", "method.kl_direction", "method.kl_schedule", "method.kl_target",
                           "method.kl_coef_end", "train.seed", "experiment", "experiment_name",
                           "peft", "peft.method", "peft.r"})


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def training_identity(cfg: Any) -> dict[str, Any]:
    """Flat ``{key: value}`` of everything that decides the trained model (or, for Base, the model)."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    method = container["method"]["name"]
    sections = ("model",) if method == "base" else TRAINING_SECTIONS
    flat = {k: v for s in sections for k, v in flatten(container.get(s) or {}, f"{s}.").items()}
    if flat.get("peft.method", "none") == "none":  # full fine-tuning: hashes as before peft existed
        flat = {k: v for k, v in flat.items() if not k.startswith("peft.")}
    if method == "base":
        flat.update({"method.name": "base", "data.domain": container["data"]["domain"]})
    elif method not in KL_METHODS:
        flat.pop("method.kl_coef", None), flat.pop("method.kl_direction", None)
    if flat.get("method.anchor", "exact") == "exact":  # the resident base: hashes as before the cache existed
        flat.pop("method.anchor", None), flat.pop("method.anchor_k", None)
    schedule = flat.get("method.kl_schedule") or "constant"  # constant: hashes as before schedules existed
    kept = SCHEDULE_SETTINGS.get(schedule, ()) if method in KL_METHODS and schedule != "constant" else None
    for key in SCHEDULE_KEYS:
        if kept is None or (key != "kl_schedule" and key not in kept):
            flat.pop(f"method.{key}", None)
    return {k: v for k, v in sorted(flat.items()) if k not in NON_TRAINING_KEYS and not k.startswith("model.arch.")}


def peft_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """How two identities' peft settings differ, as one line naming the settings to resume with (None: the same)."""
    def settings(identity: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in identity.items() if k.startswith("peft.")}

    before, after = settings(old), settings(new)
    if before == after:
        return None

    def spelt(peft: dict[str, Any]) -> str:
        if not peft:
            return "peft=none"
        rest = [f"{k}={'null' if v is None else str(v).replace(' ', '')}" for k, v in sorted(peft.items()) if k != "peft.method"]
        return " ".join([f"peft={peft['peft.method']}", *rest])

    return (f"was trained with {spelt(before)} ({'an adapter' if before else 'full fine-tuning'}), this run has "
            f"{spelt(after)}; resume with the same peft settings: {spelt(before)}")


def config_hash(identity: dict[str, Any]) -> str:
    """12 hex characters of the sha256 of the identity (the run directory shows the first 8)."""
    return short_hash(identity)


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys if old.get(k) != new.get(k)]


def base_name(container: dict[str, Any]) -> str:
    """The Table 1 cell: tiny-numina_cot-256-asft-kl0.05-s42 (Base: tiny-math-base); a λ schedule other than
    constant is spelt after λ: ...-asft-kl0.05-klsched_adaptive-t0.3-s42."""
    method = container["method"]
    if method["name"] == "base":
        return f"{container['model']['name']}-{container['data']['domain']}-base"
    tag = method["name"]
    if tag in KL_METHODS:
        tag += f"-kl{method['kl_coef']}" + ("-reverse" if method["kl_direction"] == "reverse" else "") + schedule_tag(method)
    peft = container.get("peft") or {}
    if peft.get("method", "none") != "none":  # ...-asft-kl0.05-lora_r8-s42
        tag += f"-{peft['method']}_r{peft['r']}"
    data = container["data"]
    return f"{container['model']['name']}-{data['name']}-{data['size']}-{tag}-s{container['train']['seed']}"


def swept_values(overrides: list[str], identity: dict[str, Any]) -> list[str]:
    """``leaf_value`` for each command-line override of a training value the base name does not show."""
    parts = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or key in NAMED_BY_BASE or key.startswith("hydra."):
            continue
        if key in identity:
            parts.append(f"{key.rsplit('.', 1)[-1]}_{identity[key]}")
        elif "." not in key and key in TRAINING_SECTIONS:  # a group choice such as train=paper_math
            parts.append(override.replace("=", "_"))
    return [p.replace("/", "_").replace("=", "_") for p in parts]  # no '=' : paths stay valid Hydra overrides


def task_overrides() -> list[str]:
    """This Hydra job's command-line overrides ([] outside a Hydra app, e.g. the compose API in tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run_name(root: DictConfig) -> str:
    """The run directory name for the composed config ``root`` (a Hydra resolver calls this)."""
    resolved = {s: OmegaConf.to_container(root[s], resolve=True) for s in TRAINING_SECTIONS}
    identity = training_identity(resolved)
    return "-".join([base_name(resolved), *swept_values(task_overrides(), identity), config_hash(identity)[:8]])
