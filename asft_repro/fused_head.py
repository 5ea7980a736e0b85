"""Response-only fused LM head: the whole SFT / DFT / ASFT loss from hidden states, chunk by chunk.

The decoder runs to its last hidden states; only the rows whose next token is a response token are
kept ([N, H]). Per chunk of rows, the policy logits ``h @ W^T`` (and the base's, from the base's
hidden states at the same rows and its own head) are formed in float32, the loss and every metric
are computed with the same per-chunk math as :func:`asft_repro.losses.compute_loss`, and the chunk
is dropped; backward recomputes it and sends the gradient to the hidden states and to the head
weight (tied embeddings included). No [B, T, V] tensor of any dtype and no [N, V] float32 tensor
beyond one chunk ever exists.

``enable_fused_head(model)`` lets ``model(input_ids=..., attention_mask=..., from_hidden=fn)`` run the
decoder and return ``fn(last_hidden_states, head)`` through whatever wraps the model (DDP, FSDP2's root
hooks, accelerate's autocast), as TRL's ``add_fused_lm_head`` does; the decoder and head are looked up at
call time, and an FSDP2 DTensor head weight is gathered with ``full_tensor()``. ``FusedLoss`` is that
``fn`` for the policy; ``ResponseRows`` for the frozen base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from asft_repro.anchor_cache import (AnchorRows, anchor_grad, anchor_kl_into, anchor_terms, complete_log_probs,
                                     masked_log_tail)
from asft_repro.losses import (IGNORE_INDEX, METHODS_WITH_DFT_WEIGHT, METHODS_WITH_KL, KLDirection, Method,
                               _compute_dtype, chunk_grad, chunk_stats, chunks, response_rows, row_losses)

CHUNK_BUDGET_MB = 256  # float32 work per chunk: about 6 [rows, V] buffers (logits, log-probs, base, gradient)


def auto_chunk_rows(vocab_size: int, budget_mb: float = CHUNK_BUDGET_MB) -> int:
    """Rows per chunk so that one chunk's float32 work stays within ``budget_mb``."""
    return max(1, int(budget_mb * 2**20 // (6 * 4 * vocab_size)))


def head_weight(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias, gathered when FSDP2 left them sharded (a DTensor)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
    z = hidden @ weight.to(hidden.dtype).t()
    if bias is not None:
        z = z + bias.to(z.dtype)
    return z.to(cdtype)


def _base_log_probs(sl: slice, logp: torch.Tensor, base_hidden, base_weight, base_bias, anchor_ids, anchor_logq,
                    anchor_rest) -> torch.Tensor | None:
    """One chunk's base log-probs: from the resident base's hidden rows, or completed from the cached top-k."""
    if base_hidden is not None:
        return torch.log_softmax(_logits(base_hidden[sl], base_weight, base_bias, logp.dtype), dim=-1)
    if anchor_ids is not None:
        return complete_log_probs(logp, anchor_ids[sl], anchor_logq[sl], anchor_rest[sl])
    return None


class _FusedHeadLoss(torch.autograd.Function):
    """Row losses [N] and stats [N, 4] from hidden rows [N, H] and head weights [V, H]; recomputes in backward.

    The base is either the resident model's hidden rows (``base_hidden``, ``base_weight``, ``base_bias``) or the
    cached top-k anchor (``anchor_ids`` [N, k], ``anchor_logq`` [N, k], ``anchor_rest`` [N]). With k < V the
    cached KL and its gradient are formed in O(k) per row beside the policy's own log-probs
    (:func:`asft_repro.anchor_cache.anchor_stats` / ``anchor_grad``: the same values as ``chunk_stats`` /
    ``chunk_grad`` on the completed log q~, without a second [chunk, V] distribution); with k >= V the cached
    distribution is the whole one and goes through ``chunk_stats`` / ``chunk_grad``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, base_hidden, base_weight, base_bias,
                dft_weight: bool, kl_coef: float, reverse: bool, chunk_rows: int,
                anchor_ids=None, anchor_logq=None, anchor_rest=None):
        cdtype = _compute_dtype(hidden.dtype)
        sparse = base_hidden is None and anchor_ids is not None and anchor_ids.shape[1] < weight.shape[0]
        parts, tails = [], []
        for sl in chunks(hidden.shape[0], chunk_rows):
            logp = torch.log_softmax(_logits(hidden[sl], weight, bias, cdtype), dim=-1)
            if sparse:  # the cached top-k anchor: O(k) per row beside log p, which is then used as scratch
                chunk = chunk_stats(logp, targets[sl], None, dft_weight)
                terms = anchor_terms(logp, anchor_ids[sl], anchor_logq[sl], anchor_rest[sl], consume=True)
                lost = torch.isneginf(terms.log_tail)  # the policy's whole tail underflowed: recompute exactly
                if lost.any():
                    rows = lost.nonzero()[:, 0]
                    again = torch.log_softmax(_logits(hidden[sl][rows], weight, bias, cdtype), dim=-1)
                    terms.log_tail[rows] = masked_log_tail(again, terms.ids[rows])
                parts.append(anchor_kl_into(chunk, terms))
                tails.append(terms.log_tail)
                del logp, terms
                continue
            logq = _base_log_probs(sl, logp, base_hidden, base_weight, base_bias, anchor_ids, anchor_logq, anchor_rest)
            parts.append(chunk_stats(logp, targets[sl], logq, dft_weight))
            del logp, logq
        stats = torch.cat(parts) if parts else torch.zeros(0, 4, dtype=cdtype, device=hidden.device)
        ctx.anchor_tail = torch.cat(tails) if sparse and tails else None  # log(1 - P_S) per row, reused in backward
        ctx.save_for_backward(hidden, weight, bias, targets, base_hidden, base_weight, base_bias, stats,
                              anchor_ids, anchor_logq, anchor_rest)
        ctx.kl_coef, ctx.reverse, ctx.chunk_rows = kl_coef, reverse, chunk_rows
        ctx.mark_non_differentiable(stats)
        return row_losses(stats, kl_coef, reverse), stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        (hidden, weight, bias, targets, base_hidden, base_weight, base_bias, stats,
         anchor_ids, anchor_logq, anchor_rest) = ctx.saved_tensors
        cdtype = stats.dtype
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=cdtype, device=weight.device)  # accumulated in fp32
        grad_bias = torch.zeros(bias.shape, dtype=cdtype, device=bias.device) if bias is not None else None
        for sl in chunks(hidden.shape[0], ctx.chunk_rows):
            logp = torch.log_softmax(_logits(hidden[sl], weight, bias, cdtype), dim=-1)
            if ctx.anchor_tail is not None and ctx.kl_coef:
                terms = anchor_terms(logp, anchor_ids[sl], anchor_logq[sl], anchor_rest[sl], ctx.anchor_tail[sl])
                g = anchor_grad(logp, targets[sl], terms, stats[sl], ctx.kl_coef, ctx.reverse, grad_rows[sl])
                del logp, terms
            else:
                logq = (_base_log_probs(sl, logp, base_hidden, base_weight, base_bias, anchor_ids, anchor_logq,
                                        anchor_rest) if ctx.kl_coef else None)
                g = chunk_grad(logp, targets[sl], logq, stats[sl], ctx.kl_coef, ctx.reverse, grad_rows[sl])
                del logp, logq
            grad_hidden[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight.addmm_(g.t(), hidden[sl].to(cdtype))
            if grad_bias is not None:
                grad_bias += g.sum(0)
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return (grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None, None, None, None, None, None, None,
                None, None, None)


@dataclass
class FusedLoss:
    """What the fused forward needs besides the inputs: labels, the objective, and the base's rows."""

    labels: torch.Tensor
    method: str
    base_hidden: torch.Tensor | None = None  # [N, H] base hidden states at the response rows
    base_head: torch.nn.Module | None = None
    kl_coef: float = 0.05
    kl_direction: str = "forward"
    chunk_rows: int | None = None  # None: auto_chunk_rows(V)
    ignore_index: int = IGNORE_INDEX
    anchor: AnchorRows | None = None  # the cached top-k base at the response rows, instead of base_hidden

    def __call__(self, hidden: torch.Tensor, head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(row losses [N], stats [N, 4]) from the policy's last hidden states [B, T, H] and its head."""
        method = Method(self.method)
        if method in METHODS_WITH_KL and self.base_hidden is None and self.anchor is None:
            raise ValueError(f"method '{method.value}' needs the base model's hidden states (or a cached anchor)")
        rows, targets = response_rows(self.labels, self.ignore_index)
        anchor = None
        if self.base_hidden is None and self.anchor is not None:
            if len(self.anchor) != rows.numel():
                raise ValueError(f"the cached anchor has {len(self.anchor)} rows for {rows.numel()} response tokens; "
                                 f"rebuild the anchor cache for this data (`python -m asft_repro.anchor ...`)")
            anchor = self.anchor.to(hidden.device)
        policy_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        weight, bias = head_weight(head)
        base_weight, base_bias = head_weight(self.base_head) if self.base_hidden is not None else (None, None)
        coef = self.kl_coef if method in METHODS_WITH_KL else 0.0
        return _FusedHeadLoss.apply(
            policy_rows, weight, bias, targets, self.base_hidden, base_weight, base_bias,
            method in METHODS_WITH_DFT_WEIGHT, coef, KLDirection(self.kl_direction) is KLDirection.reverse,
            self.chunk_rows or auto_chunk_rows(weight.shape[0]),
            *((anchor.ids, anchor.logprobs, anchor.log_rest) if anchor is not None else (None, None, None)))


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (returns last hidden states, final norm applied) and the output projection."""
    model = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper
    return model.get_decoder(), model.get_output_embeddings()


def supports_fused_head(model: torch.nn.Module) -> bool:
    """Qwen2 / Llama-style models: a decoder, a plain linear head, no logit scaling or soft-capping."""
    config = getattr(getattr(model, "module", model), "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    try:
        decoder, head = decoder_and_head(model)
    except (AttributeError, NotImplementedError):
        return False
    return decoder is not None and isinstance(head, torch.nn.Linear)


@dataclass
class ResponseRows:
    """``from_hidden`` for the frozen base: its last hidden states at the rows predicting response tokens."""

    labels: torch.Tensor
    ignore_index: int = IGNORE_INDEX

    def __call__(self, hidden: torch.Tensor, _head: torch.nn.Module) -> torch.Tensor:
        rows, _targets = response_rows(self.labels, self.ignore_index)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)


def response_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[N, H] last hidden states of ``model`` at the response rows (called on the root, so FSDP2 hooks run)."""
    enable_fused_head(getattr(model, "module", model))
    return model(input_ids=input_ids, attention_mask=attention_mask, from_hidden=ResponseRows(labels, ignore_index))


def enable_fused_head(model: torch.nn.Module) -> None:
    """Let ``model(..., from_hidden=fn)`` return ``fn(last hidden states, head)`` instead of [B, T, V] logits."""
    if getattr(model, "_fused_head_enabled", False):
        return
    original = model.forward

    def forward(*args: Any, from_hidden: Any = None, **kwargs: Any):
        if from_hidden is None:
            return original(*args, **kwargs)
        decoder, head = decoder_and_head(model)
        kwargs.pop("use_cache", None)
        hidden = decoder(*args, use_cache=False, **kwargs).last_hidden_state
        return from_hidden(hidden, head)

    model.forward = forward
    model._fused_head_enabled = True
