"""Training records -> token ids with prompt-masked labels, and the padding collator."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from asft_repro.config import DataConfig
from asft_repro.losses import IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def split_record(record: dict) -> tuple[str, str]:
    """(prompt, response) from a chat record (messages) or an instruction/response row."""
    if "messages" in record:
        messages = record["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if not users or not answers:
            raise ValueError(f"record {record.get('id', '?')} needs a user and an assistant message")
        return users[-1], answers[-1]
    return record["instruction"], record["response"]


def render_prompt(prompt: str, tokenizer: Any, template: str, system: str | None = None) -> str:
    """The text before the response: Alpaca (the paper's) or the tokenizer's chat template."""
    if template == "alpaca":
        return ALPACA_PROMPT.format(instruction=prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(record: dict, tokenizer: Any, template: str, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels; labels are IGNORE_INDEX on the prompt.

    Alpaca: ``prompt + response + eos`` as the reference code builds it. Chat: the response
    is what the chat template renders after the generation prompt (end-of-turn included).
    """
    prompt, response = split_record(record)
    prompt_text = render_prompt(prompt, tokenizer, template)
    if template == "alpaca":
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    else:
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                             tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template renders the prompt differently with and without the answer; use data.template=alpaca")
        response_ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def train_file(cfg: DataConfig) -> Path:
    """The prepared training file for ``cfg``; a clear error naming the prep command if absent."""
    path = Path(cfg.train_file) if cfg.train_file else Path(cfg.data_dir) / cfg.name / str(cfg.size) / "train.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"training data {path} not found: run `python -m data_prep training=[{cfg.name}] "
                                f"sizes=[{cfg.size}]` (add local_dir=DIR offline) or set data.train_file")
    return path


def data_manifest(cfg: DataConfig) -> dict:
    """The prep manifest next to the training file ({} when trained from a bare file)."""
    manifest = train_file(cfg).parent / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else {}


def load_train_dataset(cfg: DataConfig, tokenizer: Any) -> datasets.Dataset:
    path = train_file(cfg)
    kind = "parquet" if path.suffix == ".parquet" else "json"
    raw = datasets.load_dataset(kind, data_files=str(path), split="train")
    encoded = raw.map(lambda r: encode(r, tokenizer, cfg.template, cfg.max_length),
                      remove_columns=raw.column_names, desc="tokenising")
    encoded = encoded.filter(lambda r: any(label != IGNORE_INDEX for label in r["labels"][1:]),
                             desc="dropping records with no response token left")
    if len(encoded) == 0:
        raise ValueError(f"no record of {path} keeps a response token within data.max_length={cfg.max_length}")
    return encoded


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id), labels (IGNORE_INDEX) and builds attention_mask."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in batch.items()}
