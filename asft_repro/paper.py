"""The paper's published Table 1 averages (ASFT, ICLR 2026), for side-by-side comparison."""

PAPER_TABLE1_AVG: dict[tuple[str, str], dict[str, float]] = {
    ("-", "base"): {"Medical Avg": 31.38, "Math Avg": 12.61},
    ("10k", "sft"): {"Medical Avg": 33.37, "Math Avg": 16.73},
    ("10k", "dft"): {"Medical Avg": 29.19, "Math Avg": 27.77},
    ("10k", "asft"): {"Medical Avg": 42.03, "Math Avg": 28.75},
    ("30k", "sft"): {"Medical Avg": 36.02, "Math Avg": 19.93},
    ("30k", "dft"): {"Medical Avg": 33.14, "Math Avg": 27.66},
    ("30k", "asft"): {"Medical Avg": 42.01, "Math Avg": 27.18},
    ("100k", "sft"): {"Medical Avg": 35.71, "Math Avg": 19.15},
    ("100k", "dft"): {"Medical Avg": 38.06, "Math Avg": 26.04},
    ("100k", "asft"): {"Medical Avg": 39.98, "Math Avg": 30.50},
}
