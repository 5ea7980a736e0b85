"""Load the policy / frozen base model and tokenizer (hub id, local folder or the tiny model)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from asft_repro.config import ModelConfig
from asft_repro.tiny_model import ensure_tiny_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_TOKEN = "[PAD]"


def resolve_path(cfg: ModelConfig) -> str:
    return str(ensure_tiny_model()) if cfg.path == "tiny" else cfg.path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """Tokenizer with a pad token; adds [PAD] when the model has none (as the reference code does)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(path: str, cfg: ModelConfig, tokenizer: Any | None = None) -> PreTrainedModel:
    """Causal LM in ``cfg.dtype``; embeddings grow (mean-initialised) if the tokenizer did."""
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_frozen_base(path: str, cfg: ModelConfig, tokenizer: Any) -> PreTrainedModel:
    """The frozen starting model for the KL anchor: eval mode, no gradients."""
    base = load_model(path, cfg, tokenizer)
    base.eval()
    base.requires_grad_(False)
    return base
