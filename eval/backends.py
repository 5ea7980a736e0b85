"""Generation backends behind one interface: transformers (CPU default), vLLM, OpenAI-compatible server.

``generate`` returns ``n`` completions per prompt; ``choice_logprobs`` returns, per prompt, the
log-probability of each option letter as the next token (-inf when a letter is not among the
candidates the backend reports). vllm is imported only when its backend is built.

Sampling seeds are per prompt (``generate(prompts, sampling, seeds)``; the runner passes
``eval.seed + the item's index in its benchmark``), so an item's samples do not depend on which batch
or data-parallel worker scores it: hf seeds and samples each prompt on its own (greedy stays batched),
vllm gives each prompt its own seeded SamplingParams. openai sends one seed (``sampling.seed``) per
request; a vLLM server seeds every prompt of the request with it, so there too an item's samples do
not depend on its batch, but items are not given seeds of their own.
"""

from __future__ import annotations

import json
import math
import urllib.request
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Sampling:
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0


class GenerationBackend(Protocol):
    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]: ...

    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]: ...


def _letter_scores(candidates: dict[str, float], letters: str) -> dict[str, float]:
    """Best log-prob per letter among next-token candidates (' A', 'A', ...)."""
    scores = {letter: -math.inf for letter in letters}
    for token, logprob in candidates.items():
        key = token.strip().upper()
        if key in scores:
            scores[key] = max(scores[key], logprob)
    return scores


class HFBackend:
    """transformers ``generate`` with left padding; batched, greedy or sampled."""

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16) -> None:
        from asft_repro.config import ModelConfig
        from asft_repro.modeling import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, ModelConfig(path=model_path, dtype=dtype), self.tokenizer).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.batch_size = batch_size
        self._letter_ids: dict[str, dict[str, list[int]]] = {}

    def _batches(self, prompts: list[str]):
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True).to(self.model.device)
            yield chunk, enc

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]:
        if sampling.temperature > 0:  # one prompt at a time, each with its own seed: batch-independent samples
            out = []
            for prompt, seed in zip(prompts, seeds if seeds is not None else [sampling.seed] * len(prompts)):
                torch.manual_seed(seed)
                out += self._generate([prompt], sampling)
            return out
        return self._generate(prompts, sampling)

    def _generate(self, prompts: list[str], sampling: Sampling) -> list[list[str]]:
        out: list[list[str]] = []
        for chunk, enc in self._batches(prompts):
            kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "num_return_sequences": sampling.n,
                                      "pad_token_id": self.tokenizer.pad_token_id}
            if sampling.temperature > 0:
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            else:
                kwargs.update(do_sample=False)
            ids = self.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1]:]
            texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            out += [texts[i * sampling.n:(i + 1) * sampling.n] for i in range(len(chunk))]
        return out

    def _letter_token_ids(self, letters: str) -> dict[str, list[int]]:
        """Token ids that decode to each letter (' A', 'A', ...): one vocabulary scan per letter set."""
        if letters not in self._letter_ids:
            ids: dict[str, list[int]] = {letter: [] for letter in letters}
            for tok, tid in self.tokenizer.get_vocab().items():
                text = self.tokenizer.convert_tokens_to_string([tok]).strip().upper()
                if text in ids:
                    ids[text].append(tid)
            self._letter_ids[letters] = ids
        return self._letter_ids[letters]

    @torch.no_grad()
    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]:
        letter_ids = self._letter_token_ids(letters)
        out = []
        for _chunk, enc in self._batches(prompts):
            logp = self.model(**enc).logits[:, -1].float().log_softmax(-1).cpu()
            for row in logp:
                out.append({letter: max((row[i].item() for i in ids), default=-math.inf) for letter, ids in letter_ids.items()})
        return out


class VLLMBackend:
    """vLLM offline engine (``vllm.LLM``), tensor parallel as configured."""

    def __init__(self, model_path: str, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, seed: int = 0, max_model_len: int | None = None) -> None:
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("eval.backend=vllm needs vllm: pip install -e '.[vllm]' on a GPU machine, "
                              "or use eval.backend=hf") from err
        self.llm = LLM(model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed, max_model_len=max_model_len)

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]:
        from vllm import SamplingParams

        def params(seed: int) -> SamplingParams:
            return SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_new_tokens, seed=seed)

        sampled = seeds is not None and sampling.temperature > 0
        per_prompt = [params(seed) for seed in seeds] if sampled else params(sampling.seed)
        return [[c.text for c in r.outputs] for r in self.llm.generate(prompts, per_prompt)]

    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        out = []
        for result in self.llm.generate(prompts, params):
            top = result.outputs[0].logprobs[0] if result.outputs[0].logprobs else {}
            out.append(_letter_scores({lp.decoded_token or "": lp.logprob for lp in top.values()}, letters))
        return out


class OpenAIServerBackend:
    """Any OpenAI-compatible completions endpoint (e.g. a running ``vllm serve``)."""

    def __init__(self, url: str, model: str, timeout: float = 600.0, batch_size: int = 16) -> None:
        self.url, self.model, self.timeout, self.batch_size = url.rstrip("/"), model, timeout, batch_size

    def _complete(self, prompts: list[str], **params: Any) -> list[dict]:
        body = json.dumps({"model": self.model, "prompt": prompts, **params}).encode()
        request = urllib.request.Request(f"{self.url}/completions", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                choices = json.loads(response.read())["choices"]
        except OSError as err:
            raise ConnectionError(f"no OpenAI-compatible server answered at {self.url} ({err}); start one "
                                  f"(`vllm serve MODEL`) or set eval.server_url") from None
        return sorted(choices, key=lambda c: c["index"])

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]:
        out = []  # one seed per request (sampling.seed): see the module docstring
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            choices = self._complete(chunk, n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                     max_tokens=sampling.max_new_tokens, seed=sampling.seed)
            out += [[c["text"] for c in choices[i * sampling.n:(i + 1) * sampling.n]] for i in range(len(chunk))]
        return out

    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            for choice in self._complete(prompts[start:start + self.batch_size], max_tokens=1, temperature=0.0, logprobs=20):
                top = (choice.get("logprobs") or {}).get("top_logprobs") or [{}]
                out.append(_letter_scores(top[0], letters))
        return out


def make_backend(eval_cfg: Any, model_path: str, dtype: str) -> GenerationBackend:
    if eval_cfg.backend == "hf":
        return HFBackend(model_path, dtype, eval_cfg.batch_size)
    if eval_cfg.backend == "vllm":
        return VLLMBackend(model_path, dtype, eval_cfg.tensor_parallel_size, eval_cfg.gpu_memory_utilization, eval_cfg.seed)
    return OpenAIServerBackend(eval_cfg.server_url, eval_cfg.server_model or model_path, eval_cfg.request_timeout, eval_cfg.batch_size)
