"""The response-only fused head equals compute_loss (values, metrics, parameter gradients) and never builds
a [B, T, V] tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from asft_repro import fused_head
from asft_repro.fused_head import FusedLoss, auto_chunk_rows, enable_fused_head, response_hidden
from asft_repro.losses import IGNORE_INDEX, loss_and_token_sums, summarize, token_stats

VOCAB, BATCH, SEQ = 97, 3, 11
CASES = [("sft", "forward"), ("dft", "forward"), ("asft", "forward"), ("asft", "reverse"), ("sft_kl", "forward")]


def make_models(tied: bool, dtype=torch.float32, vocab: int = VOCAB, hidden: int = 32):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied, max_position_embeddings=64)
    policy = Qwen2ForCausalLM(config).to(dtype)
    base = copy.deepcopy(policy)
    with torch.no_grad():  # the policy has drifted from its base a little
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return policy, base.eval().requires_grad_(False)


def make_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX  # prompt
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    labels[0, -3:] = IGNORE_INDEX
    labels[2, 5] = IGNORE_INDEX  # a hole inside a response
    return ids, mask, labels


def reference(policy, base, method, direction, batches, num_items):
    """compute_loss on full logits: summed loss sums and metrics over micro-batches, gradients accumulated."""
    policy.zero_grad(set_to_none=True)
    total, sums = 0.0, {}
    for ids, mask, labels in batches:
        logits = policy(input_ids=ids, attention_mask=mask).logits
        base_logits = base(input_ids=ids, attention_mask=mask).logits
        loss, part = loss_and_token_sums(logits, labels, method, base_logits, 0.05, direction, num_items=num_items)
        loss.backward()
        total += loss.item()
        sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
    return total, summarize(sums), {n: p.grad.clone() for n, p in policy.named_parameters()}


def fused(policy, base, method, direction, batches, num_items, chunk_rows):
    enable_fused_head(policy)
    policy.zero_grad(set_to_none=True)
    total, sums = 0.0, {}
    for ids, mask, labels in batches:
        with torch.no_grad():
            base_hidden = response_hidden(base, ids, mask, labels)
        request = FusedLoss(labels, method, base_hidden, base.lm_head, 0.05, direction, chunk_rows)
        rows, stats = policy(input_ids=ids, attention_mask=mask, from_hidden=request)
        loss = rows.sum() / num_items
        loss.backward()
        total += loss.item()
        sums = {k: sums.get(k, 0.0) + v for k, v in token_stats(stats, has_base=True).items()}
    return total, summarize(sums), {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("method,direction", CASES)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_fused_equals_compute_loss(method, direction, tied, chunk_rows):
    policy, base = make_models(tied)
    batches = [make_batch(1), make_batch(2)]  # two accumulated micro-batches, one token count
    num_items = sum(int((b[2][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    ref_loss, ref_metrics, ref_grads = reference(policy, base, method, direction, batches, num_items)
    loss, metrics, grads = fused(policy, base, method, direction, batches, num_items, chunk_rows)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-6, abs=1e-9), key
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item() + 1e-12
        assert (grads[name] - grad).abs().max().item() <= 1e-5 * scale, name
    assert policy.get_output_embeddings().weight.grad.abs().sum() > 0  # the head is trained


def test_bf16_is_close_to_fp32():
    policy, base = make_models(tied=False)
    policy16, base16 = make_models(tied=False, dtype=torch.bfloat16)
    batch = [make_batch(1)]
    n = int((batch[0][2][:, 1:] != IGNORE_INDEX).sum())
    loss32, m32, _ = fused(policy, base, "asft", "forward", batch, n, 4)
    loss16, m16, grads16 = fused(policy16, base16, "asft", "forward", batch, n, 4)
    assert loss16 == pytest.approx(loss32, rel=3e-2)
    assert m16["kl_forward"] == pytest.approx(m32["kl_forward"], rel=0.1, abs=1e-3)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads16.values())


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_sequence_by_vocab_tensor_is_ever_built():
    vocab = 4096
    policy, base = make_models(tied=False, vocab=vocab, hidden=16)
    enable_fused_head(policy)
    ids = torch.randint(0, vocab, (4, 64))
    labels = ids.clone()
    labels[:, :32] = IGNORE_INDEX
    calls = []
    policy.lm_head.register_forward_hook(lambda *_: calls.append(1))
    chunk = 8
    with LargestTensor() as probe:
        base_hidden = response_hidden(base, ids, None, labels)
        rows, _stats = policy(input_ids=ids, from_hidden=FusedLoss(labels, "asft", base_hidden, base.lm_head, chunk_rows=chunk))
        rows.sum().backward()
    assert not calls  # the head is never applied to all positions
    assert probe.largest <= max(chunk * vocab, vocab * 16)  # one chunk of logits, or the head weight itself
    assert probe.largest < 4 * 64 * vocab / 8


def _count_chunks(monkeypatch) -> list[int]:
    """Counts calls of the per-chunk function (each one forms a chunk's logits and log-softmax)."""
    import asft_repro.fused_head as fused_head

    calls, original = [], fused_head._chunk
    monkeypatch.setattr(fused_head, "_chunk", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("method,direction", [("asft", "forward"), ("asft", "reverse"), ("dft", "forward")])
def test_summed_rows_are_computed_once_and_weighted_rows_recompute(method, direction, monkeypatch):
    """The trainer's loss (rows summed, any scale) takes its gradient from the forward: no chunk twice. Rows weighted
    unequally recompute the chunks in backward, and their gradients equal the full-logits path's."""
    from asft_repro.losses import _TokenLoss, response_rows

    policy, base = make_models(tied=True)
    ids, mask, labels = make_batch(1)
    enable_fused_head(policy)
    calls = _count_chunks(monkeypatch)
    with torch.no_grad():
        base_hidden = response_hidden(base, ids, mask, labels)
    request = FusedLoss(labels, method, base_hidden, base.lm_head, 0.3, direction, chunk_rows=5)
    rows, _stats = policy(input_ids=ids, attention_mask=mask, from_hidden=request)
    n_chunks = len(calls)
    assert n_chunks == -(-rows.numel() // 5)
    (rows.sum() / 7).backward()
    assert len(calls) == n_chunks  # backward only scaled the forward's gradients

    weights = torch.linspace(0.5, 2.0, rows.numel())
    policy.zero_grad(set_to_none=True)
    rows, _stats = policy(input_ids=ids, attention_mask=mask, from_hidden=request)
    (rows * weights).sum().backward(retain_graph=True)
    assert len(calls) == 3 * n_chunks  # forward, then the recomputation
    fused_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    (rows * weights).sum().backward()  # a second backward through the same graph: the same gradients again
    for name, param in policy.named_parameters():
        assert torch.allclose(param.grad, 2 * fused_grads[name], rtol=1e-5, atol=1e-7), name

    policy.zero_grad(set_to_none=True)
    logits = policy(input_ids=ids, attention_mask=mask).logits
    base_logits = base(input_ids=ids, attention_mask=mask).logits
    flat_rows, targets = response_rows(labels)
    vocab = logits.shape[-1]
    ref_rows, _ = _TokenLoss.apply(logits.reshape(-1, vocab), flat_rows, targets, base_logits.reshape(-1, vocab),
                                   method != "sft", 0.3 if method == "asft" else 0.0, direction == "reverse", 5)
    (ref_rows * weights).sum().backward()
    for name, param in policy.named_parameters():
        scale = param.grad.abs().max().item() + 1e-12
        assert (fused_grads[name] - param.grad).abs().max().item() <= 1e-5 * scale, name


def test_no_gradient_work_without_grad(monkeypatch):
    import asft_repro.fused_head as fused_head

    policy, base = make_models(tied=False)
    ids, mask, labels = make_batch(1)
    enable_fused_head(policy)
    built = []
    monkeypatch.setattr(fused_head._HeadGrads, "__init__", lambda self, *a: built.append(1) or None)
    with torch.no_grad():
        base_hidden = response_hidden(base, ids, mask, labels)
        rows, stats = policy(input_ids=ids, attention_mask=mask,
                             from_hidden=FusedLoss(labels, "asft", base_hidden, base.lm_head, chunk_rows=4))
    assert not built and torch.isfinite(rows).all() and stats.shape == (rows.numel(), 4)


def test_auto_chunk_fits_the_budget():
    assert auto_chunk_rows(151936) == 110  # 256 MB of float32 work / (4 buffers x 4 bytes x V)
    assert auto_chunk_rows(10) > 1000 and auto_chunk_rows(10**9) == 1
    assert auto_chunk_rows(151936, buffers=2) == 220  # SFT / DFT: two buffers, the same 256 MB


@pytest.mark.parametrize("method", ["sft", "asft"])
def test_every_method_fills_the_same_chunk_budget_with_the_buffers_it_uses(method, monkeypatch):
    """SFT / DFT allocate the two [rows, V] buffers they touch (twice the rows per chunk), the anchored methods four:
    the same float32 bytes per chunk, none allocated and left untouched."""
    vocab = 16384  # budget rows: 2048 with two buffers, 1024 with four
    policy, base = make_models(tied=False, vocab=vocab)
    enable_fused_head(policy)
    ids = torch.randint(0, vocab, (2, 1000), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :200] = IGNORE_INDEX  # 1600 response rows: one two-buffer chunk (cut to them), or two four-buffer ones
    with torch.no_grad():
        base_hidden = response_hidden(base, ids, None, labels) if method == "asft" else None
    allocated, empty = [], torch.empty

    def recording_empty(*shape, **kwargs):
        out = empty(*shape, **kwargs)
        if out.dim() == 2 and out.shape[1] == vocab:
            allocated.append(tuple(out.shape))
        return out

    monkeypatch.setattr(fused_head.torch, "empty", recording_empty)
    policy(input_ids=ids, from_hidden=FusedLoss(labels, method, base_hidden, base.lm_head if base_hidden is not None
                                                else None, chunk_rows=None, kl_coef=0.05))
    monkeypatch.setattr(fused_head.torch, "empty", empty)
    assert allocated == ([(1024, vocab)] * 4 if method == "asft" else [(1600, vocab)] * 2)
    assert 2 * auto_chunk_rows(vocab, buffers=2) * vocab * 4 == 4 * auto_chunk_rows(vocab) * vocab * 4 == 256 * 2**20
