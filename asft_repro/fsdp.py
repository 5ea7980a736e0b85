"""``train.strategy=fsdp2`` as a cluster runs it, on GPUs and on CPU gloo ranks alike.

* :func:`fsdp2_arguments`: the TrainingArguments fields (full shard, per-layer units, rank-0 weight loading,
  SHARDED_STATE_DICT checkpoints: each rank writes its own torch.distributed.checkpoint shard, nothing is
  gathered on rank 0 while training).
* :func:`shard_on_cpu`: the ONE place where accelerate's multi-CPU state becomes its FSDP state. accelerate
  builds FSDP only on GPU-like backends; on CPU ranks it would silently run DDP. Called by
  ``ASFTTrainer.create_accelerator_and_postprocess``.
* :func:`retied`: final/ is still one Hugging Face folder (gathered once, at the end), tied weights saved once.
* :class:`ShardLayout`: records the strategy and world size in every checkpoint's trainer_state.json, which
  the resume rules read (:mod:`asft_repro.shards`).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


def fsdp2_arguments(gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments fields for FSDP2 full_shard with sharded (per-rank) checkpoints."""
    return {"fsdp": True, "fsdp_config": {
        "version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True, "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": gradient_checkpointing}}


def shard_on_cpu(accelerator: Accelerator, plugin_args: dict[str, Any] | None) -> bool:
    """Give CPU (gloo) ranks the FSDP state accelerate gives GPU ranks; True when it did.

    accelerate's ``AcceleratorState`` turns an FSDP plugin into ``DistributedType.FSDP`` only in its branch for
    GPU-like backends (accelerate/state.py), so on ``MULTI_CPU`` it drops the plugin. This does what that branch
    does (the plugin's mixed precision, the plugin, the distributed type, also in ``PartialState``'s shared
    state, which accelerate's collectives read); everything after it (``fsdp2_prepare_model``, DCP save/load,
    clipping) is accelerate's own FSDP2 code path, unchanged.
    """
    if not plugin_args or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # private, as AcceleratorState.__init__ itself does it: PartialState keeps its own copy of the type, which
    # accelerate's collectives (gather / reduce) and data-loader sharding read
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun / SLURM / submitit, ``--nproc_per_node 1`` too)."""
    return PartialState().distributed_type != DistributedType.NO


def shards_this_launch(strategy: str) -> bool:
    """Whether ``strategy`` shards here: fsdp2 under a launcher; one process started without one has nothing to
    shard and trains as ddp does (as accelerate does on one GPU)."""
    return strategy == "fsdp2" and launched()


def retied(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tied parameters (one Parameter under several names) as one tensor again: gathering a sharded model copies
    each name apart, and ``save_pretrained`` drops tied duplicates only when they share storage."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        source = first.setdefault(id(param), name)
        if source != name and name in state_dict and source in state_dict:
            state_dict[name] = state_dict[source]
    return state_dict


class ShardLayout(TrainerCallback, ExportableState):
    """Stored by the Trainer in each checkpoint's trainer_state.json (``stateful_callbacks``): how it was laid out."""

    def __init__(self, strategy: str, world_size: int, sharded: bool) -> None:
        self.strategy, self.world_size, self.sharded = strategy, world_size, sharded

    def state(self) -> dict[str, Any]:
        return {"args": {"strategy": self.strategy, "world_size": self.world_size, "sharded": self.sharded},
                "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        # resuming a checkpoint saved before this callback existed: the Trainer's next save would raise KeyError
        state.stateful_callbacks.setdefault(type(self).__name__, self.state())
