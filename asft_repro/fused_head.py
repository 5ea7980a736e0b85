"""Response-only fused LM head: the whole SFT / DFT / ASFT loss from hidden states, chunk by chunk.

The decoder runs to its last hidden states; only the rows whose next token is a response token are
kept ([N, H]). Per chunk of rows, the policy logits ``h @ W^T`` (and the base's, from the base's
hidden states at the same rows and its own head) are formed in float32, the loss and every metric
are computed with the same per-chunk math as :func:`asft_repro.losses.compute_loss`, and so is the
chunk's gradient, which is sent at once to the hidden rows ([N, H]) and the head weight ([V, H], tied
embeddings included); the chunk is then dropped, and backward only scales those two gradients (it
recomputes the chunks when the rows' incoming gradients differ). The chunks reuse four float32
[chunk, V] buffers with an anchor, two without (SFT, DFT: logits and log p, the gradient formed in
place), each method's chunk sized to fill the same 256 MB budget. No [B, T, V] tensor of any dtype and
no [N, V] float32 tensor beyond one chunk ever exists.

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

from asft_repro.anchor_cache import AnchorCacheError, AnchorRows, anchor_grad, anchor_kl_into, anchor_terms, complete_log_probs, masked_log_tail
from asft_repro.losses import IGNORE_INDEX, _compute_dtype, chunk_pass, chunks, response_rows, row_losses
from asft_repro.methods import METHODS_WITH_DFT_WEIGHT, METHODS_WITH_KL, KLDirection, Method
from asft_repro.paper import PAPER_KL_COEF

CHUNK_BUDGET_MB = 256  # float32 work per chunk
WORK_BUFFERS = 4  # [rows, V] float32 buffers with an anchor, reused by every chunk: logits, log p, log q, product / gradient
PLAIN_BUFFERS = 2  # without one (SFT, DFT): logits, log p (the gradient, in place)


def work_buffers(anchored: bool) -> int:
    """[rows, V] float32 buffers a chunk uses: with an anchor (resident base or cached rows) or without."""
    return WORK_BUFFERS if anchored else PLAIN_BUFFERS


def auto_chunk_rows(vocab_size: int, budget_mb: float = CHUNK_BUDGET_MB, buffers: int = WORK_BUFFERS) -> int:
    """Rows per chunk so that one chunk's ``buffers`` float32 [rows, V] buffers stay within ``budget_mb``."""
    return max(1, int(budget_mb * 2**20 // (buffers * 4 * vocab_size)))


def head_weight(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias, gathered when FSDP2 left them sharded (a DTensor)."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def logits_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cdtype: torch.dtype) -> torch.Tensor:
    """Logits [c, V] in ``cdtype`` (matmul in the hidden states' dtype)."""
    return _logits_into(torch.empty(hidden.shape[0], weight.shape[0], dtype=cdtype, device=hidden.device),
                        hidden, weight, bias)


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weight^T (+ bias)`` written into ``out`` (the matmul runs in the hidden states' dtype)."""
    if hidden.dtype == out.dtype and weight.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    else:
        out.copy_(hidden @ weight.to(hidden.dtype).t())
    return out.add_(bias.to(out.dtype)) if bias is not None else out


def _log_softmax_into(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits, -1)`` written into ``out`` (the same kernel, no fresh [c, V] allocation).

    ``torch._log_softmax`` is private, but the public op has no ``out=``: on CPU a fresh 44 MB buffer per chunk
    (V = 151936) cost more in page faults than the op itself (27 ms against 10 ms reused, measured).
    """
    return torch._log_softmax(logits, -1, False, out=out)


@dataclass
class _Base:
    """The anchor of one fused call: the resident base's hidden rows and head, or the cached top-k rows."""

    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    anchor: AnchorRows | None = None


def _chunk(sl: slice, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
           base: _Base | None, dft_weight: bool, kl_coef: float, reverse: bool, want_grad: bool,
           work: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's stats [c, 4] and (``want_grad``) unscaled d(row losses)/d(logits) [c, V], in the ``work`` buffers.

    The math is :func:`asft_repro.losses.chunk_pass`, the per-chunk function behind ``compute_loss``; with a
    cached top-k anchor (k < V) the KL and its gradient are formed in O(k) per row beside the policy's own
    log-probs (:func:`asft_repro.anchor_cache.anchor_kl_into` / ``anchor_grad``: the same values as
    ``chunk_pass`` on the completed log q~, without a second [c, V] distribution).
    """
    rows = hidden[sl]
    scratch, logp_buf, *anchor_bufs = (buf[: rows.shape[0]] for buf in work)
    logp = _log_softmax_into(logp_buf, _logits_into(scratch, rows, weight, bias))
    if base is None:
        return chunk_pass(logp, targets[sl], None, dft_weight, kl_coef, reverse, want_grad)
    logq_buf, spare = anchor_bufs
    if base.hidden is not None:
        logq = _log_softmax_into(logq_buf, _logits_into(scratch, base.hidden[sl], base.weight, base.bias))
        return chunk_pass(logp, targets[sl], logq, dft_weight, kl_coef, reverse, want_grad, [scratch, spare])
    ids, logq_topk, log_rest = base.anchor.ids[sl], base.anchor.logprobs[sl], base.anchor.log_rest[sl]
    if ids.shape[1] >= logp.shape[1]:  # the cache holds the whole distribution
        logq = complete_log_probs(logp, ids, logq_topk, log_rest)
        return chunk_pass(logp, targets[sl], logq, dft_weight, kl_coef, reverse, want_grad, [scratch, spare])
    stats, _ = chunk_pass(logp, targets[sl], None, dft_weight)  # log p left as it is
    probs = torch.exp(logp, out=logq_buf)
    terms = anchor_terms(logp, ids, logq_topk, log_rest, probs=probs)
    lost = torch.isneginf(terms.log_tail)  # the policy's whole tail underflowed in the sum: recompute exactly
    if lost.any():
        at = lost.nonzero()[:, 0]
        terms.log_tail[at] = masked_log_tail(logp[at], terms.ids[at])
    anchor_kl_into(stats, terms)
    if not want_grad:
        return stats, None
    return stats, anchor_grad(logp, targets[sl], terms, stats, kl_coef, reverse, probs=probs)


class _FusedHeadLoss(torch.autograd.Function):
    """Row losses [N] and stats [N, 4] from hidden rows [N, H] and head weights [V, H].

    The gradient is formed in the forward, chunk by chunk, while each chunk's logits are at hand (as Liger's fused
    linear cross-entropy does): d(sum of row losses)/d(hidden) [N, H] and /d(weight) [V, H] are kept, and backward
    scales them by the incoming row gradient, which is the same for every row when the rows are summed (the
    trainer's loss). Any other incoming gradient recomputes the chunks in backward. Nothing of [N, V] is kept.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, base: _Base | None, dft_weight: bool, kl_coef: float,
                reverse: bool, chunk_rows: int, want_grad: bool):
        cdtype = _compute_dtype(hidden.dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        work = [torch.empty(min(chunk_rows, n), vocab, dtype=cdtype, device=hidden.device)
                for _ in range(work_buffers(base is not None))]
        grads = _HeadGrads(hidden, weight, bias, cdtype, ctx.needs_input_grad[1]) if want_grad else None
        parts = []
        for sl in chunks(n, chunk_rows):
            stats, g = _chunk(sl, hidden, weight, bias, targets, base, dft_weight, kl_coef, reverse, want_grad, work)
            parts.append(stats)
            if grads is not None:
                grads.add(sl, g, hidden, weight)
        del work
        stats = torch.cat(parts) if parts else torch.zeros(0, 4, dtype=cdtype, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.base, ctx.grads = base, grads
        ctx.dft_weight, ctx.kl_coef, ctx.reverse, ctx.chunk_rows = dft_weight, kl_coef, reverse, chunk_rows
        ctx.mark_non_differentiable(stats)
        return row_losses(stats, kl_coef, reverse), stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        hidden, weight, bias, targets = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None  # used once; a second backward (retain_graph) recomputes
        if grads is not None and grad_rows.numel() and bool((grad_rows == grad_rows[0]).all()):
            return (*grads.scaled(grad_rows[0], hidden, weight, bias), None, None, None, None, None, None, None)
        cdtype = _compute_dtype(hidden.dtype)
        grads = _HeadGrads(hidden, weight, bias, cdtype, ctx.needs_input_grad[1])
        work = [torch.empty(min(ctx.chunk_rows, hidden.shape[0]), weight.shape[0], dtype=cdtype, device=hidden.device)
                for _ in range(work_buffers(ctx.base is not None))]
        for sl in chunks(hidden.shape[0], ctx.chunk_rows):
            _stats, g = _chunk(sl, hidden, weight, bias, targets, ctx.base, ctx.dft_weight, ctx.kl_coef, ctx.reverse,
                               True, work)
            grads.add(sl, g.mul_(grad_rows[sl, None].to(g.dtype)), hidden, weight)
        one = torch.ones((), dtype=cdtype, device=hidden.device)
        return (*grads.scaled(one, hidden, weight, bias), None, None, None, None, None, None, None)


class _HeadGrads:
    """Float32 accumulators of d(loss)/d(hidden rows) [N, H], d/d(head weight) [V, H] and d/d(bias) [V]; none for a
    frozen head (``head_grad=False``, e.g. under LoRA: no [V, H] float32 buffer, no per-chunk [V, H] product)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cdtype: torch.dtype,
                 head_grad: bool = True):
        self.hidden = torch.empty(hidden.shape, dtype=cdtype, device=hidden.device)
        self.weight = torch.zeros(weight.shape, dtype=cdtype, device=weight.device) if head_grad else None
        self.bias = torch.zeros(bias.shape, dtype=cdtype, device=bias.device) if bias is not None and head_grad else None

    def add(self, sl: slice, g: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        """Add one chunk's logits gradient ``g`` [c, V] (float32) for the hidden rows ``sl``."""
        if weight.dtype == g.dtype:
            torch.mm(g, weight, out=self.hidden[sl])
        else:
            self.hidden[sl] = g.to(weight.dtype) @ weight
        if self.weight is not None:
            self.weight.addmm_(g.t(), hidden[sl].to(g.dtype))
        if self.bias is not None:
            self.bias += g.sum(0)

    def scaled(self, scale: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The gradients times ``scale``, in the inputs' dtypes (in place where the dtype already matches)."""
        if bool(scale != 1):
            for t in (self.hidden, self.weight, self.bias):
                if t is not None:
                    t.mul_(scale.to(t.dtype))
        return (self.hidden.to(hidden.dtype), self.weight.to(weight.dtype) if self.weight is not None else None,
                self.bias.to(bias.dtype) if self.bias is not None else None)


@dataclass
class FusedLoss:
    """What the fused forward needs besides the inputs: labels, the objective, and the base's rows."""

    labels: torch.Tensor
    method: str
    base_hidden: torch.Tensor | None = None  # [N, H] base hidden states at the response rows
    base_head: torch.nn.Module | None = None
    kl_coef: float = PAPER_KL_COEF
    kl_direction: str = "forward"
    chunk_rows: int | None = None  # None: auto_chunk_rows(V, buffers=work_buffers(anchored)): the same budget either way
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
                raise AnchorCacheError(f"the cached anchor has {len(self.anchor)} rows for {rows.numel()} response tokens; "
                                 f"rebuild the anchor cache for this data (`python -m asft_repro.anchor ...`)")
            anchor = self.anchor.to(hidden.device)
        policy_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        weight, bias = head_weight(head)
        base = None
        if self.base_hidden is not None:
            base = _Base(self.base_hidden, *head_weight(self.base_head))
        elif anchor is not None:
            base = _Base(anchor=anchor)
        coef = self.kl_coef if method in METHODS_WITH_KL else 0.0
        want_grad = torch.is_grad_enabled() and (policy_rows.requires_grad or weight.requires_grad)
        return _FusedHeadLoss.apply(
            policy_rows, weight, bias, targets, base, method in METHODS_WITH_DFT_WEIGHT, coef,
            KLDirection(self.kl_direction) is KLDirection.reverse,
            self.chunk_rows or auto_chunk_rows(weight.shape[0], buffers=work_buffers(base is not None)), want_grad)


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
                    labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[N, H] last hidden states of ``model`` at the response rows (called on the root, so FSDP2 hooks run);
    ``position_ids`` for a padding-free packed row (asft_repro/padding_free.py)."""
    enable_fused_head(getattr(model, "module", model))
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 from_hidden=ResponseRows(labels, ignore_index))


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
