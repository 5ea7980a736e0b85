"""Record token lengths: the prepared data's own (tokenised as training tokenises it), or a documented stand-in,
and what a run's micro-batches cost in tokens padded and padding-free (``train.padding_free``).

The stand-in, :data:`FITTED`, is for NuminaMath-CoT under the alpaca template: prompt and response token counts
each log-normal, fitted to the published description of the data (problems of a few dozen to a few hundred tokens;
chain-of-thought solutions from a few dozen to about 2,000 tokens, median a few hundred) -- an assumption, not a
measurement: wherever the prepared data and the model's tokenizer are at hand, their real lengths are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asft_repro.config import ConfigError, DataConfig, ModelConfig
from asft_repro.data import DataError, load_train_dataset, train_file
from asft_repro.losses import IGNORE_INDEX
from asft_repro.modeling import load_tokenizer, resolve_path


@dataclass(frozen=True)
class LogNormalLengths:
    """Prompt and response token counts, each log-normal (median, sigma of the log), clipped to [lo, max_length]."""

    prompt_median: float = 90.0
    prompt_sigma: float = 0.6
    response_median: float = 380.0
    response_sigma: float = 0.8
    lo: int = 16

    def sample(self, n: int, max_length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, response) token counts of ``n`` records, truncated to ``max_length`` as training truncates."""
        rng = np.random.default_rng(seed)
        prompt = np.exp(rng.normal(math.log(self.prompt_median), self.prompt_sigma, n)).round().astype(int)
        response = np.exp(rng.normal(math.log(self.response_median), self.response_sigma, n)).round().astype(int)
        prompt = np.clip(prompt, 4, max_length - 1)
        response = np.clip(np.maximum(response, self.lo), 1, max_length - prompt)
        return prompt, response


FITTED = LogNormalLengths()  # NuminaMath-CoT (alpaca template), see the module docstring


def data_lengths(data: DataConfig, model: ModelConfig) -> tuple[np.ndarray, np.ndarray, Path] | None:
    """(prompt, response) token counts of every training record of ``data`` as ``load_train_dataset`` encodes them
    with ``model``'s tokenizer (so truncated at ``data.max_length``), and the file; None when the prepared file or
    the tokenizer is not at hand."""
    try:
        path = train_file(data)
        tokenizer = load_tokenizer(resolve_path(model), model.trust_remote_code)
        dataset = load_train_dataset(data, tokenizer)
    except (DataError, ConfigError):
        return None
    prompt, total = [], []
    for batch in dataset.select_columns(["labels"]).iter(batch_size=4096):  # 100k records: never all in lists at once
        for labels in batch["labels"]:
            labels = np.asarray(labels)
            prompt.append(int((labels == IGNORE_INDEX).sum()))
            total.append(labels.size)
    prompt_tokens, all_tokens = np.asarray(prompt, dtype=np.int64), np.asarray(total, dtype=np.int64)
    return prompt_tokens, all_tokens - prompt_tokens, path


@dataclass
class TokenCount:
    """Tokens a run's forward passes cover: padded (every micro-batch as wide as its longest record) and
    padding-free (the records' own lengths)."""

    padded: int
    padding_free: int


def run_tokens(lengths: np.ndarray, micro_batch: int, micro_batches: int, seed: int = 42) -> TokenCount:
    """Tokens of ``micro_batches`` micro-batches of ``micro_batch`` records drawn as the Trainer draws them (a
    fresh random order per epoch, seeded), padded and padding-free."""
    rng = np.random.default_rng(seed)
    padded = packed = done = 0
    while done < micro_batches:
        order = lengths[rng.permutation(len(lengths))]
        for start in range(0, len(order), micro_batch):
            if done == micro_batches:
                break
            batch = order[start:start + micro_batch]
            padded += int(batch.max()) * len(batch)
            packed += int(batch.sum())
            done += 1
    return TokenCount(padded, packed)
