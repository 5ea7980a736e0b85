"""Padding-free batches (``train.padding_free``): a micro-batch's records concatenated into one row, no padding.

The collator lays the records end to end in a [1, S] row (S = the sum of their lengths), with ``position_ids``
restarting at 0 at each record and no ``attention_mask``, the packed format transformers' masking utilities detect
(``masking_utils.find_packed_sequence_indices``) and flash-attention's variable-length kernels consume. The first
label of every record is IGNORE_INDEX: a padded batch never predicts a row's first token (the loss shifts labels),
so neither may the packed row (from the previous record's last token). The response rows then come out in the
padded batch's order (record by record, token by token), so the fused head, the logits path, ``num_items_in_batch``
(the Trainer counts ``labels[..., 1:]``) and the cached anchor's per-record rows are the padded batch's, unchanged.

Attention stays within each record: ``flash_attention_*`` and ``flex_attention`` do that from the position ids
themselves; ``sdpa`` and ``eager`` models are switched to :data:`PACKED_SDPA`, an attention function registered
with transformers' ``AttentionInterface`` that runs causal SDPA per record (no [S, S] mask: a block-diagonal mask
over the whole row would cost more attention than the padded batch). Policy and frozen base get the same
implementation and the same position ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from asft_repro.losses import IGNORE_INDEX

log = logging.getLogger("asft_repro.train")
PACKED_SDPA = "asft_packed_sdpa"
NATIVE = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")  # packed via position_ids
SWITCHED = ("sdpa", "eager", PACKED_SDPA)  # run as PACKED_SDPA


@dataclass
class PaddingFreeCollator:
    """Concatenates the records into one row: input_ids, labels (first label of each record ignored) and
    position_ids [1, S]; ``record_key`` (int64 [B]) as :class:`asft_repro.data.PadCollator` passes it."""

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for f in features:
            ids += f["input_ids"]
            labels += [IGNORE_INDEX] + list(f["labels"][1:])
            positions += range(len(f["input_ids"]))
        out = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([positions])}
        if features and all("record_key" in f for f in features):
            out["record_key"] = torch.tensor([int(f["record_key"]) for f in features], dtype=torch.int64)
        return out


def record_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each record of a packed [1, S] row: a record starts where its position is 0."""
    starts = (position_ids[0] == 0).nonzero()[:, 0].tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], position_ids.shape[-1]]))


_LAST_ROW: list = [None, []]  # [the position_ids tensor last split, its spans]


def row_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """:func:`record_spans`, read once per packed row: every layer of policy and base is handed the same position_ids
    tensor, so the record boundaries cross to the host once a step instead of once a layer (a GPU sync each)."""
    if _LAST_ROW[0] is not position_ids:
        _LAST_ROW[:] = [position_ids, record_spans(position_ids)]
    return _LAST_ROW[1]


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, run per record on a packed row (causal within each record); any other batch
    (a padded one, with its mask) goes to ``sdpa_attention_forward`` as it is."""
    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    spans = row_spans(position_ids)
    if len(spans) == 1:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
             for a, b in spans]
    return torch.cat(parts, dim=1), None


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a packed row (the attention function splits it by record); SDPA's mask for anything else."""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP / DeepSpeed wrapper and inside a peft PeftModel (``peft=lora``), whose
    attention implementation is the one that runs."""
    model = getattr(model, "module", model)
    base = getattr(model, "get_base_model", None)
    return base() if callable(base) else model


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot take packed rows, or None: it must dispatch attention through transformers'
    AttentionInterface (``_supports_attention_backend``: Qwen2, Llama and most decoders), attend to the full
    causal context (no sliding-window layers) and use one of :data:`NATIVE` or :data:`SWITCHED`."""
    model = transformers_model(model)
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if config is None or not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return "the model has sliding-window attention layers"
    if impl not in NATIVE + SWITCHED:
        return f"model.attn_implementation={impl} has no packed-sequence path (use sdpa, flash_attention_2 or flex_attention)"
    return None


def enable_padding_free(*models: torch.nn.Module | None) -> bool:
    """Configure ``models`` (policy, frozen base) for packed rows; True when all can take them. Otherwise one warning
    line says why and the run keeps padded batches (nothing is changed)."""
    present = [m for m in models if m is not None]
    reason = next((r for r in map(unsupported_reason, present) if r), None)
    if reason:
        log.warning("train.padding_free: %s; training on padded batches (set train.padding_free=false to silence this)",
                    reason)
        return False
    for model in map(transformers_model, present):
        if model.config._attn_implementation in ("sdpa", "eager"):
            model.set_attn_implementation(PACKED_SDPA)
    return True
