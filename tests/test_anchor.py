"""The shared base-model anchor (issue 12): ``python -m asft_repro.anchor`` writes the base's top-k rows once,
``method.anchor=cache`` trains from them without a base model, and the cached KL is the documented estimator."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from asft_repro.anchor_cache import (MANIFEST, AnchorRows, anchor_grad, anchor_kl_into, anchor_terms, complete_log_probs,
                                     completed_base_logits, read_manifest, read_shard, topk_rows)
from asft_repro.config import ConfigError
from asft_repro.fused_head import FusedLoss, enable_fused_head, response_hidden
from asft_repro.files import sha256_file
from asft_repro.losses import IGNORE_INDEX, chunk_grad, chunk_stats, loss_and_token_sums, summarize, token_stats
from conftest import ROOT, compose_config, run_in_process
from test_fused_head import VOCAB, make_batch, make_models

K = 128  # the default top-k; < the tiny vocabulary (640), so the estimator (not the exact distribution) is exercised
RUN = ["experiment=demo", "train.report_to=[]", "train.save_strategy=no", "eval.after_train=false",
       "train.save_final_model=false", "train.global_batch_size=16", "train.per_device_batch_size=8"]


def _config(data_dir: Path, *overrides: str):
    return OmegaConf.to_object(compose_config("config", ["experiment=demo", f"data.data_dir={data_dir}", "data.size=64",
                                                         f"method.anchor_k={K}", *overrides]))


@pytest.fixture(scope="module")
def anchor_data(demo_data, tiny_model_path, tmp_path_factory) -> Path:
    """A copy of the fixture math subsets with the anchor of the 256 subset built by the CLI (4 shards)."""
    root = tmp_path_factory.mktemp("anchor_data")
    shutil.copytree(demo_data / "numina_cot", root / "numina_cot")
    done = subprocess.run([sys.executable, "-m", "asft_repro.anchor", "experiment=demo", f"data.data_dir={root}",
                           "data.size=256", f"anchor.k={K}", "anchor.records_per_shard=64", "anchor.batch_size=16"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "shard " in line]
    assert len(lines) == 4 and all("records" in line and " s" in line for line in lines), done.stdout
    return root


def _cache_folder(root: Path, size: str = "256") -> Path:
    (folder,) = (root / "numina_cot" / size / "anchor").iterdir()
    return folder


# ---- the cache ---------------------------------------------------------------------------------------

def test_cache_round_trip_matches_the_base(anchor_data, tiny_model_path):
    from asft_repro.anchor import find_anchor_cache
    from asft_repro.data import load_train_dataset
    from asft_repro.modeling import load_model, load_tokenizer

    folder = _cache_folder(anchor_data)
    assert folder.name.startswith("tiny-") and folder.name.endswith(f"-k{K}")
    manifest = read_manifest(folder)
    assert manifest["complete"] and manifest["k"] == K and manifest["template"] == "alpaca" and manifest["max_length"] == 128
    assert manifest["model"]["fingerprint"]["weights"] and manifest["model"]["fingerprint"]["config_sha256"]
    assert all(sha256_file(folder / s["file"]) == s["sha256"] for s in manifest["shards"])
    cfg = _config(anchor_data)
    tokenizer = load_tokenizer(tiny_model_path)
    dataset = load_train_dataset(cfg.data, tokenizer, with_keys=True)
    cache = find_anchor_cache(cfg, dataset["record_key"])  # the 64 subset is served by the 256 subset's cache
    assert cache.folder == folder
    base = load_model(tiny_model_path, cfg.model, tokenizer).eval()
    for record in dataset.select(range(6)):
        ids = torch.tensor([record["input_ids"]])
        labels = torch.tensor([record["labels"]])
        rows = cache.rows([record["record_key"]])
        with torch.no_grad():
            logq = torch.log_softmax(base(input_ids=ids).logits[0, :-1].double(), -1)[(labels[0, 1:] != IGNORE_INDEX)]
        assert len(rows) == logq.shape[0] == cache.row_count(record["record_key"])
        exact_top = logq.topk(K + 1, dim=-1).values
        stored = rows.logprobs.double()
        # the stored values are the base's log-probs at the stored ids, within fp16 precision, and they are its top k
        assert torch.allclose(stored, logq.gather(1, rows.ids), atol=1e-3, rtol=1e-3)
        assert torch.allclose(stored, exact_top[:, :K], atol=1e-3, rtol=1e-3)
        assert (stored[:, -1] >= exact_top[:, K] - 1e-3 - 1e-3 * exact_top[:, K].abs()).all()
        rest = logq.scatter(1, rows.ids, float("-inf")).logsumexp(-1)
        assert torch.allclose(rows.log_rest.double(), rest, atol=1e-4)


def test_mismatched_cache_is_refused_naming_the_build_command(anchor_data, tiny_model_path, tmp_path, monkeypatch, capsys):
    from asft_repro.anchor import find_anchor_cache
    from asft_repro.data import load_train_dataset
    from asft_repro.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)

    def refusal(*overrides: str) -> str:
        cfg = _config(anchor_data, *overrides)
        with pytest.raises(ConfigError) as err:
            find_anchor_cache(cfg, load_train_dataset(cfg.data, tokenizer, with_keys=True)["record_key"])
        message = str(err.value)
        assert "\n" not in message and "python -m asft_repro.anchor " in message and "; build it with" in message
        return message

    assert "max_length 128 (the run: 96)" in refusal("data.max_length=96")
    assert "template 'alpaca' (the run: 'chat')" in refusal("data.template=chat")
    assert f"k {K} (the run: 64)" in refusal("method.anchor_k=64")
    # other data in the cache's own folder: the keys are not there
    other = anchor_data / "numina_cot" / "256" / "other.jsonl"
    rows = [json.loads(line) for line in (anchor_data / "numina_cot" / "64" / "train.jsonl").read_text().splitlines()]
    for row in rows:  # the same prompts, other answers
        row["messages"][-1]["content"] = "Edited. " + row["messages"][-1]["content"]
    other.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert "was built on other data" in refusal(f"data.train_file={other}")
    other.unlink()
    # through the training command: one line, before any run directory is written
    out = tmp_path / "refused"
    code, err, _ = run_in_process("asft_repro.train", [*RUN, f"data.data_dir={anchor_data}", "data.size=64", "method.anchor=cache",
                                                      f"method.anchor_k={K}", "data.max_length=96", f"output_dir={out}"],
                                  monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("asft_repro.train: method.anchor=cache: ") and "python -m asft_repro.anchor" in last
    assert not out.exists()


def test_resume_of_a_half_built_cache(demo_data, tiny_model_path, tmp_path, caplog):
    from asft_repro.anchor import build_anchor_cache, find_anchor_cache
    from asft_repro.data import load_train_dataset
    from asft_repro.modeling import load_tokenizer

    shutil.copytree(demo_data / "numina_cot" / "64", tmp_path / "numina_cot" / "64")
    cfg = _config(tmp_path, "anchor.records_per_shard=16")
    folder = build_anchor_cache(cfg)
    manifest = read_manifest(folder)
    assert manifest["num_shards"] == 4
    # killed while writing the last shard: its manifest entry is empty, a temp file is left, the shard is gone
    original = {name: array.copy() for name, array in read_shard(folder / "shard-00003.safetensors").items()}
    (folder / "shard-00003.safetensors").rename(folder / "shard-00003.safetensors.tmp4242")
    manifest["shards"][3], manifest["complete"] = None, False
    (folder / MANIFEST).write_text(json.dumps(manifest))
    keys = load_train_dataset(cfg.data, load_tokenizer(tiny_model_path), with_keys=True)["record_key"]
    with pytest.raises(ConfigError, match="is half-built; build it with"):
        find_anchor_cache(cfg, keys)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asft_repro.anchor"):
        assert build_anchor_cache(cfg) == folder
    lines = caplog.messages
    assert sum("complete, skipped" in line for line in lines) == 3 and any("shard 4/4: " in line and " rows, " in line for line in lines)
    assert not list(folder.glob("*.tmp*"))
    manifest = read_manifest(folder)
    assert manifest["complete"] and sha256_file(folder / "shard-00003.safetensors") == manifest["shards"][3]["sha256"]
    rebuilt = read_shard(folder / "shard-00003.safetensors")  # the same rows (CPU matmuls are not bitwise reproducible)
    assert (rebuilt["keys"] == original["keys"]).all() and (rebuilt["offsets"] == original["offsets"]).all()
    assert np.allclose(rebuilt["logprobs"], original["logprobs"], atol=1e-2) and (rebuilt["ids"] == original["ids"]).mean() > 0.99
    assert np.allclose(rebuilt["log_rest"], original["log_rest"], atol=1e-4)
    # a shard lost or corrupted after the build: refused (sha256), then rebuilt alone by a rerun
    with (folder / "shard-00001.safetensors").open("r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    with pytest.raises(ConfigError, match="does not match its sha256"):
        find_anchor_cache(cfg, keys)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asft_repro.anchor"):
        build_anchor_cache(cfg)
    assert sum("complete, skipped" in line for line in caplog.messages) == 3
    assert find_anchor_cache(cfg, keys).folder == folder
    # another records_per_shard would shard differently: refused, not mixed
    with pytest.raises(ConfigError, match="built with other settings"):
        build_anchor_cache(_config(tmp_path, "anchor.records_per_shard=8"))


def test_a_second_build_of_the_same_cache_is_refused_while_one_runs(demo_data, tmp_path, caplog):
    from asft_repro.anchor import build_anchor_cache
    from asft_repro.rundir import LOCK_FILE, RunLock

    shutil.copytree(demo_data / "numina_cot" / "64", tmp_path / "numina_cot" / "64")
    cfg = _config(tmp_path, "anchor.records_per_shard=32")
    folder = build_anchor_cache(cfg)
    manifest = (folder / MANIFEST).read_text()
    running = RunLock(folder)  # a live builder (this process) holds the folder
    running.acquire()
    try:
        with pytest.raises(ConfigError, match="is being written by pid"):
            build_anchor_cache(cfg)
        assert (folder / MANIFEST).read_text() == manifest  # nothing touched
    finally:
        running.release()
    (folder / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": socket.gethostname()}))  # a dead builder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asft_repro.anchor"):
        build_anchor_cache(cfg)
    assert sum("complete, skipped" in line for line in caplog.messages) == 2 and not (folder / LOCK_FILE).exists()


# ---- the estimator ------------------------------------------------------------------------------------

def _fused(policy, ids, mask, labels, method, direction, base=None, anchor=None, chunk_rows=5):
    enable_fused_head(policy)
    policy.zero_grad(set_to_none=True)
    base_hidden = response_hidden(base, ids, mask, labels) if base is not None else None
    request = FusedLoss(labels, method, base_hidden, base.lm_head if base is not None else None, 0.3, direction,
                        chunk_rows, anchor=anchor)
    rows, stats = policy(input_ids=ids, attention_mask=mask, from_hidden=request)
    rows.sum().backward()
    return rows.detach(), stats, {n: p.grad.clone() for n, p in policy.named_parameters()}


def _base_rows(base, ids, mask, labels) -> torch.Tensor:
    from asft_repro.fused_head import logits_rows
    from asft_repro.losses import chunks

    with torch.no_grad():  # the ops the exact path runs on the base's hidden rows, chunk by chunk (5 rows)
        hidden = response_hidden(base, ids, mask, labels)
        return torch.cat([torch.log_softmax(logits_rows(hidden[sl], base.lm_head.weight, None, torch.float64), dim=-1)
                          for sl in chunks(hidden.shape[0], 5)])


@pytest.mark.parametrize("method,direction", [("asft", "forward"), ("asft", "reverse"), ("sft_kl", "forward")])
def test_full_vocabulary_cache_is_the_exact_anchor(method, direction):
    policy, base = make_models(tied=False, dtype=torch.float64)
    ids, mask, labels = make_batch(1)
    logq = _base_rows(base, ids, mask, labels)
    full = AnchorRows(torch.arange(VOCAB).expand(logq.shape[0], VOCAB).contiguous(), logq,
                      torch.full((logq.shape[0],), float("-inf"), dtype=torch.float64))
    rows, stats, grads = _fused(policy, ids, mask, labels, method, direction, anchor=full)
    ref_rows, ref_stats, ref_grads = _fused(policy, ids, mask, labels, method, direction, base=base)
    assert torch.equal(rows, ref_rows) and torch.equal(stats, ref_stats)
    assert all(torch.equal(grads[name], ref_grads[name]) for name in grads)


def _direct_float64(z: torch.Tensor, targets: torch.Tensor, cached: AnchorRows, coef: float, reverse: bool):
    """Row losses (DFT + coef * KL) and d(sum)/dz from the formulas, written out in float64."""
    z = z.detach().double().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    ids = cached.ids
    logq_s, log_r = cached.logprobs.double(), cached.log_rest.double()
    norm = torch.logsumexp(torch.cat([logq_s, log_r[:, None]], 1), 1)
    logq_s, log_r = logq_s - norm[:, None], log_r - norm
    q_s, r = logq_s.exp(), log_r.exp()
    p = logp.exp()
    in_s = torch.zeros_like(p, dtype=torch.bool).scatter_(1, ids, True)
    log_one_minus = logp.masked_fill(in_s, float("-inf")).logsumexp(-1)  # log(1 - P_S), without cancellation
    logp_y = logp.gather(1, targets[:, None])[:, 0]
    dft = -logp_y.exp().detach() * logp_y
    if not reverse:  # KL(q~ || p) and its exact gradient, by autograd
        kl = (q_s * (logq_s - logp.gather(1, ids))).sum(-1) + r * (log_r - log_one_minus)
        (dft + coef * kl).sum().backward()
        return (dft + coef * kl).detach(), z.grad
    logq_full = torch.where(in_s, torch.zeros_like(p).scatter(1, ids, logq_s), log_r[:, None] + logp - log_one_minus[:, None])
    kl = (p * (logp - logq_full)).sum(-1)  # KL(p || q~)
    dft.sum().backward()
    pd, lpd, lqd = p.detach(), logp.detach(), logq_full.detach()
    grad = z.grad + coef * pd * (lpd - lqd - kl.detach()[:, None])  # q~ held fixed (the documented approximation)
    return (dft + coef * kl).detach(), grad


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [1, 8, 40])
def test_topk_estimator_is_the_formula(k, reverse):
    """The fused path with a top-k cache (head = identity, so hidden rows are logits) against float64 formulas."""
    torch.manual_seed(k)
    n, vocab = 23, VOCAB
    z = 3 * torch.randn(n, vocab, dtype=torch.float64)
    z[0] *= 8  # a peaked policy row: almost all its mass in S
    z[2] *= 400  # a policy row whose mass off S underflows float64: the exact fallbacks
    base_logits = z + torch.randn(n, vocab, dtype=torch.float64)
    base_logits[1] *= 8  # a peaked base row
    targets = torch.randint(0, vocab, (n,))
    cached = topk_rows(base_logits, k)
    cached = AnchorRows(cached.ids.long(), cached.logprobs.double(), cached.log_rest.double())
    head = torch.nn.Linear(vocab, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab, dtype=torch.float64))
    hidden = torch.cat([z, torch.zeros(1, vocab, dtype=torch.float64)])[None].requires_grad_(True)  # [1, n + 1, V]
    labels = torch.cat([torch.tensor([IGNORE_INDEX]), targets])[None]  # row t predicts labels[t + 1] = targets[t]
    rows, stats = FusedLoss(labels, "asft", kl_coef=0.3, kl_direction="reverse" if reverse else "forward",
                            chunk_rows=7, anchor=cached)(hidden, head)
    rows.sum().backward()
    ref_rows, ref_grad = _direct_float64(z, targets, cached, 0.3, reverse)
    assert torch.allclose(rows, ref_rows, rtol=1e-10, atol=1e-12)
    assert torch.allclose(hidden.grad[0, :n], ref_grad, rtol=1e-8, atol=1e-12)
    # and the O(k) path equals chunk_stats / chunk_grad on the completed log q~ (what the logits path uses)
    logp = torch.log_softmax(z, -1)
    logq = complete_log_probs(logp, cached.ids, cached.logprobs, cached.log_rest)
    dense = chunk_stats(logp, targets, logq, True)
    terms = anchor_terms(logp, cached.ids, cached.logprobs, cached.log_rest)
    assert torch.allclose(anchor_kl_into(chunk_stats(logp, targets, None, True), terms), dense, rtol=1e-10, atol=1e-12)
    ones = torch.ones(n, dtype=torch.float64)
    assert torch.allclose(anchor_grad(logp, targets, terms, dense, 0.3, reverse, ones),
                          chunk_grad(logp, targets, logq, True, 0.3, reverse, ones), rtol=1e-8, atol=1e-13)


def test_logits_path_with_cache_equals_the_fused_path():
    policy, base = make_models(tied=True)
    ids, mask, labels = make_batch(2)
    cached = topk_rows(base.lm_head(response_hidden(base, ids, mask, labels)).detach(), 8)
    cached = AnchorRows(cached.ids.long(), cached.logprobs.float(), cached.log_rest)
    _rows, stats, grads = _fused(policy, ids, mask, labels, "asft", "forward", anchor=cached, chunk_rows=4)
    policy.zero_grad(set_to_none=True)
    logits = policy(input_ids=ids, attention_mask=mask).logits
    base_logits = completed_base_logits(logits, labels, cached, chunk_rows=4)
    loss, sums = loss_and_token_sums(logits, labels, "asft", base_logits, 0.3, "forward", num_items=1)
    loss.backward()
    fused = summarize(token_stats(stats, has_base=True))
    assert summarize(sums)["kl_forward"] == pytest.approx(fused["kl_forward"], rel=1e-5)
    for name, param in policy.named_parameters():
        assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-6 * grads[name].abs().max().item()), name


# ---- training ------------------------------------------------------------------------------------------

def test_anchor_is_part_of_the_training_identity():
    from asft_repro.identity import config_hash, training_identity

    def digest(*overrides: str) -> str:
        return config_hash(training_identity(compose_config("config", ["experiment=demo", *overrides])))

    exact, cache = digest(), digest("method.anchor=cache")
    assert len({exact, cache, digest("method.anchor=cache", "method.anchor_k=64")}) == 3
    assert training_identity(compose_config("config", ["method.anchor=cache"]))["method.anchor"] == "cache"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


@pytest.mark.slow
def test_cache_run_loads_no_base_and_tracks_the_exact_kl(anchor_data, tmp_path, monkeypatch):
    import asft_repro.train as train_module

    loads: list[str] = []
    real_load = train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda *a, **kw: loads.append("model") or real_load(*a, **kw))

    def train(anchor: str) -> tuple[list[dict], int]:
        loads.clear()
        out = train_module.run(compose_config("config", [*RUN, f"data.data_dir={anchor_data}", "data.size=64",
                                                         "method=asft", f"method.anchor={anchor}", f"method.anchor_k={K}",
                                                         "train.max_steps=8", f"output_dir={tmp_path / anchor}"]))
        return _metrics(out), len(loads)

    (cached, cached_loads), (exact, exact_loads) = train("cache"), train("exact")
    assert (cached_loads, exact_loads) == (1, 2)  # the policy alone / the policy and the base
    assert [r["step"] for r in cached] == [r["step"] for r in exact]
    for row, ref in zip(cached, exact):
        assert row["kl_forward"] == pytest.approx(ref["kl_forward"], rel=0.1, abs=2e-3), row["step"]
        assert row["loss"] == pytest.approx(ref["loss"], rel=0.05), row["step"]
    assert exact[-1]["kl_forward"] > 0.01  # the policy moved: the comparison is not 0 vs 0
    print("kl_forward exact :", [round(r["kl_forward"], 4) for r in exact])
    print("kl_forward cached:", [round(r["kl_forward"], 4) for r in cached])


@pytest.mark.slow
def test_sweep_cells_all_train_from_one_cache(anchor_data, tmp_path, monkeypatch):
    import asft_repro.train as train_module

    loads: list[str] = []
    real_load = train_module.load_model
    monkeypatch.setattr(train_module, "load_model", lambda *a, **kw: loads.append("model") or real_load(*a, **kw))
    folder = _cache_folder(anchor_data)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    cells = [["method=asft", "method.kl_coef=0.05"], ["method=asft_reverse", "method.kl_coef=0.2"],
             ["method=sft", "train.log_kl=true"]]  # SFT's KL monitoring reads the cache too
    outs = []
    for cell in cells:
        outs.append(train_module.run(compose_config("config", [
            *RUN, f"data.data_dir={anchor_data}", "data.size=64", *cell, "method.anchor=cache", f"method.anchor_k={K}",
            "train.max_steps=2", f"output_dir={tmp_path / str(len(outs))}"])))
    assert len(loads) == len(cells)  # one policy per cell, never a base
    assert all(_metrics(out)[-1]["kl_forward"] >= 0 and "kl_reverse" in _metrics(out)[-1] for out in outs)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # read, never rewritten
    assert len(list((anchor_data / "numina_cot").glob("*/anchor/*"))) == 1
