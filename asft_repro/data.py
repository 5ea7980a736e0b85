"""Training records -> token ids with prompt-masked labels, and the padding collator.

The training file is checked line by line (plain ``json``, streamed) before ``datasets``
touches it, so a bad file fails with one ``DataError`` line naming the file, the line and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch

from asft_repro.config import ConfigError, DataConfig
from asft_repro.losses import IGNORE_INDEX
from asft_repro.paths import TRAIN_FILE, subset_dir
from asft_repro.prompts import render_prompt

FIELDS = ("instruction", "response")
log = logging.getLogger(__name__)
FORMATS_HINT = ("expected 'instruction' and 'response' (or chat 'messages' with a user and an assistant turn); "
                "rename the fields, or prepare the file with `python -m data_prep`")


class DataError(ConfigError):
    """Training data the run cannot use; one line naming the file, what is wrong and the fix."""


@dataclass
class DataSummary:
    """What the cheap pre-check found: the file, its record count and the rows with an empty response."""

    path: Path
    records: int = 0
    empty_rows: list[int] = field(default_factory=list)  # 0-based row indices
    empty_lines: list[int] = field(default_factory=list)  # their line (parquet: row) numbers, for the message


def split_record(record: dict) -> tuple[str, str]:
    """(prompt, response) from a chat record (messages) or an instruction/response row."""
    if record.get("messages") is not None:
        messages = record["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if not users or not answers:
            raise DataError(f"record {record.get('id', '?')} needs a user and an assistant message")
        return users[-1], answers[-1]
    return record["instruction"], record["response"]


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
            raise DataError("the chat template renders the prompt differently with and without the answer; use data.template=alpaca")
        response_ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def record_key(input_ids: list[int], labels: list[int]) -> int:
    """A signed int64 naming one encoded record: sha256 of its token ids and of its response mask.

    The base-model anchor cache (``python -m asft_repro.anchor``) is keyed by it, so a cache built on a subset
    serves every subset nested in it, whatever the record order.
    """
    ids = np.asarray(input_ids, dtype=np.int64).tobytes()
    mask = np.asarray([label != IGNORE_INDEX for label in labels], dtype=np.uint8).tobytes()
    digest = hashlib.sha256(len(input_ids).to_bytes(8, "little") + ids + mask).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def train_file(cfg: DataConfig) -> Path:
    """The prepared training file for ``cfg``; a DataError naming the prep command if absent."""
    path = Path(cfg.train_file) if cfg.train_file else subset_dir(cfg.data_dir, cfg.name, cfg.size) / TRAIN_FILE
    if path.is_dir():
        raise DataError(f"training data {path} is a directory, not a file; set data.train_file to a JSONL or parquet "
                        f"file (e.g. {path / 'train.jsonl'})")
    if not path.exists():
        raise DataError(f"training data {path} not found; run `python -m data_prep training=[{cfg.name}] "
                        f"sizes=[{cfg.size}]` (add local_dir=DIR offline) or set data.train_file")
    return path


def data_manifest(cfg: DataConfig) -> dict:
    """The prep manifest next to the training file ({} when trained from a bare file).

    The run calls this before it writes anything, so the file is checked here too (``check_train_data``,
    one streamed pass): a broken training file fails before a run directory exists.
    """
    manifest = check_train_data(cfg).path.parent / "manifest.json"
    if not manifest.exists():
        return {}
    try:
        return json.loads(manifest.read_text())
    except ValueError as err:
        raise DataError(f"{manifest} is not valid JSON ({err}); delete its folder and re-run `python -m data_prep`") from None


def _chat_response(messages: Any, where: str) -> str:
    """The last assistant turn of a chat record; DataError unless it has a user and an assistant turn."""
    turns = messages if isinstance(messages, list) else []
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in turns):
        raise DataError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects; {FORMATS_HINT}")
    roles = {m["role"] for m in turns}
    if "user" not in roles or "assistant" not in roles:
        raise DataError(f"{where}: 'messages' needs a user and an assistant turn (roles found: "
                        f"{', '.join(sorted(roles)) or 'none'}); add them, or use 'instruction' and 'response' fields")
    prompt = [m.get("content") for m in turns if m["role"] == "user"][-1]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: the user turn's content is {type(prompt).__name__}, expected a string; fix that record")
    answer = [m.get("content") for m in turns if m["role"] == "assistant"][-1]
    return answer if isinstance(answer, str) else ""


def record_response(record: Any, where: str) -> str:
    """The response text of one raw record ('' when empty); DataError when the record has the wrong shape."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; write one JSON object per line, {FORMATS_HINT}")
    if "messages" in record and record["messages"] is not None:
        return _chat_response(record["messages"], where)
    missing = [name for name in FIELDS if name not in record]
    if missing:
        found = ", ".join(repr(str(k)) for k in sorted(record, key=str)) or "none"
        raise DataError(f"{where}: no {' or '.join(repr(m) for m in missing)} field (fields found: {found}); {FORMATS_HINT}")
    if not isinstance(record["instruction"], str):
        raise DataError(f"{where}: 'instruction' is {type(record['instruction']).__name__}, expected a string; fix that record")
    response = record["response"]
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: 'response' is {type(response).__name__}, expected a string; fix that record")
    return response or ""


