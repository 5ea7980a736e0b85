"""Place the frozen base model the way the policy is distributed (after TRL's helpers).

Single device / DDP: moved to the device (a frozen model needs no DDP wrapper).
DeepSpeed: its own inference engine (ZeRO-3 sharded when the policy is, else stage 0).
FSDP2: sharded by accelerate exactly as the policy is (CI runs it on a 2-rank gloo group).
"""

from __future__ import annotations

import copy

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.fsdp_utils import fsdp2_prepare_model


def _prepare_deepspeed(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    import deepspeed  # deferred: an optional dependency (train.strategy=zero3)

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
    """FSDP2: accelerate's own ``fsdp2_prepare_model``, the function that shards the policy, so the base gets
    the same per-layer units, mesh, mixed-precision and offload policies (and rank-0-only weight loading)."""
    if not getattr(accelerator, "is_fsdp2", False):
        raise ValueError("the frozen base supports FSDP2 only (fsdp_config version 2, the default)")
    return fsdp2_prepare_model(accelerator, model).eval()


def prepare_reference_model(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """The frozen model, placed or sharded to match ``accelerator``'s setup."""
    model.eval().requires_grad_(False)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _prepare_deepspeed(model, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        return _prepare_fsdp(model, accelerator)
    return model.to(accelerator.device)
