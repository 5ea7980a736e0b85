"""``train.padding_free``: a packed row gives the padded batch's loss, every metric and the gradients (1e-5, fp32),
for every method and KL direction, on the fused head, the logits path and the cached anchor; unsupported models
fall back with one line. (Two ranks: the padding-free jobs of tests/test_fsdp2.py's launch.)"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import TrainingArguments

from asft_repro.anchor_cache import AnchorRows, topk_rows
from asft_repro.config import MethodConfig
from asft_repro.data import PadCollator, record_key
from asft_repro.fused_head import response_hidden
from asft_repro.kl_controller import KLController
from asft_repro.losses import IGNORE_INDEX
from asft_repro.modeling import load_model, load_tokenizer
from asft_repro.padding_free import (PACKED_SDPA, PaddingFreeCollator, enable_padding_free, record_spans,
                                     row_spans, unsupported_reason)
from asft_repro.trainer import ASFTTrainer
from conftest import compose_config

LENGTHS = [(3, 4), (30, 57), (9, 2), (15, 26)]  # (prompt, response) tokens: very different record lengths
METHODS = [("sft", "forward"), ("dft", "forward"), ("asft", "forward"), ("asft", "reverse"), ("sft_kl", "forward"),
           ("sft_kl", "reverse")]
K = 16  # cached top-k rows, below the tiny vocabulary: the O(k) estimator


def records(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for prompt, response in LENGTHS:
        ids = torch.randint(0, vocab, (prompt + response,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "record_key": record_key(ids, labels)})
    return out


def test_collator_packs_records_with_restarting_positions():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    batch = PaddingFreeCollator()(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # the first token of a record is never a target (as in a padded batch, whose loss shifts the labels)
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch and "record_key" not in batch
    assert record_spans(batch["position_ids"]) == [(0, 3), (3, 5)]
    row = batch["position_ids"]
    assert row_spans(row) == [(0, 3), (3, 5)] and row_spans(row) is row_spans(row)  # split once per row, not per layer
    assert row_spans(torch.tensor([[0, 1, 0]])) == [(0, 2), (2, 3)]  # another row: split anew


class KeyedRows:
    """An in-memory anchor cache: the base's top-k rows per record, looked up by record key (as AnchorCache.rows)."""

    def __init__(self, base, feats: list[dict]) -> None:
        self.rows_by_key = {}
        for f in feats:
            ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
            with torch.no_grad():
                logits = base.lm_head(response_hidden(base, ids, None, labels))
            self.rows_by_key[f["record_key"]] = topk_rows(logits, K)

    def rows(self, keys: list[int]) -> AnchorRows:
        parts = [self.rows_by_key[k] for k in keys]
        return AnchorRows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("ids", "logprobs", "log_rest")))


@pytest.fixture(scope="module")
def models(tiny_model_path):
    cfg = compose_config("config", ["experiment=demo"])
    tokenizer = load_tokenizer(tiny_model_path)
    policy = load_model(tiny_model_path, cfg.model, tokenizer)
    base = load_model(tiny_model_path, cfg.model, tokenizer).eval().requires_grad_(False)
    with torch.no_grad():  # a policy that has moved away from its base: the KL terms are not 0
        gen = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return tokenizer, policy, base


