"""The benchmark registry: which benchmarks score each domain, their display labels, the domain averages.

One place for these facts: ``conf/prep/sources.yaml`` (``domains``, ``averages``, ``labels``, ``benchmarks``,
``benchmark_groups``), read here by evaluation, the tables, the plan and the report.
"""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import OmegaConf

from asft_repro.paths import SOURCES_FILE


@functools.cache
def sources() -> Any:
    """conf/prep/sources.yaml (read once per process)."""
    return OmegaConf.load(SOURCES_FILE)


def domains() -> list[str]:
    return list(sources().domains)


def domain_benchmarks(domain: str) -> list[str]:
    """The reported benchmarks of ``domain`` in the paper's column order (groups such as mmlu_medical whole)."""
    return list(sources().domains[domain])


def average_label(domain: str) -> str:
    """'Math Avg' / 'Medical Avg': the paper's mean of the domain's benchmark scores."""
    return str(sources().averages[domain])


def benchmark_label(name: str) -> str:
    """'Math500', 'MMLU-medical', ...; an unknown benchmark keeps its name."""
    return str(sources().labels.get(name, name))


def members(name: str) -> list[str]:
    """The benchmark files a reported benchmark reads (a group's subjects, else the benchmark itself)."""
    groups = sources().benchmark_groups
    return list(groups[name]) if name in groups else [name]


def known_benchmarks() -> set[str]:
    return set(sources().benchmarks) | set(sources().benchmark_groups)


def benchmark_kind(name: str) -> str:
    """``math`` or ``multiple_choice`` (a group takes its first member's)."""
    return str(sources().benchmarks[members(name)[0]].kind)
