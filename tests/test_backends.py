"""Backends: transformers on the tiny model; the OpenAI server backend against a loopback stand-in."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.backends import HFBackend, OpenAIServerBackend, Sampling


@pytest.fixture(scope="module")
def hf(tiny_model_path):
    return HFBackend(tiny_model_path, batch_size=3)


def test_hf_generate_greedy_is_deterministic_and_batched(hf):
    prompts = ["What is 2 plus 3?", "Compute 4 times 5.", "What is 7 minus 1?", "x"]
    first = hf.generate(prompts, Sampling(max_new_tokens=8))
    assert len(first) == 4 and all(len(o) == 1 for o in first)
    single = hf.generate(prompts[:1], Sampling(max_new_tokens=8))
    assert single[0] == first[0]  # left padding does not change the greedy answer
    sampled = hf.generate(prompts[:2], Sampling(max_new_tokens=6, temperature=1.0, n=3))
    assert [len(o) for o in sampled] == [3, 3]


def test_hf_choice_logprobs_are_a_distribution_subset(hf):
    scores = hf.choice_logprobs(["Question: x\n\nOptions:\nA. a\nB. b\nC. c\nD. d\n\nAnswer:"], "ABCD")[0]
    assert set(scores) == set("ABCD")
    assert all(v <= 0 for v in scores.values()) and sum(math.exp(v) for v in scores.values()) <= 1.0 + 1e-6


class _StandIn(BaseHTTPRequestHandler):
    """Speaks the OpenAI completions protocol: echoes a boxed answer, or letter log-probs."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            for j in range(body.get("n", 1)):
                choice = {"index": i * body.get("n", 1) + j, "text": f"The answer is $\\boxed{{{len(prompt)}}}$"}
                if body.get("logprobs"):
                    choice["logprobs"] = {"top_logprobs": [{" B": -0.1, " A": -2.5, "Hello": -3.0}]}
                choices.append(choice)
        payload = json.dumps({"choices": list(reversed(choices))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def test_openai_backend_against_local_server(server):
    backend = OpenAIServerBackend(f"http://127.0.0.1:{server.server_port}/v1", "tiny", timeout=5, batch_size=2)
    out = backend.generate(["ab", "abcd", "abcdef"], Sampling(max_new_tokens=5, n=2, temperature=0.7))
    assert out == [["The answer is $\\boxed{2}$"] * 2, ["The answer is $\\boxed{4}$"] * 2, ["The answer is $\\boxed{6}$"] * 2]
    assert server.requests[0]["n"] == 2 and server.requests[0]["max_tokens"] == 5 and server.requests[0]["model"] == "tiny"
    scores = backend.choice_logprobs(["q"], "ABCD")[0]
    assert scores["B"] == -0.1 and scores["A"] == -2.5 and scores["C"] == -math.inf


def test_openai_backend_unreachable_names_the_fix():
    backend = OpenAIServerBackend("http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(ConnectionError, match="vllm serve"):
        backend.generate(["x"], Sampling())


def test_vllm_backend_real_or_skipped(tiny_model_path):
    vllm = pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a GPU")
    from eval.backends import VLLMBackend

    backend = VLLMBackend(tiny_model_path, dtype="float32")
    assert len(backend.generate(["What is 2 plus 3?"], Sampling(max_new_tokens=4))[0]) == 1
    assert vllm


def test_importing_eval_does_not_need_vllm():
    import importlib
    import sys

    import eval.runner  # noqa: F401

    assert "vllm" not in sys.modules or importlib.util.find_spec("vllm") is not None


def test_a_generation_cut_at_the_token_limit_gets_no_credit_without_a_final_answer():
    from types import SimpleNamespace

    from eval.backends import Generated
    from eval.runner import _score_batch, make_sampling

    class Fake:
        def generate(self, prompts, sampling, seeds=None):
            return [[Generated("so far 2 + 3 = 5", truncated=True), Generated("so far 2 + 3 = 5 ### Instruction: x", True),
                     Generated("so \\boxed{5} and then", truncated=True), Generated("2 + 3 = 5", truncated=False)]]

    cfg = SimpleNamespace(mc_mode="loglik", stop=["### Instruction"], max_new_tokens=8, temperature=0.0, top_p=1.0,
                          n_samples=4, seed=0)
    item = {"id": "1", "benchmark": "math500", "kind": "math", "answer": "5", "prompt": "2+3?"}
    [record] = _score_batch([item], ["p"], Fake(), cfg, make_sampling(cfg), [0])
    # cut at the limit: no credit; stopped by a stop string: not cut; a boxed answer counts; a finished text counts
    assert record["truncated"] == [True, False, True, False]
    assert record["correct"] == [False, True, True, True]
