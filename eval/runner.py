"""Score a model on benchmark files; resumable per-sample outputs and one metrics.json."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from data_prep.formatting import LETTERS, render_mcq
from eval.backends import GenerationBackend, Sampling, make_backend
from eval.graders import extract_choice, grade_math

SOURCES = Path(__file__).resolve().parent.parent / "conf" / "prep" / "sources.yaml"
DOMAIN_AVG = {"math": "Math Avg", "medical": "Medical Avg"}


def source_config() -> Any:
    return OmegaConf.load(SOURCES)


def resolve_benchmarks(names: list[str] | None, domain: str) -> list[str]:
    """Reported benchmark names (groups such as mmlu_medical kept whole); unknown names fail clearly."""
    sources = source_config()
    names = list(names) if names else list(sources.domains[domain])
    known = set(sources.benchmarks) | set(sources.benchmark_groups)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown benchmark '{name}': choose from {', '.join(sorted(known))}")
    return names


def load_items(name: str, benchmarks_dir: Path, limit: int | None) -> tuple[list[dict], dict[str, str]]:
    """Items of a benchmark (a group's members pooled) and the sha256 of each file read."""
    sources = source_config()
    members = list(sources.benchmark_groups[name]) if name in sources.benchmark_groups else [name]
    items, hashes = [], {}
    for member in members:
        path = benchmarks_dir / member / "test.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"benchmark file {path} not found: run `python -m data_prep benchmarks=[{name}]` "
                                    f"(add local_dir=DIR offline) or set eval.benchmarks_dir")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items += rows[:limit] if limit else rows
        hashes[member] = hashlib.sha256(path.read_bytes()).hexdigest()
    return items, hashes


def build_prompt(item: dict, template: str, tokenizer: Any, mc_mode: str) -> str:
    from asft_repro.data import render_prompt

    if item["kind"] == "multiple_choice":
        body = render_mcq(item["prompt"], item["choices"])
        # next-token scoring reads the letter right after "Answer:", as the reference evaluator does
        return body + "\n\nAnswer:" if mc_mode == "loglik" else render_prompt(body, tokenizer, template)
    return render_prompt(item["prompt"], tokenizer, template)


def _score_batch(batch: list[dict], prompts: list[str], backend: GenerationBackend, cfg: Any, sampling: Sampling) -> list[dict]:
    kind = batch[0]["kind"]
    if kind == "multiple_choice" and cfg.mc_mode == "loglik":
        records = []
        for item, scores in zip(batch, backend.choice_logprobs(prompts, LETTERS[: len(batch[0]["choices"])])):
            valid = {k: v for k, v in scores.items() if v > float("-inf")}
            parsed = max(valid, key=valid.get) if valid else None
            records.append({"id": item["id"], "benchmark": item["benchmark"], "outputs": [], "parsed": [parsed],
                            "correct": [parsed == item["answer"]], "answer": item["answer"], "letter_logprobs": scores})
        return records
    records = []
    for item, outputs in zip(batch, backend.generate(prompts, sampling)):
        if kind == "math":
            graded = [grade_math(text, item["answer"]) for text in outputs]
            correct, parsed = [g[0] for g in graded], [g[1] for g in graded]
        else:
            parsed = [extract_choice(text, item["choices"]) for text in outputs]
            correct = [p == item["answer"] for p in parsed]
        records.append({"id": item["id"], "benchmark": item["benchmark"], "outputs": outputs, "parsed": parsed,
                        "correct": correct, "answer": item["answer"]})
    return records


def score_benchmark(name: str, items: list[dict], backend: GenerationBackend, cfg: Any, template: str,
                    tokenizer: Any, out_file: Path) -> dict[str, Any]:
    """Score ``items``, appending per-sample records to ``out_file`` as batches finish (resumable)."""
    done: dict[str, dict] = {}
    if out_file.exists():
        for line in out_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[f"{record['benchmark']}/{record['id']}"] = record
    todo = [it for it in items if f"{it['benchmark']}/{it['id']}" not in done]
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.n_samples, cfg.seed)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with out_file.open("a", encoding="utf-8") as f, tqdm(total=len(items), initial=len(items) - len(todo), desc=name) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            for kind in {it["kind"] for it in batch}:
                same = [it for it in batch if it["kind"] == kind]
                prompts = [build_prompt(it, template, tokenizer, cfg.mc_mode) for it in same]
                for record in _score_batch(same, prompts, backend, cfg, sampling):
                    f.write(json.dumps(record) + "\n")
                    done[f"{record['benchmark']}/{record['id']}"] = record
            f.flush()
            bar.update(len(batch))
    records = [done[f"{it['benchmark']}/{it['id']}"] for it in items]
    per_item = [statistics.fmean(map(float, r["correct"])) for r in records]
    return {"accuracy": 100.0 * statistics.fmean(per_item) if per_item else None, "num_items": len(records),
            "num_samples": sum(len(r["correct"]) for r in records),
            "unparsed": sum(p is None for r in records for p in r["parsed"])}


def domain_average(scores: dict[str, dict], domain: str) -> float | None:
    """The paper's average: over all of the domain's benchmarks, or None if any is missing."""
    names = list(source_config().domains[domain])
    values = [scores.get(n, {}).get("accuracy") for n in names]
    return statistics.fmean(values) if all(v is not None for v in values) else None


def evaluate(cfg: Any, model_path: str, out_dir: Path, benchmarks: list[str] | None = None) -> dict[str, Any]:
    """Score ``model_path`` on the configured benchmarks; writes eval/<benchmark>.jsonl and metrics.json."""
    ecfg = cfg.eval
    names = resolve_benchmarks(benchmarks or ecfg.benchmarks, cfg.data.domain)
    loaded = {name: load_items(name, Path(ecfg.benchmarks_dir), ecfg.limit) for name in names}
    template = ecfg.template or cfg.data.template
    backend = make_backend(ecfg, model_path, cfg.model.dtype)
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None and template == "chat":
        from asft_repro.modeling import load_tokenizer

        tokenizer = load_tokenizer(model_path)
    scores = {name: score_benchmark(name, items, backend, ecfg, template, tokenizer, out_dir / f"{name}.jsonl")
              for name, (items, _hashes) in loaded.items()}
    metrics = {
        "model_path": model_path, "benchmarks": scores,
        "averages": {label: domain_average(scores, domain) for domain, label in DOMAIN_AVG.items()},
        "sampling": {k: getattr(ecfg, k) for k in ("backend", "mc_mode", "max_new_tokens", "temperature", "top_p", "n_samples", "seed", "limit")},
        "template": template, "benchmark_sha256": {m: h for _items, hashes in loaded.values() for m, h in hashes.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    summary = ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in scores.items() if v["accuracy"] is not None)
    print(f"[eval] {model_path}: {summary}")
    return metrics
