"""Score a model on benchmark files; resumable per-sample outputs and one metrics.json.

Results are keyed by what produced them. ``evaluate(cfg, model_path, eval_root)`` fingerprints the
model (``asft_repro.files.model_fingerprint``: a local folder's weight files and config; a hub id), every
benchmark file read (sha256), the prompt template used, mc_mode, backend, dtype and the sampling
settings, and writes into ``eval_root/<settings_hash>/``::

    settings.json       the fingerprint, human-readable
    <benchmark>.jsonl   per-sample records, appended as batches finish; a rerun resumes from them
    metrics.json        scores + settings_hash + settings
    .lock               while an evaluator writes the folder (one at a time: a second one is refused)

Change any of those settings and the results go to a new subfolder: records are never reused for
settings other than the ones that produced them.

Data parallel (``eval.data_parallel_size``, N; 0 = visible GPUs // GPUs per worker, 1 on a machine
without GPUs; not part of the settings hash: it does not change the records). With N > 1 the parent
starts N fresh worker processes (``python -m eval.runner --worker``, the job on stdin); worker i gets
``CUDA_VISIBLE_DEVICES`` = GPUs i*G .. i*G+G-1 of the parent's visible list (G = eval.tensor_parallel_size
for vllm, 1 for hf; left alone without GPUs and for openai), scores items i, i+N, i+2N, ... of each
benchmark and appends to ``<benchmark>.part{i}of{N}.jsonl`` (resumable like the main file). When every
worker succeeds, the parent merges the parts into ``<benchmark>.jsonl`` in the benchmark's item order,
deletes them and writes metrics.json as the one-process path does; a failed worker stops the run with one
line (the worker, its last stderr line) and its parts are kept, so a rerun resumes. Parts left by a run
with another N are merged into ``<benchmark>.jsonl`` first. Sampling seeds are per item (eval.seed + the
item's index in its benchmark, see eval/backends.py), so N workers and one process give the same
records; greedy records can still differ in the last bits between batch compositions (as with another
eval.batch_size), which can flip a near-tie.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from asft_repro.benchmarks import (average_label, benchmark_kind, domain_benchmarks, domains, known_benchmarks,
                                   members)
from asft_repro.config import SAMPLING_KEYS, ConfigError
from asft_repro.diskspace import naming_disk_errors
from asft_repro.errors import MissingInputError, ProjectError
from asft_repro.paths import REPO_ROOT, benchmark_file
from asft_repro.files import model_fingerprint, sha256_file, short_hash, write_json_atomic
from asft_repro.jsonl import append_jsonl, read_jsonl
from asft_repro.modeling import load_tokenizer
from asft_repro.rundir import RunDirError, RunLock
from asft_repro.prompts import LETTERS, render_mcq, render_mcq_scoring, render_prompt, stop_strings, truncate_at_stop
from eval import backends
from eval.backends import GenerationBackend, Sampling, make_backend
from eval.graders import extract_choice, grade_math

log = logging.getLogger(__name__)

LETTER_MODES = ("loglik", "paper_fallback")  # multiple choice scored from the next token after "Answer:"
PAPER_LETTERS = ("A", "B", "C", "D")  # the paper's evaluator looks for these whatever the number of options
PAPER_TOPK = 10  # its logprobs=10
PART = re.compile(r"\.part(\d+)of(\d+)\.jsonl")


class WorkerError(ProjectError, ChildProcessError):
    """A data-parallel eval worker failed; the message names it and its last stderr line."""


def resolve_benchmarks(names: list[str] | None, domain: str) -> list[str]:
    """Reported benchmark names (groups such as mmlu_medical kept whole); unknown names fail clearly."""
    names = list(names) if names else domain_benchmarks(domain)
    known = known_benchmarks()
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown benchmark '{name}'; choose from {', '.join(sorted(known))}")
    return names


def load_items(name: str, benchmarks_dir: Path, limit: int | None) -> tuple[list[dict], dict[str, str]]:
    """Items of a benchmark (a group's members pooled) and the sha256 of each file read."""
    items, hashes = [], {}
    for member in members(name):
        path = benchmark_file(benchmarks_dir, member)
        if not path.exists():
            raise MissingInputError(f"benchmark file {path} not found; run `python -m data_prep benchmarks=[{name}]` "
                                    f"(add local_dir=DIR offline) or set eval.benchmarks_dir")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items += rows[:limit] if limit else rows
        hashes[member] = sha256_file(path)
    return items, hashes


def build_prompt(item: dict, template: str, tokenizer: Any, mc_mode: str) -> str:
    """The prompt of one item (texts in asft_repro/prompts.py): math and generate-mode multiple choice in
    ``template``; letter scoring (loglik, paper_fallback) in the paper's ``...\n\nAnswer:`` prompt."""
    if item["kind"] == "multiple_choice":
        if mc_mode in LETTER_MODES:  # the next token after "Answer:" is the letter, as in the paper's evaluator
            return render_mcq_scoring(item["prompt"], item["choices"])
        return render_prompt(render_mcq(item["prompt"], item["choices"]), tokenizer, template)
    return render_prompt(item["prompt"], tokenizer, template)


def paper_mc_answer(top: list[tuple[str, float]], generated: str) -> tuple[str, str]:
    """The paper's medical evaluator's letter and where it came from (``topk``, ``text`` or ``default``).

    ``top``: the first token's top candidates in the backend's order (decoded text, log-prob). Each one whose
    stripped, upper-cased text is A-D sets that letter's score, a later variant overwriting an earlier one
    (``" A"`` then ``"a"``: the ``"a"`` log-prob counts); the best letter wins. Without any, the first standalone
    A-D letter of the generated token's text; without that, ``"A"`` (the paper's silent default).
    """
    scores: dict[str, float] = {}
    for token, logprob in top:
        key = str(token).strip().upper()
        if key in PAPER_LETTERS:
            scores[key] = float(logprob)
    if scores:
        return max(scores, key=scores.get), "topk"
    match = re.search(r"\b([ABCD])\b", generated.strip().upper())
    if match:
        return match.group(1), "text"
    return "A", "default"


def check_mc_mode(ecfg: Any, names: list[str], backend: Any = None) -> None:
    """ConfigError (one line) when mc_mode=paper_fallback meets a backend that reports no top first tokens."""
    if ecfg.mc_mode != "paper_fallback":
        return
    if not any(benchmark_kind(n) == "multiple_choice" for n in names):
        return
    if backend is None:
        backend = {"hf": backends.HFBackend, "vllm": backends.VLLMBackend,
                   "openai": backends.OpenAIServerBackend}.get(ecfg.backend)
    if not callable(getattr(backend, "next_token_topk", None)):
        raise ConfigError(f"eval.mc_mode=paper_fallback is invalid with eval.backend={ecfg.backend} (it reports no "
                          f"top-{PAPER_TOPK} first tokens); use eval.backend=hf, or eval.mc_mode=loglik")


def _score_batch(batch: list[dict], prompts: list[str], backend: GenerationBackend, cfg: Any, sampling: Sampling,
                 seeds: list[int]) -> list[dict]:
    kind = batch[0]["kind"]
    if kind == "multiple_choice" and cfg.mc_mode == "paper_fallback":
        records = []
        for item, cand in zip(batch, backend.next_token_topk(prompts, PAPER_TOPK)):  # type: ignore[attr-defined]
            top = [(str(token), float(logprob)) for token, logprob in cand["top"]]
            parsed, source = paper_mc_answer(top, cand["text"])
            records.append({"id": item["id"], "benchmark": item["benchmark"], "outputs": [cand["text"]], "parsed": [parsed],
                            "correct": [parsed == item["answer"]], "answer": item["answer"], "mc_source": source,
                            "top_tokens": top})
        return records
    if kind == "multiple_choice" and cfg.mc_mode == "loglik":
        records = []
        for item, scores in zip(batch, backend.choice_logprobs(prompts, LETTERS[: len(batch[0]["choices"])])):
            valid = {k: v for k, v in scores.items() if v > float("-inf")}
            parsed = max(valid, key=valid.get) if valid else None
            records.append({"id": item["id"], "benchmark": item["benchmark"], "outputs": [], "parsed": [parsed],
                            "correct": [parsed == item["answer"]], "answer": item["answer"], "letter_logprobs": scores})
        return records
    records = []
    stop = stop_strings(getattr(cfg, "stop", None))
    for item, generated in zip(batch, backend.generate(prompts, sampling, seeds)):
        outputs = [truncate_at_stop(text, stop) for text in generated]  # as the paper's evaluator cuts its outputs
        # hit the token limit without stopping: no credit unless a final answer was marked
        truncated = [getattr(raw, "truncated", False) and cut == raw for raw, cut in zip(generated, outputs)]
        if kind == "math":
            graded = [grade_math(text, item["answer"], cut) for text, cut in zip(outputs, truncated)]
            correct, parsed = [g[0] for g in graded], [g[1] for g in graded]
        else:
            parsed = [extract_choice(text, item["choices"]) for text in outputs]
            correct = [p == item["answer"] for p in parsed]
        records.append({"id": item["id"], "benchmark": item["benchmark"], "outputs": outputs, "parsed": parsed,
                        "correct": correct, "answer": item["answer"], "truncated": truncated})
    return records


def item_key(item: dict) -> str:
    return f"{item['benchmark']}/{item['id']}"


def read_records(path: Path) -> dict[str, dict]:
    """``path``'s records by item key, each key once (its last record); a file holding a key twice (two evaluators
    that appended to one folder) is rewritten without the repeats."""
    records = read_jsonl(path)
    done = {item_key(record): record for record in records}
    if len(done) < len(records):
        log.warning("%s: %d repeated record(s) of the same items dropped", path, len(records) - len(done))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in done.values()), encoding="utf-8")
        os.replace(tmp, path)
    return done