def _where(path: Path, number: int) -> str:
    """Where a record sits, for messages: file:line (JSONL) or file row N (parquet)."""
    return f"{path} row {number}" if path.suffix == ".parquet" else f"{path}:{number}"


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) per non-blank line, streamed; DataError naming the line if it is not JSON."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text; training data must be JSONL (one JSON object per "
                                f"line) or a .parquet file") from None
            if not line.strip():
                continue
            if number == 1 and line.lstrip().startswith("["):
                yield from _json_array_records(path)
                return
            try:
                yield number, json.loads(line)
            except ValueError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err}); fix or delete that line "
                                f"(one JSON object per line)") from None


def _json_array_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Records of a file holding one JSON array (read whole; JSONL is the streamed format)."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON ({err}); write one JSON object per line (JSONL)") from None
    for number, row in enumerate(rows if isinstance(rows, list) else [rows], start=1):
        yield number, row


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, record) per parquet row, read in batches; DataError if the file is not parquet."""
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DataError(f"{path} is not a readable parquet file ({first}); re-export it, or use JSONL") from None


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    return _parquet_records(path) if path.suffix == ".parquet" else _jsonl_records(path)


def _line_list(numbers: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


def check_train_data(cfg: DataConfig) -> DataSummary:
    """Read the training file once with ``json`` (streamed, no tokenising) and fail with one line if it is unusable.

    Records with an empty response are allowed among good ones: they are listed in the summary
    (``load_train_dataset`` drops them); a file where every response is empty is an error.
    """
    path = train_file(cfg)
    summary = DataSummary(path)
    for row, (number, record) in enumerate(_records(path)):
        if not record_response(record, _where(path, number)).strip():
            summary.empty_rows.append(row)
            summary.empty_lines.append(number)
        summary.records += 1
    if summary.records == 0:
        raise DataError(f"training data {path} is empty (no records); re-run `python -m data_prep` or point "
                        f"data.train_file at a file with records")
    if len(summary.empty_rows) == summary.records:
        raise DataError(f"every response in {path} is empty ({summary.records} records); fill the 'response' field "
                        f"(or the assistant message) of the records")
    return summary


def _load_table(path: Path) -> datasets.Dataset:
    """The checked file as a datasets table; a DataError (not a traceback) if arrow cannot read it."""
    kind = "parquet" if path.suffix == ".parquet" else "json"
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # arrow schema clashes (a field with different types in different records) and the like
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DataError(f"{path} could not be read as a table ({first}); give each field the same type in every record") from None


def _drop_empty(raw: datasets.Dataset, summary: DataSummary) -> datasets.Dataset:
    """``raw`` without the records whose response is empty; prints one line with the count."""
    if not summary.empty_rows:
        return raw
    if len(raw) == summary.records:
        empty = set(summary.empty_rows)
        raw = raw.select([i for i in range(len(raw)) if i not in empty])
    else:
        raw = raw.filter(lambda r: bool(split_record(r)[1] and split_record(r)[1].strip()), desc="dropping empty responses")
    log.warning("%s: dropped %d of %d records with an empty response (line %s)", summary.path, len(summary.empty_rows),
                summary.records, _line_list(summary.empty_lines))
    return raw


def _max_length_error(raw: datasets.Dataset, tokenizer: Any, cfg: DataConfig, path: Path) -> DataError:
    """The error for a data.max_length that leaves no response token: the prompt lengths and a length that fits."""
    sample = raw.select(range(min(len(raw), 1000)))
    lengths = [len(tokenizer(render_prompt(split_record(r)[0], tokenizer, cfg.template), add_special_tokens=True)["input_ids"])
               for r in sample]
    suggest = 2 ** math.ceil(math.log2(max(lengths) + 64))
    return DataError(f"data.max_length={cfg.max_length} cuts off every response in {path}: the prompts ({cfg.template} "
                     f"template) are {min(lengths)}-{max(lengths)} tokens long (median {int(statistics.median(lengths))}); "
                     f"set data.max_length={suggest} or more")


def load_train_dataset(cfg: DataConfig, tokenizer: Any, with_keys: bool = False) -> datasets.Dataset:
    """Check, load and tokenise the training file; every failure is one DataError line. ``with_keys`` adds each
    record's ``record_key`` (what the anchor cache is indexed by)."""
    summary = check_train_data(cfg)
    if cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.template=chat but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat "
                        f"template; use data.template=alpaca")
    raw = _drop_empty(_load_table(summary.path), summary)
    encoded = raw.map(lambda r: encode(r, tokenizer, cfg.template, cfg.max_length),
                      remove_columns=raw.column_names, desc="tokenising")
    encoded = encoded.filter(lambda r: any(label != IGNORE_INDEX for label in r["labels"][1:]),
                             desc="dropping records with no response token left")
    if len(encoded) == 0:
        raise _max_length_error(raw, tokenizer, cfg, summary.path)
    if not with_keys:
        return encoded
    return encoded.map(lambda r: {"record_key": record_key(r["input_ids"], r["labels"])}, desc="record keys")


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id), labels (IGNORE_INDEX) and builds attention_mask; passes ``record_key``
    (int64 [B], what the cached base anchor is looked up by) when every record has one."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            pad = width - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * pad)
            batch["labels"].append(f["labels"] + [IGNORE_INDEX] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        out = {k: torch.tensor(v) for k, v in batch.items()}
        if features and all("record_key" in f for f in features):
            out["record_key"] = torch.tensor([int(f["record_key"]) for f in features], dtype=torch.int64)
        return out
