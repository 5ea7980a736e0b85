"""Loss tests: hand-computed values, gradients, masking, dtypes, chunking."""

import math

import pytest
import torch
import torch.nn.functional as F

from asft_repro.losses import IGNORE_INDEX, compute_loss, loss_and_token_sums, response_rows

LN2, LN3 = math.log(2), math.log(3)


def hand_example(dtype=torch.float32):
    """1 sequence, T=4: a prompt label, two response labels, one padding label.

    Rows 0 and 1 predict the two response tokens (both id 0). Row 0: policy uniform,
    base [1/2, 1/4, 1/4]; row 1: policy [1/2, 1/4, 1/4], base [1/4, 1/2, 1/4].
    Rows 2 and 3 hold garbage that masking must ignore.
    """
    logits = torch.tensor([[[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [9.0, -9.0, 3.0], [5.0, 1.0, -7.0]]], dtype=dtype)
    base = torch.tensor([[[LN2, 0.0, 0.0], [0.0, LN2, 0.0], [-4.0, 8.0, 0.0], [0.0, 2.0, 1.0]]], dtype=dtype)
    labels = torch.tensor([[IGNORE_INDEX, 0, 0, IGNORE_INDEX]])
    return logits, base, labels


CE = (LN3 + LN2) / 2
DFT = (LN3 / 3 + LN2 / 2) / 2
# row 0: KL(q||p) = 0.5 ln 1.5 + 0.5 ln 0.75, KL(p||q) = ln(32/27)/3; row 1: both 0.25 ln 2
KL_FWD = (0.5 * math.log(1.5) + 0.5 * math.log(0.75) + 0.25 * LN2) / 2
KL_REV = (math.log(32 / 27) / 3 + 0.25 * LN2) / 2


@pytest.mark.parametrize(
    "method,direction,expected",
    [
        ("sft", "forward", CE),
        ("dft", "forward", DFT),
        ("asft", "forward", DFT + 0.05 * KL_FWD),
        ("asft", "reverse", DFT + 0.05 * KL_REV),
        ("sft_kl", "forward", CE + 0.05 * KL_FWD),
        ("sft_kl", "reverse", CE + 0.05 * KL_REV),
    ],
)
def test_hand_computed_values(method, direction, expected):
    logits, base, labels = hand_example()
    loss, metrics = compute_loss(logits, labels, method, base_logits=base, kl_coef=0.05, kl_direction=direction)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["ce"] == pytest.approx(CE, abs=1e-6)
    assert metrics["dft"] == pytest.approx(DFT, abs=1e-6)
    assert metrics["kl_forward"] == pytest.approx(KL_FWD, abs=1e-6)
    assert metrics["kl_reverse"] == pytest.approx(KL_REV, abs=1e-6)
    assert metrics["token_prob_mean"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-6)
    ess = (1 / 3 + 1 / 2) ** 2 / (2 * (1 / 9 + 1 / 4))
    assert metrics["dft_weight_ess"] == pytest.approx(ess, abs=1e-6)
    assert metrics["num_tokens"] == 2


def test_forward_direction_matches_torch_kl_div():
    """F.kl_div(log p_theta, p_base) is KL(base || policy): our 'forward'."""
    torch.manual_seed(0)
    logits, base = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    _, metrics = compute_loss(logits, labels, "asft", base_logits=base)
    ref_fwd = F.kl_div(logits[:, :-1].log_softmax(-1), base[:, :-1].log_softmax(-1), log_target=True, reduction="none")
    ref_rev = F.kl_div(base[:, :-1].log_softmax(-1), logits[:, :-1].log_softmax(-1), log_target=True, reduction="none")
    assert metrics["kl_forward"] == pytest.approx(ref_fwd.sum(-1).mean().item(), rel=1e-5)
    assert metrics["kl_reverse"] == pytest.approx(ref_rev.sum(-1).mean().item(), rel=1e-5)
    assert metrics["kl_forward"] != pytest.approx(metrics["kl_reverse"], rel=1e-3)


def naive_loss(logits, labels, method, base, kl_coef, direction):
    """Straightforward autograd reference over the full [B, T, V] tensor."""
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp_y = logp.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    weight = logp_y.exp().detach() if method in ("dft", "asft") else torch.ones_like(logp_y)
    per_token = -weight * logp_y
    if method in ("asft", "sft_kl"):
        logq = base[:, :-1].log_softmax(-1)
        if direction == "forward":
            kl = (logq.exp() * (logq - logp)).sum(-1)
        else:
            kl = (logp.exp() * (logp - logq)).sum(-1)
        per_token = per_token + kl_coef * kl
    return per_token[mask].sum() / mask.sum()


def random_batch(dtype=torch.float64, seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 6, vocab, generator=g, dtype=dtype)
    base = torch.randn(3, 6, vocab, generator=g, dtype=dtype)
    labels = torch.randint(0, vocab, (3, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX  # prompt
    labels[1, 4:] = IGNORE_INDEX  # padding
    labels[2, :] = IGNORE_INDEX  # an all-masked sequence
    labels[2, 3] = vocab - 1
    return logits, base, labels


@pytest.mark.parametrize("method", ["sft", "dft", "asft", "sft_kl"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_matches_naive_reference_value_and_gradient(method, direction):
    logits, base, labels = random_batch()
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss, _ = compute_loss(ours, labels, method, base_logits=base, kl_coef=0.3, kl_direction=direction, chunk_rows=4)
    expected = naive_loss(ref, labels, method, base, 0.3, direction)
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-12)


# Finite differences also move DFT's detached weight, so gradcheck applies to the objectives
# without a stop-gradient; DFT/ASFT gradients are checked against the naive reference above
# and against p * grad(log p) below.
@pytest.mark.parametrize("method", ["sft", "sft_kl"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gradcheck(method, direction):
    logits, base, labels = random_batch(vocab=5)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: compute_loss(z, labels, method, base_logits=base, kl_coef=0.7, kl_direction=direction, chunk_rows=3)[0],
        (logits,),
    )


def test_dft_gradient_is_probability_times_grad_log_p():
    logits, _, labels = random_batch()
    logits.requires_grad_()
    loss, _ = compute_loss(logits, labels, "dft")
    (grad_dft,) = torch.autograd.grad(loss, logits)

    rows, targets = response_rows(labels)
    flat = logits.reshape(-1, logits.shape[-1])
    logp_y = flat[rows].log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    grads = [torch.autograd.grad(-lp, logits, retain_graph=True)[0] for lp in logp_y]
    expected = sum(lp.exp().detach() * g for lp, g in zip(logp_y, grads)) / len(grads)
    torch.testing.assert_close(grad_dft, expected)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_is_zero_with_zero_gradient_at_base(direction):
    logits, _, labels = random_batch()
    base = logits.clone()
    z_anchor = logits.clone().requires_grad_()
    z_plain = logits.clone().requires_grad_()
    loss_anchor, metrics = compute_loss(z_anchor, labels, "sft_kl", base_logits=base, kl_coef=5.0, kl_direction=direction)
    loss_plain, _ = compute_loss(z_plain, labels, "sft")
    loss_anchor.backward()
    loss_plain.backward()
    assert metrics["kl_forward"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["kl_reverse"] == pytest.approx(0.0, abs=1e-12)
    assert loss_anchor.item() == pytest.approx(loss_plain.item(), rel=1e-12)
    torch.testing.assert_close(z_anchor.grad, z_plain.grad)


def test_masked_positions_never_count():
    logits, base, labels = random_batch()
    logits.requires_grad_()
    loss, metrics = compute_loss(logits, labels, "asft", base_logits=base)
    loss.backward()
    rows, _ = response_rows(labels)
    touched = logits.grad.reshape(-1, logits.shape[-1]).abs().sum(-1) > 0
    expected = torch.zeros_like(touched)
    expected[rows] = True
    assert torch.equal(touched, expected)
    assert metrics["num_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum())

    # Changing logits at masked rows and the labels there changes nothing.
    perturbed = logits.detach().clone()
    perturbed.reshape(-1, perturbed.shape[-1])[~expected] += 100.0
    again, _ = compute_loss(perturbed, labels, "asft", base_logits=base)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_bf16_inputs_give_fp32_close_results():
    logits, base, labels = random_batch(dtype=torch.float32, vocab=64)
    z32 = logits.clone().requires_grad_()
    z16 = logits.to(torch.bfloat16).requires_grad_()
    loss32, m32 = compute_loss(z32, labels, "asft", base_logits=base)
    loss16, m16 = compute_loss(z16, labels, "asft", base_logits=base.to(torch.bfloat16))
    loss32.backward()
    loss16.backward()
    assert loss16.dtype == torch.float32  # math upcast
    assert z16.grad.dtype == torch.bfloat16
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    assert m16["kl_forward"] == pytest.approx(m32["kl_forward"], rel=5e-2, abs=1e-3)
    torch.testing.assert_close(z16.grad.float(), z32.grad, rtol=5e-2, atol=2e-3)


def test_chunked_equals_unchunked():
    logits, base, labels = random_batch(dtype=torch.float32)
    results = []
    for chunk in (1, 3, 10_000):
        z = logits.clone().requires_grad_()
        loss, metrics = compute_loss(z, labels, "asft", base_logits=base, kl_direction="reverse", chunk_rows=chunk)
        loss.backward()
        results.append((loss.detach(), z.grad, metrics))
    for loss, grad, metrics in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])
        assert metrics == pytest.approx(results[0][2])


def test_num_items_rescales_the_token_mean():
    logits, base, labels = random_batch()
    loss_mean, sums = loss_and_token_sums(logits, labels, "sft")
    loss_sum_normalized, _ = loss_and_token_sums(logits, labels, "sft", num_items=40)
    assert loss_sum_normalized.item() == pytest.approx(loss_mean.item() * sums["num_tokens"] / 40)


def test_all_masked_batch_is_zero_not_nan():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    loss, metrics = compute_loss(logits, labels, "dft")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    assert metrics == {"num_tokens": 0.0}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "ppo"}, "ppo"),
        ({"method": "asft"}, "needs base_logits"),
        ({"method": "sft", "kl_coef": -1.0}, "kl_coef"),
        ({"method": "sft", "kl_direction": "sideways"}, "sideways"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, match):
    logits, _, labels = random_batch()
    with pytest.raises(ValueError, match=match):
        compute_loss(logits, labels, **kwargs)
