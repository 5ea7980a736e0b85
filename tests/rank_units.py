"""Units on a real 2-rank CPU gloo group, run by tests/fsdp2_launch.py inside the fsdp2 launch of
tests/test_fsdp2.py (its ranks already import torch and transformers): the frozen base sharded by the product's
FSDP2 helper computes the full model's logits, the fused head's gradients under FSDP2 equal the full-logits
gradients, and the adaptive-λ controller follows the one-process path on 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from asft_repro.fused_head import FusedLoss, enable_fused_head, response_hidden
from asft_repro.losses import IGNORE_INDEX
import kl_ranks
from test_fused_head import make_batch, make_models, reference


def fsdp2_accelerator(rank: int) -> SimpleNamespace:
    """What accelerate's FSDP2 preparation reads of an Accelerator; accelerate builds FSDP only on GPU backends, so
    these tests stand its state up on a CPU gloo group."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Qwen2DecoderLayer"], reshard_after_forward=True)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), is_fsdp2=True, torch_device_mesh=None,
                           mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"),
                           distributed_type=DistributedType.FSDP)


def sharded_base(rank: int, model_dir: str) -> dict:
    """Shard the frozen base with asft_repro.reference; compare its logits with the full model's."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from asft_repro.reference import prepare_reference_model

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sharded = prepare_reference_model(base, fsdp2_accelerator(rank))
    params = list(sharded.parameters())  # before forward: units that do not reshard after it stay gathered
    local = sum(p.to_local().numel() for p in params if isinstance(p, DTensor))
    total = sum(p.numel() for p in full.parameters())
    ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        diff = (sharded(input_ids=ids).logits - full(input_ids=ids).logits).abs().max().item()
    return {"diff": diff, "all_dtensor": all(isinstance(p, DTensor) for p in params), "local": local, "total": total,
            "frozen": not any(p.requires_grad for p in params), "training": sharded.training}


def fused_head_gradients(rank: int) -> dict:
    """Policy and base sharded by accelerate's FSDP2 preparation: the worst relative gap of fused vs full-logits grads."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    policy, base = make_models(tied=False)
    ids, mask, labels = make_batch(1)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    _loss, _metrics, ref_grads = reference(policy, base, "asft", "forward", [(ids, mask, labels)], n)
    accelerator = fsdp2_accelerator(rank)
    enable_fused_head(policy)
    sharded, sharded_base_model = fsdp2_prepare_model(accelerator, policy), fsdp2_prepare_model(accelerator, base)
    with torch.no_grad():
        base_hidden = response_hidden(sharded_base_model, ids, mask, labels)
    request = FusedLoss(labels, "asft", base_hidden, sharded_base_model.lm_head, chunk_rows=4)
    rows, _stats = sharded(input_ids=ids, attention_mask=mask, from_hidden=request)
    (rows.sum() / n).backward()
    worst = 0.0
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        ref = ref_grads[name]
        worst = max(worst, (grad - ref).abs().max().item() / (ref.abs().max().item() + 1e-12))
    return {"worst": worst}


def run(out_file: str, model_dir: str) -> None:
    """This rank's units (the default group up, as tests/fsdp2_launch.py leaves it), written to ``out_file.<rank>``."""
    rank = torch.distributed.get_rank()
    result = {"base": sharded_base(rank, model_dir), "fused": fused_head_gradients(rank),
              "kl_controller": kl_ranks.controller_path(rank)}
    Path(f"{out_file}.{rank}").write_text(json.dumps(result))