def score_items(name: str, items: list[dict], backend: GenerationBackend, cfg: Any, template: str, tokenizer: Any,
                out_file: Path, shard: tuple[int, int] = (0, 1), skip: frozenset[str] | set[str] = frozenset()) -> dict[str, dict]:
    """Score items ``i, i+N, i+2N, ...`` of ``items`` (``shard=(i, N)``; all by default) that neither ``out_file``
    nor ``skip`` holds, appending records to ``out_file`` as batches finish; returns ``out_file``'s records by key."""
    worker, workers = shard
    done = read_records(out_file)
    mine = list(range(worker, len(items), workers))
    todo = [index for index in mine if item_key(items[index]) not in done and item_key(items[index]) not in skip]
    sampling = make_sampling(cfg)
    desc = name if workers == 1 else f"{name} [worker {worker} of {workers}]"
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            for kind in sorted({items[index]["kind"] for index in batch}):
                same = [index for index in batch if items[index]["kind"] == kind]
                prompts = [build_prompt(items[index], template, tokenizer, cfg.mc_mode) for index in same]
                # per-item seeds: an item's samples do not depend on its batch or worker
                records = _score_batch([items[index] for index in same], prompts, backend, cfg, sampling,
                                       [cfg.seed + index for index in same])
                with naming_disk_errors("eval records", out_file, ConfigError,
                                        "rerun the same command (the records written so far are kept)"):
                    append_jsonl(out_file, records)
                done.update((item_key(r), r) for r in records)
            bar.update(len(batch))
    return done


