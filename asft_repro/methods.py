"""The training objectives by name (asft_repro/losses.py computes them): what configs, run.json and tables spell,
without importing torch (the table and plot commands read these names)."""

from __future__ import annotations

from enum import Enum


class Method(str, Enum):
    """Training objectives; the value is what configs and ``compute_loss`` accept."""

    sft = "sft"
    dft = "dft"
    asft = "asft"
    sft_kl = "sft_kl"


class KLDirection(str, Enum):
    """``forward`` = KL(pi_base || pi_theta) (paper), ``reverse`` = KL(pi_theta || pi_base)."""

    forward = "forward"
    reverse = "reverse"


METHODS_WITH_KL = {Method.asft, Method.sft_kl}
KL_METHOD_NAMES = tuple(sorted(m.value for m in METHODS_WITH_KL))  # as configs, run.json and tables spell them
METHODS_WITH_DFT_WEIGHT = {Method.dft, Method.asft}