def step(trainer: ASFTTrainer, batch: dict, method: str, direction: str, packed: bool):
    """(loss, metric sums, gradients) of one compute_loss + backward on ``batch``."""
    policy = trainer.model
    impl = PACKED_SDPA if packed else "sdpa"
    for model in (policy, trainer.base_model):
        if model is not None:
            model.set_attn_implementation(impl)
    trainer.method = MethodConfig(name=method, kl_direction=direction)
    trainer.kl_control = KLController.from_method(trainer.method) if trainer.method.uses_kl else None
    trainer._metric_sums.clear()
    policy.zero_grad(set_to_none=True)
    num_items = batch["labels"][..., 1:].ne(IGNORE_INDEX).sum()  # what the Trainer counts
    loss = trainer.compute_loss(policy, batch, num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    return loss.item(), dict(trainer._metric_sums), grads, int(num_items)


@pytest.mark.parametrize("path", ["fused", "logits", "cache"])
def test_packed_row_equals_the_padded_batch(models, tmp_path, path):
    tokenizer, policy, base = models
    feats = records(len(tokenizer))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    cache = KeyedRows(base, feats) if path == "cache" else None
    trainer = ASFTTrainer(model=policy, args=args, method=MethodConfig(name="asft"),
                          base_model=None if cache else base, fused_head=path != "logits", anchor_cache=cache)
    policy.train()
    padded = PadCollator(tokenizer.pad_token_id)(feats)
    packed = PaddingFreeCollator()(feats)
    assert packed["input_ids"].shape == (1, sum(a + b for a, b in LENGTHS))
    for method, direction in METHODS:
        want_loss, want_sums, want_grads, want_n = step(trainer, padded, method, direction, packed=False)
        got_loss, got_sums, got_grads, got_n = step(trainer, packed, method, direction, packed=True)
        where = (path, method, direction)
        assert got_n == want_n == sum(b for _, b in LENGTHS) - sum(1 for a, _ in LENGTHS if a == 0)
        assert got_loss == pytest.approx(want_loss, abs=1e-5), where
        assert got_sums.keys() == want_sums.keys(), where
        for key in want_sums:
            assert got_sums[key] == pytest.approx(want_sums[key], abs=1e-5, rel=1e-6), (*where, key)
        for name in want_grads:
            assert (got_grads[name] - want_grads[name]).abs().max().item() < 1e-5, (*where, name)
        if method in ("asft", "sft_kl"):
            assert want_sums["kl_forward_sum"] > 1e-3, where  # the anchor was exercised, not 0 vs 0


def test_attention_stays_within_each_record(models):
    """Each record's hidden states in the packed row are those of the record alone (no leak across records)."""
    tokenizer, _policy, base = models
    feats = records(len(tokenizer))
    base.set_attn_implementation(PACKED_SDPA)
    packed = PaddingFreeCollator()(feats)
    with torch.no_grad():
        row = base.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).last_hidden_state[0]
        base.set_attn_implementation("sdpa")
        alone = [base.model(input_ids=torch.tensor([f["input_ids"]])).last_hidden_state[0] for f in feats]
    assert (row - torch.cat(alone)).abs().max().item() < 1e-5


def test_unsupported_attention_falls_back_with_one_line(models, caplog):
    _tokenizer, policy, _base = models
    policy.set_attn_implementation("sdpa")

    class Plain(torch.nn.Module):
        config = policy.config

    assert unsupported_reason(policy) is None
    assert "AttentionInterface" in unsupported_reason(Plain())
    with caplog.at_level(logging.WARNING, logger="asft_repro.train"):
        assert enable_padding_free(policy, Plain()) is False
    assert len(caplog.messages) == 1 and "training on padded batches" in caplog.messages[0]
    assert policy.config._attn_implementation == "sdpa"  # nothing was changed


def test_a_lora_model_packs_too(models, tmp_path):
    """peft=lora: the PeftModel's inner model takes packed rows, and the adapter-off anchor gives the padded loss."""
    from asft_repro import lora
    from asft_repro.config import PeftConfig
    from asft_repro.modeling import load_model

    tokenizer, _policy, _base = models
    model = load_model(_policy.name_or_path, compose_config("config", ["experiment=demo"]).model, tokenizer)
    peft_model = lora.wrap(model, PeftConfig(method="lora", r=4), gradient_checkpointing=False)
    assert unsupported_reason(peft_model) is None and enable_padding_free(peft_model)
    assert peft_model.get_base_model().config._attn_implementation == PACKED_SDPA
    with torch.no_grad():  # adapters that have moved: the adapter-off anchor differs from the policy
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False)
    trainer = ASFTTrainer(model=peft_model, args=args, method=MethodConfig(name="asft"), adapter_anchor=True)
    peft_model.train()
    feats = records(len(tokenizer))
    padded, packed = PadCollator(tokenizer.pad_token_id)(feats), PaddingFreeCollator()(feats)
    want_loss, want_sums, want_grads, _ = step(trainer, padded, "asft", "forward", packed=False)
    got_loss, got_sums, got_grads, _ = step(trainer, packed, "asft", "forward", packed=True)
    assert got_loss == pytest.approx(want_loss, abs=1e-5) and want_sums["kl_forward_sum"] > 1e-3
    for key in want_sums:
        assert got_sums[key] == pytest.approx(want_sums[key], abs=1e-5, rel=1e-6), key
    assert want_grads.keys() == got_grads.keys()
    for name in (n for n in want_grads if "lora_" in n):
        assert (got_grads[name] - want_grads[name]).abs().max().item() < 1e-5, name