def make_sampling(cfg: Any) -> Sampling:
    """The backends' sampling settings from ``eval``; ``stop`` resolved (null = the paper's stop strings)."""
    return Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.n_samples, cfg.seed,
                    stop=stop_strings(getattr(cfg, "stop", None)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples with c correct."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def benchmark_scores(items: list[dict], done: dict[str, dict]) -> dict[str, Any]:
    """Scores of one benchmark, in percent:

    * ``acc``: the first sample's accuracy (what the paper's tables report); ``accuracy`` (read by the tables
      and the domain averages) is the same number;
    * ``mean_acc``: over all samples of all items (the paper's evaluator prints it too);
    * ``pass@1`` and, with n > 1 samples, ``pass@n``: the unbiased estimator, averaged over items;
    * counts: items, samples, ``unparsed`` answers (counted wrong), and for mc_mode=paper_fallback how many
      letters came from the generated text (``fell_back_to_text``) or defaulted to "A" (``defaulted_to_A``).
    """
    records = [done[item_key(it)] for it in items]
    scores: dict[str, Any] = {"accuracy": None, "acc": None, "mean_acc": None, "num_items": len(records),
                              "num_samples": sum(len(r["correct"]) for r in records),
                              "unparsed": sum(p is None for r in records for p in r["parsed"])}
    if records:
        scores["acc"] = scores["accuracy"] = 100.0 * statistics.fmean(float(r["correct"][0]) for r in records)
        scores["mean_acc"] = 100.0 * statistics.fmean(float(c) for r in records for c in r["correct"])
        n = min(len(r["correct"]) for r in records)
        for k in sorted({1, n}):
            scores[f"pass@{k}"] = 100.0 * statistics.fmean(pass_at_k(len(r["correct"]), sum(map(bool, r["correct"])), k)
                                                           for r in records)
    if any("mc_source" in r for r in records):
        scores["fell_back_to_text"] = sum(r.get("mc_source") == "text" for r in records)
        scores["defaulted_to_A"] = sum(r.get("mc_source") == "default" for r in records)
    return scores


def score_benchmark(name: str, items: list[dict], backend: GenerationBackend, cfg: Any, template: str,
                    tokenizer: Any, out_file: Path) -> dict[str, Any]:
    """Score ``items``, appending per-sample records to ``out_file`` as batches finish (resumable)."""
    return benchmark_scores(items, score_items(name, items, backend, cfg, template, tokenizer, out_file))


def part_file(out_file: Path, worker: int, workers: int) -> Path:
    """Worker ``worker`` of ``workers``'s records for ``out_file`` (``<benchmark>.part{i}of{N}.jsonl``)."""
    return out_file.with_name(f"{out_file.stem}.part{worker}of{workers}.jsonl")


def part_files(out_file: Path, workers: int | None = None) -> list[Path]:
    """The part files next to ``out_file`` (of ``workers`` workers only, if given)."""
    parts = []
    for path in sorted(out_file.parent.glob(f"{out_file.stem}.part*of*.jsonl")):
        match = PART.fullmatch(path.name[len(out_file.stem):])
        if match and (workers is None or int(match.group(2)) == workers):
            parts.append(path)
    return parts


def merge_parts(out_file: Path, parts: list[Path], items: list[dict]) -> dict[str, dict]:
    """Fold ``parts`` into ``out_file`` (its records and theirs, in the benchmark's item order), delete them;
    returns the records by key. Without parts, ``out_file`` is left as it is."""
    done = read_records(out_file)
    for path in parts:
        for record in read_jsonl(path):
            done.setdefault(item_key(record), record)
    if parts:
        order = {item_key(it): position for position, it in enumerate(items)}
        records = sorted(done.values(), key=lambda r: order.get(item_key(r), len(order)))
        tmp = out_file.with_name(out_file.name + ".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        os.replace(tmp, out_file)
        for path in parts:
            path.unlink()
    return done


def domain_average(scores: dict[str, dict], domain: str, metric: str = "accuracy") -> float | None:
    """The paper's average of ``metric``: over all of the domain's benchmarks, or None if any is missing."""
    names = domain_benchmarks(domain)
    values = [scores.get(n, {}).get(metric) for n in names]
    return statistics.fmean(values) if all(v is not None for v in values) else None


def eval_settings(cfg: Any, model_path: str, template: str, benchmark_sha256: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Everything that decides the per-sample records: model, benchmark files, template, scoring, sampling."""
    ecfg = cfg.eval
    settings = {"model": model_fingerprint(model_path), "dtype": cfg.model.dtype, "benchmarks": benchmark_sha256,
                "template": template, "mc_mode": ecfg.mc_mode, "backend": ecfg.backend,
                **{k: getattr(ecfg, k) for k in SAMPLING_KEYS}, "stop": stop_strings(getattr(ecfg, "stop", None))}
    if ecfg.backend == "openai":  # the server decides which weights answer
        settings["server_model"] = ecfg.server_model or model_path
    return settings


def settings_hash(settings: dict[str, Any]) -> str:
    return short_hash(settings)


def gpu_ids(cuda_visible_devices: str | None, count: int) -> list[str]:
    """The ids a child's CUDA_VISIBLE_DEVICES should use for the ``count`` GPUs this process sees."""
    if cuda_visible_devices is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in cuda_visible_devices.split(",") if d.strip()][:count]


def visible_gpus() -> list[str]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return gpu_ids(os.environ.get("CUDA_VISIBLE_DEVICES"), count)


def data_parallel_plan(ecfg: Any, gpus: list[str] | None = None) -> list[str | None]:
    """One entry per worker: its CUDA_VISIBLE_DEVICES, or None to leave the environment alone.

    ``[None]`` is the one-process path. G GPUs per worker: eval.tensor_parallel_size for vllm, 1 for hf;
    none for openai (the server holds the GPUs; auto = 1 there) and on a machine without GPUs (CPU
    workers share the cores; auto = 1).
    """
    requested = getattr(ecfg, "data_parallel_size", 1)
    if requested == 1:
        return [None]
    if ecfg.backend == "openai":
        return [None] * max(requested, 1)
    gpus = visible_gpus() if gpus is None else gpus
    if not gpus:
        return [None] * max(requested, 1)
    per_worker = ecfg.tensor_parallel_size if ecfg.backend == "vllm" else 1
    workers = requested or max(1, len(gpus) // per_worker)
    if workers == 1:  # auto on too few GPUs for one worker: one process, as with data_parallel_size=1
        return [None]
    if workers * per_worker > len(gpus):
        raise ConfigError(f"eval.data_parallel_size={requested} needs {workers * per_worker} GPUs "
                          f"({per_worker} per worker) but {len(gpus)} are visible; set 0 (auto) or at most "
                          f"{max(1, len(gpus) // per_worker)}")
    return [",".join(gpus[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]


def _plain(ecfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(ecfg):
        return dataclasses.asdict(ecfg)
    if OmegaConf.is_config(ecfg):
        return OmegaConf.to_container(ecfg, resolve=True)
    return dict(vars(ecfg))


def _tokenizer(backend: Any, template: str, model_path: str) -> Any:
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None and template == "chat":
        tokenizer = load_tokenizer(model_path)
    return tokenizer


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]", data.decode("utf-8", "replace")) if line.strip()]
    return lines[-1] if lines else "(no output)"


def _pump(stream: Any, tail: bytearray, lock: threading.Lock) -> None:
    """Copy a worker's stderr to ours as it comes, keeping its last 8 KiB."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while chunk := stream.read1(65536):
        with lock:
            sys.stderr.write(decoder.decode(chunk))
            sys.stderr.flush()
        tail += chunk
        del tail[:-8192]


def _feed(stream: Any, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except BrokenPipeError:  # the worker died at start: its exit code and stderr say why
        pass


def run_workers(plan: list[str | None], job: dict[str, Any], jobs: list[dict[str, Any]], out_dir: Path) -> None:
    """Run ``python -m eval.runner --worker`` once per non-empty entry of ``jobs`` (``job`` + its benchmarks),
    worker i with CUDA_VISIBLE_DEVICES=plan[i]; wait for all; WorkerError naming the first that failed."""
    workers = len(plan)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    lock, procs = threading.Lock(), []
    try:
        for worker, (devices, benchmarks) in enumerate(zip(plan, jobs)):
            if not benchmarks:
                continue
            child_env = env if devices is None else {**env, "CUDA_VISIBLE_DEVICES": devices}
            proc = subprocess.Popen([sys.executable, "-m", "eval.runner", "--worker"], stdin=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=child_env)
            tail = bytearray()
            pump = threading.Thread(target=_pump, args=(proc.stderr, tail, lock), daemon=True)
            pump.start()
            procs.append((worker, devices, proc, pump, tail))
            data = json.dumps({**job, "worker": worker, "workers": workers, "benchmarks": benchmarks}).encode()
            threading.Thread(target=_feed, args=(proc.stdin, data), daemon=True).start()  # workers start side by side
        for _worker, _devices, proc, pump, _tail in procs:
            proc.wait()
            pump.join()
    finally:
        for *_rest, proc, _pump_thread, _tail in procs:
            if proc.poll() is None:  # we are being interrupted: do not leave workers behind
                proc.terminate()
                proc.wait()
    failed = [(w, d, p.returncode, t) for w, d, p, _pump_thread, t in procs if p.returncode]
    if failed:
        worker, devices, code, tail = failed[0]
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        on = f", CUDA_VISIBLE_DEVICES={devices}" if devices is not None else ""
        more = f" ({len(failed) - 1} more worker(s) failed)" if len(failed) > 1 else ""
        raise WorkerError(f"eval worker {worker} of {workers} failed ({how}{on}): {_last_line(bytes(tail))}{more}; "
                          f"the records so far are kept in {out_dir}/*.part*of{workers}.jsonl: rerun the same "
                          f"command to resume")


def run_worker_job(job: dict[str, Any]) -> None:
    """One worker's job (what :func:`run_workers` sends): score its shard of each benchmark into its part files."""
    ecfg = SimpleNamespace(**job["eval"])
    backend = make_backend(ecfg, job["model_path"], job["dtype"])
    try:
        tokenizer = _tokenizer(backend, job["template"], job["model_path"])
        for bench in job["benchmarks"]:
            score_items(bench["name"], bench["items"], backend, ecfg, job["template"], tokenizer,
                        Path(bench["out_file"]), (job["worker"], job["workers"]), set(bench["skip"]))
    finally:
        backend.close()  # the engine's memory goes back before this process reports


def worker_main() -> int:
    """``python -m eval.runner --worker``: score one shard of each benchmark described by the JSON on stdin."""
    job = json.load(sys.stdin)
    try:
        run_worker_job(job)
    except Exception as err:  # noqa: BLE001 - reported to the parent as this process's last stderr line
        traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        sys.stderr.write(f"{type(err).__name__}: {first}\n" if first else f"{type(err).__name__}\n")
        return 1
    return 0


def evaluate_data_parallel(plan: list[str | None], ecfg: Any, model_path: str, dtype: str, template: str,
                           loaded: dict[str, tuple[list[dict], Any]], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Score every benchmark with ``len(plan)`` worker processes, merge their parts, return the scores."""
    workers = len(plan)
    jobs: list[list[dict[str, Any]]] = [[] for _ in plan]
    for name, (items, _hashes) in loaded.items():
        out_file = out_dir / f"{name}.jsonl"
        others = [p for p in part_files(out_file) if p not in part_files(out_file, workers)]
        main = merge_parts(out_file, others, items)  # parts of a run with another N join the main file first
        for worker in range(workers):
            part = part_file(out_file, worker, workers)
            done = set(main) | {item_key(r) for r in read_jsonl(part)}
            if any(item_key(items[i]) not in done for i in range(worker, len(items), workers)):
                jobs[worker].append({"name": name, "items": items, "out_file": str(part), "skip": sorted(main)})
    job = {"eval": _plain(ecfg), "model_path": model_path, "dtype": dtype, "template": template}
    if any(jobs):
        log.info("%d of %d data-parallel workers scoring into %s", sum(map(bool, jobs)), workers, out_dir)
        run_workers(plan, job, jobs, out_dir)
    scores = {}
    for name, (items, _hashes) in loaded.items():
        out_file = out_dir / f"{name}.jsonl"
        scores[name] = benchmark_scores(items, merge_parts(out_file, part_files(out_file), items))
    return scores


@contextlib.contextmanager
def one_evaluator(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock (:class:`asft_repro.rundir.RunLock`: pid, host, heartbeat, stale takeover) while
    scoring into it; a second evaluator is refused in one line. A block that fails leaving the folder empty
    removes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out_dir)
    try:
        lock.acquire()
    except RunDirError as err:
        raise ConfigError(f"another evaluation is already scoring this model with these settings: {err}") from None
    try:
        yield
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            out_dir.rmdir()  # only when empty: a model that failed to load leaves nothing behind


def evaluate(cfg: Any, model_path: str, eval_root: Path, benchmarks: list[str] | None = None) -> dict[str, Any]:
    """Score ``model_path`` on the configured benchmarks into ``eval_root/<settings_hash>/``; returns metrics."""
    ecfg = cfg.eval
    names = resolve_benchmarks(benchmarks or ecfg.benchmarks, cfg.data.domain)
    loaded = {name: load_items(name, Path(ecfg.benchmarks_dir), ecfg.limit) for name in names}
    template = ecfg.template or cfg.data.template
    settings = eval_settings(cfg, model_path, template, {name: hashes for name, (_items, hashes) in loaded.items()})
    key = settings_hash(settings)
    out_dir = Path(eval_root) / key
    plan = data_parallel_plan(ecfg)
    check_mc_mode(ecfg, names)
    backend = tokenizer = None
    if len(plan) == 1:
        backend = make_backend(ecfg, model_path, cfg.model.dtype)  # a model that cannot load fails before any write
    try:
        if backend is not None:
            check_mc_mode(ecfg, names, backend)
            tokenizer = _tokenizer(backend, template, model_path)
        with one_evaluator(out_dir):  # a second evaluation of the same model and settings is refused
            write_json_atomic(out_dir / "settings.json", settings)
            if backend is not None:
                scores = {}
                for name, (items, _hashes) in loaded.items():
                    out_file = out_dir / f"{name}.jsonl"
                    merge_parts(out_file, part_files(out_file), items)  # records of an earlier data-parallel run
                    scores[name] = score_benchmark(name, items, backend, ecfg, template, tokenizer, out_file)
            else:
                scores = evaluate_data_parallel(plan, ecfg, model_path, cfg.model.dtype, template, loaded, out_dir)
            metrics = {
                "model_path": model_path, "benchmarks": scores, "settings_hash": key, "settings": settings,
                "averages": {average_label(domain): domain_average(scores, domain) for domain in domains()},
                "mean_acc_averages": {average_label(domain): domain_average(scores, domain, "mean_acc")
                                      for domain in domains()},
                "sampling": {**{k: getattr(ecfg, k) for k in ("backend", "mc_mode", *SAMPLING_KEYS)},
                             "stop": settings["stop"]},
                "template": template,
                "benchmark_sha256": {m: h for _items, hashes in loaded.values() for m, h in hashes.items()},
            }
            write_json_atomic(out_dir / "metrics.json", metrics)
    finally:
        if backend is not None:
            backend.close()  # a second evaluation in this process starts with the memory back
    summary = ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in scores.items() if v["accuracy"] is not None)
    log.info("%s -> %s: %s", model_path, out_dir, summary)
    return metrics


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("eval.runner: the data-parallel worker of python -m eval.run; run that instead")
    sys.exit(worker_main())
