"""SFT / DFT / ASFT token losses, on one screen.

Per response token t (label y_t, policy logits z_t, frozen base logits b_t):

    ce_t   = -log p_theta(y_t)                               (SFT)
    dft_t  = sg(p_theta(y_t)) * ce_t                         (DFT: weight detached)
    kl_t   = KL(pi_base || pi_theta)  over the full vocabulary  ("forward", the paper's anchor)
           | KL(pi_theta || pi_base)                          ("reverse", the ablation)
    asft_t = dft_t + kl_coef * kl_t,   sft_kl_t = ce_t + kl_coef * kl_t

The loss is the sum over every response token of the batch divided by the number of
response tokens (``num_items`` when gradient accumulation spans several micro-batches).

Memory: the work runs in a custom autograd function that walks the response rows in
chunks, upcasting one [chunk, V] slice at a time to float32 and recomputing the softmax
in backward. Nothing of size [B, T, V] is copied or kept in float32, and prompt / padding
positions are never touched.
"""

from __future__ import annotations

import torch

from asft_repro.methods import METHODS_WITH_DFT_WEIGHT, METHODS_WITH_KL, KLDirection, Method
from asft_repro.paper import PAPER_KL_COEF

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, float64 kept as is (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def chunk_pass(logp: torch.Tensor, targets: torch.Tensor, logq: torch.Tensor | None, dft_weight: bool,
               kl_coef: float = 0.0, reverse: bool = False, want_grad: bool = False,
               work: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's stats [c, 4] (log p(y), KL(q||p), KL(p||q), DFT weight a) and, with ``want_grad``, the gradient
    of its row losses w.r.t. the logits [c, V] (unscaled: d(a * -log p_y + c * kl)/dz).

    ``logp`` / ``logq`` are log-probs [c, V] in the compute dtype; both are used as scratch (overwritten) unless
    neither a base nor a gradient is asked for. ``work`` are up to two spare [c, V] buffers of that dtype (allocated
    when absent), so a caller walking many chunks allocates nothing per chunk. The gradient lives in one of them.
    """
    spare = list(work or [])

    def buffer() -> torch.Tensor:
        return spare.pop()[: logp.shape[0]] if spare else torch.empty_like(logp)

    stats = torch.zeros(logp.shape[0], 4, dtype=logp.dtype, device=logp.device)
    logp_y = logp.gather(1, targets[:, None]).squeeze(1)
    stats[:, 0] = logp_y
    stats[:, 3] = logp_y.exp() if dft_weight else 1.0
    a = stats[:, 3, None]
    if logq is None:
        if not want_grad:
            return stats, None
        g = logp.exp_().mul_(a)  # d(-a * log p_y)/dz = a * (p - onehot(y))
        return stats, g.scatter_add_(1, targets[:, None], -a)
    q = torch.exp(logq, out=buffer())
    diff = logq.sub_(logp)  # log q - log p
    prod = torch.mul(q, diff, out=buffer())
    stats[:, 1] = prod.sum(-1)
    p = logp.exp_()
    stats[:, 2] = -torch.mul(p, diff, out=prod).sum(-1)
    if not want_grad:
        return stats, None
    if kl_coef and reverse:  # d KL(p||q)/dz = p * (log p - log q - KL): g = p * (a - c * (diff + KL))
        g = torch.mul(p, diff.add_(stats[:, 2, None]).mul_(-kl_coef).add_(a), out=prod)
    elif kl_coef:  # d KL(q||p)/dz = p - q: g = (a + c) * p - c * q
        g = torch.mul(p, a + kl_coef, out=prod).sub_(q, alpha=kl_coef)
    else:
        g = torch.mul(p, a, out=prod)
    return stats, g.scatter_add_(1, targets[:, None], -a)


def chunk_stats(logp: torch.Tensor, targets: torch.Tensor, logq: torch.Tensor | None, dft_weight: bool) -> torch.Tensor:
    """[c, 4] stats of one chunk from log-probs [c, V] (:func:`chunk_pass`, inputs left as they are)."""
    return chunk_pass(logp.clone(), targets, None if logq is None else logq.clone(), dft_weight)[0]


def chunk_grad(logp: torch.Tensor, targets: torch.Tensor, logq: torch.Tensor | None, dft_weight: bool,
               kl_coef: float, reverse: bool, grad_rows: torch.Tensor) -> torch.Tensor:
    """d(row loss)/d(logits) of one chunk [c, V], scaled by the incoming row gradients (inputs left as they are)."""
    _stats, g = chunk_pass(logp.clone(), targets, None if logq is None else logq.clone(), dft_weight, kl_coef,
                           reverse, want_grad=True)
    return g.mul_(grad_rows[:, None].to(g.dtype))


def row_losses(stats: torch.Tensor, kl_coef: float, reverse: bool) -> torch.Tensor:
    """``-a_i * log p(y_i) + c * kl_i`` from the stats of every row."""
    kl = stats[:, 2] if reverse else stats[:, 1]
    return -stats[:, 3] * stats[:, 0] + (kl_coef * kl if kl_coef else 0.0)


class _TokenLoss(torch.autograd.Function):
    """Per-row loss ``a_i * ce_i + c * kl_i`` over selected rows of flat logits.

    Returns (loss_rows [N], stats [N, 4]) where stats columns are
    (log p(y), kl_forward, kl_reverse, weight a_i); only ``loss_rows`` is differentiable.
    """

    @staticmethod
    def _log_probs(flat: torch.Tensor | None, rows: torch.Tensor, cdtype: torch.dtype) -> torch.Tensor | None:
        return None if flat is None else torch.log_softmax(flat.index_select(0, rows).to(cdtype), dim=-1)

    @staticmethod
    def forward(ctx, flat_logits, rows, targets, flat_base, dft_weight: bool, kl_coef: float,
                reverse: bool, chunk_rows: int):
        cdtype = _compute_dtype(flat_logits.dtype)
        stats = torch.cat([
            chunk_pass(_TokenLoss._log_probs(flat_logits, rows[sl], cdtype), targets[sl],
                       _TokenLoss._log_probs(flat_base, rows[sl], cdtype), dft_weight)[0]
            for sl in chunks(rows.numel(), chunk_rows)
        ]) if rows.numel() else torch.zeros(0, 4, dtype=cdtype, device=flat_logits.device)
        ctx.save_for_backward(flat_logits, rows, targets, flat_base, stats)
        ctx.kl_coef, ctx.reverse, ctx.chunk_rows, ctx.dft_weight = kl_coef, reverse, chunk_rows, dft_weight
        ctx.mark_non_differentiable(stats)
        return row_losses(stats, kl_coef, reverse), stats

    @staticmethod
    def backward(ctx, grad_rows, _grad_stats):
        flat_logits, rows, targets, flat_base, stats = ctx.saved_tensors
        grad_logits = torch.zeros_like(flat_logits)
        for sl in chunks(rows.numel(), ctx.chunk_rows):
            logp = _TokenLoss._log_probs(flat_logits, rows[sl], stats.dtype)
            logq = _TokenLoss._log_probs(flat_base, rows[sl], stats.dtype) if ctx.kl_coef else None
            _stats, g = chunk_pass(logp, targets[sl], logq, ctx.dft_weight, ctx.kl_coef, ctx.reverse, want_grad=True)
            g.mul_(grad_rows[sl, None].to(g.dtype))
            grad_logits.index_copy_(0, rows[sl], g.to(flat_logits.dtype))
        return grad_logits, None, None, None, None, None, None, None


def chunks(n: int, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, n, size)]


def response_rows(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices of logits[:, :-1] predicting a response token, and those tokens.

    Row ``b * T + t`` of ``logits.view(B*T, V)`` predicts ``labels[b, t + 1]``.
    """
    _, seq_len = labels.shape
    shifted = labels[:, 1:]
    batch_idx, pos_idx = (shifted != ignore_index).nonzero(as_tuple=True)
    return batch_idx * seq_len + pos_idx, shifted[batch_idx, pos_idx]


def compute_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    method: str | Method,
    base_logits: torch.Tensor | None = None,
    kl_coef: float = PAPER_KL_COEF,
    kl_direction: str | KLDirection = "forward",
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean loss of ``method`` and detached metrics.

    Args:
        logits: [B, T, V] policy logits (any float dtype; math runs in float32 or wider).
        labels: [B, T] token ids with ``ignore_index`` on prompt and padding (unshifted).
        method: ``sft`` | ``dft`` | ``asft`` | ``sft_kl``.
        base_logits: [B, T, V] logits of the frozen base model on the same batch; required
            for ``asft`` / ``sft_kl``, optional otherwise (then KL is only measured).
        kl_coef: lambda, the weight of the KL anchor (ignored by sft / dft).
        kl_direction: ``forward`` = KL(base || policy), ``reverse`` = KL(policy || base).
        num_items: divisor of the summed loss; defaults to the number of response tokens here.
            The trainer passes the token count of the whole accumulated batch.
        chunk_rows: response rows processed per float32 chunk.

    Returns:
        (loss, metrics): ``ce``, ``dft``, ``token_prob_mean``, ``dft_weight_ess``,
        ``num_tokens`` and, when base logits are given, ``kl_forward`` and ``kl_reverse``.
    """
    loss, sums = loss_and_token_sums(logits, labels, method, base_logits, kl_coef, kl_direction,
                                     ignore_index, num_items, chunk_rows)
    return loss, summarize(sums)


def loss_and_token_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    method: str | Method,
    base_logits: torch.Tensor | None = None,
    kl_coef: float = PAPER_KL_COEF,
    kl_direction: str | KLDirection = "forward",
    ignore_index: int = IGNORE_INDEX,
    num_items: int | torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Like :func:`compute_loss` but returns additive token sums instead of means."""
    method = Method(method)
    direction = KLDirection(kl_direction)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if method in METHODS_WITH_KL and base_logits is None:
        raise ValueError(f"method '{method.value}' needs base_logits from the frozen base model")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if base_logits is not None and base_logits.shape != logits.shape:
        raise ValueError(f"base_logits {tuple(base_logits.shape)} must match logits {tuple(logits.shape)}")

    vocab = logits.shape[-1]
    rows, targets = response_rows(labels, ignore_index)
    flat_base = base_logits.detach().reshape(-1, vocab) if base_logits is not None else None
    coef = kl_coef if method in METHODS_WITH_KL else 0.0
    loss_rows, stats = _TokenLoss.apply(
        logits.reshape(-1, vocab), rows, targets, flat_base,
        method in METHODS_WITH_DFT_WEIGHT, coef, direction is KLDirection.reverse, chunk_rows,
    )
    n_local = rows.numel()
    divisor = num_items if num_items is not None else max(n_local, 1)
    loss = loss_rows.sum() / divisor
    return loss, token_stats(stats, has_base=flat_base is not None)


def token_stats(stats: torch.Tensor, has_base: bool) -> dict[str, float]:
    """Additive sums over tokens (so they can be accumulated across steps and ranks)."""
    logp = stats[:, 0].double()
    prob = logp.exp()
    columns = [-logp.sum(), -(prob * logp).sum(), prob.sum(), (prob * prob).sum()]
    names = ["ce_sum", "dft_sum", "prob_sum", "prob_sq_sum"]
    if has_base:
        columns += [stats[:, 1].double().sum(), stats[:, 2].double().sum()]
        names += ["kl_forward_sum", "kl_reverse_sum"]
    values = torch.stack(columns).tolist()  # one device sync for all metrics
    return {"num_tokens": float(logp.numel()), **dict(zip(names, values))}


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Means and ESS from additive sums; ESS = (sum w)^2 / (n * sum w^2) of the DFT weights p."""
    n = sums["num_tokens"]
    if n == 0:
        return {"num_tokens": 0.0}
    metrics = {
        "num_tokens": n,
        "ce": sums["ce_sum"] / n,
        "dft": sums["dft_sum"] / n,
        "token_prob_mean": sums["prob_sum"] / n,
        "dft_weight_ess": sums["prob_sum"] ** 2 / (n * sums["prob_sq_sum"]) if sums["prob_sq_sum"] > 0 else 0.0,
    }
    if "kl_forward_sum" in sums:
        metrics["kl_forward"] = sums["kl_forward_sum"] / n
        metrics["kl_reverse"] = sums["kl_reverse_sum"] / n
    return metrics
