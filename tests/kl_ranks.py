"""The adaptive-λ controller fed by hand (tests/test_kl_schedule.py) and on each rank of a 2-rank gloo group
(tests/rank_units.py, in the fsdp2 launch of tests/test_fsdp2.py)."""

from __future__ import annotations

from types import SimpleNamespace

from asft_repro.kl_controller import KLController, all_rank_sum

# each optimizer step: its micro-batches' (KL token sum, tokens); with 2 ranks, rank r holds micro-batch r
STEPS = [[(3.0, 30.0), (3.5, 10.0)], [(0.5, 5.0), (2.5, 7.0)], [(21.0, 100.0), (1.0, 2.0)], [(8.0, 40.0), (9.0, 41.0)]]


def adaptive() -> KLController:
    return KLController("adaptive", 0.1, kl_target=0.2, kl_horizon=5)


def feed(controller: KLController, steps: list[list[tuple[float, float]]]) -> list[float]:
    """λ used by each optimizer step, the controller updating after each as the trainer's callback does."""
    used = []
    for k, micro in enumerate(steps):
        for kl_sum, tokens in micro:
            controller.add({"kl_forward_sum": kl_sum, "kl_reverse_sum": -1.0, "num_tokens": tokens},
                           controller.coef_at(k, len(steps)))
        used.append(controller.last_used)
        controller.on_step_end(SimpleNamespace(device="cpu"), None, None)
    return used


def controller_path(rank: int) -> dict:
    """Rank ``rank`` of 2 (the group initialised): its half of STEPS through the controller; λ per step and the final
    λ, and an all-rank sum."""
    controller = adaptive()
    used = feed(controller, [[micro[rank]] for micro in STEPS])
    return {"lambda": [*used, controller.coef], "sums": all_rank_sum([1.0, float(rank)])}
