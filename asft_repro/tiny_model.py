"""A tiny Qwen2-architecture causal LM and tokenizer, built offline and cached.

``model.path=tiny`` resolves here. The tokenizer is a byte-level BPE trained on the
project's fixture text; the model (about 0.1 M parameters) is briefly pre-trained as a plain
language model on that text, so that the "base" it starts from already assigns real
probabilities to its tokens (DFT's weights and the KL anchor are then meaningful).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from asft_repro.files import short_hash
from data_prep.make_fixtures import FIXTURE_DIR

TINY_VERSION = 2
log = logging.getLogger(__name__)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
VOCAB_SIZE = 640
PRETRAIN = dict(steps=300, batch_size=16, seq_len=96, lr=3e-3, seed=0)


def cache_root() -> Path:
    return Path(os.environ.get("ASFT_CACHE", Path.home() / ".cache" / "asft_repro"))


def corpus_texts() -> list[str]:
    """Plain text of the fixture training and benchmark files (no prompt template)."""
    texts = []
    for path in sorted(FIXTURE_DIR.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            parts = [v for k, v in sorted(row.items()) if isinstance(v, str) and k not in ("id", "source", "url", "unique_id")]
            parts += [" ".join(map(str, v)) for v in row.values() if isinstance(v, list) and v and isinstance(v[0], str)]
            if parts:
                texts.append("\n".join(parts))
    return texts


def _fingerprint(texts: list[str], arch: dict | None = None) -> str:
    return short_hash([TINY_VERSION, arch or TINY_ARCH, VOCAB_SIZE, PRETRAIN, texts])


def build_tokenizer(texts: list[str]):
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _pretrain(model, tokenizer, texts: list[str]) -> None:
    """A short causal-LM pre-training on the corpus (packed blocks, AdamW)."""
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    n_blocks = ids.numel() // PRETRAIN["seq_len"]
    blocks = ids[: n_blocks * PRETRAIN["seq_len"]].view(n_blocks, PRETRAIN["seq_len"])
    optim = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, PRETRAIN["steps"])
    model.train()
    for _ in range(PRETRAIN["steps"]):
        batch = blocks[torch.randint(0, n_blocks, (PRETRAIN["batch_size"],), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
    model.eval()


def ensure_tiny_model(root: Path | None = None, arch: dict | None = None) -> Path:
    """Path of the cached tiny model folder, building it (about 20 s on 2 cores) if absent.

    ``arch`` replaces TINY_ARCH's keys, e.g. ``{"num_attention_heads": 2, "num_key_value_heads": 1}`` for
    head_dim 32 (vLLM's CPU attention rejects TINY_ARCH's head_dim 16); another arch is another folder."""
    texts = corpus_texts()
    arch = {**TINY_ARCH, **(arch or {})}
    target = (root or cache_root()) / f"tiny-qwen2-{_fingerprint(texts, arch)}"
    if (target / "config.json").exists():
        return target
    log.info("building the tiny model in %s (once)", target)
    torch.manual_seed(PRETRAIN["seed"])
    tokenizer = build_tokenizer(texts)
    config = Qwen2Config(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **arch)
    model = Qwen2ForCausalLM(config)
    _pretrain(model, tokenizer, texts)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (target / "config.json").exists():  # another process may have won the race
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    else:
        shutil.rmtree(tmp)
    return target
