"""Place the frozen base model the way the policy is distributed (after TRL's helpers).

Single device / DDP: moved to the device (a frozen model needs no DDP wrapper).
DeepSpeed: its own inference engine (ZeRO-3 sharded when the policy is, else stage 0).
FSDP / FSDP2: sharded with the same plugin settings as the policy.
Multi-GPU paths follow the libraries' documented APIs; CI checks only the single-device path.
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def _prepare_deepspeed(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0  # replicate; ZeRO-1/2 only shard optimizer state, which a frozen model lacks
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _prepare_fsdp(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    plugin = accelerator.state.fsdp_plugin
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp import fully_shard

        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module)
        fully_shard(model)
        return model.eval()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    plugin.set_auto_wrap_policy(model)
    wrapped = FSDP(model, sharding_strategy=plugin.sharding_strategy, cpu_offload=plugin.cpu_offload,
                   auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                   sync_module_states=plugin.sync_module_states, use_orig_params=plugin.use_orig_params,
                   limit_all_gathers=plugin.limit_all_gathers, device_id=accelerator.device)
    return wrapped.eval()


def prepare_reference_model(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The frozen model, placed or sharded to match ``accelerator``'s setup."""
    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _prepare_deepspeed(model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return _prepare_fsdp(model, accelerator)
    return model.to(accelerator.device)
