r"""Every bad input ends in one line ``module: what is wrong; how to fix it``, a non-zero exit, no traceback,
and nothing written (no run directory, no partial prep output, inputs untouched).

The CLIs run in-process (``sys.argv`` patched, ``main()`` called, ``SystemExit`` caught); one Hydra CLI (train) and
one argparse CLI (tables) also run as real subprocesses, so the in-process judgement is checked against a real exit.
A failing case says why in the first word of its assertion message:

    SILENT     exit code 0
    TRACEBACK  a Python traceback on stderr
    UNCLEAR    the last stderr line is not one ``module: ...`` line
    WROTE      a ``module: ...`` line, but files were written or changed
    NOFIX      a ``module: ...`` line, nothing written, but no ``; how to fix it`` part

Counting, no script needed::

    pytest tests/test_bad_input.py --collect-only -q | grep -c 'test_bad_input\['    # cases (ids: <cli>-<what>)
    pytest tests/test_bad_input.py -q                                                 # passed / failed
    pytest tests/test_bad_input.py -q -k test_bad_input | grep -oE '^E +AssertionError: [A-Z]+' | sort | uniq -c
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import ROOT, run_in_process

FIXTURES = ROOT / "data_prep" / "fixtures"
TRAIN, PREP, EVAL, TABLES, PLOTS = "asft_repro.train", "data_prep", "eval.run", "asft_repro.tables", "asft_repro.plots"
BASE_ARGS = {  # valid, quick settings each case's overrides replace key by key
    TRAIN: "data.data_dir={data} data.size=64 eval.benchmarks_dir={data}/benchmarks train.report_to=[] "
           "train.max_steps=1 train.save_strategy=no eval.after_train=false eval.limit=2 eval.max_new_tokens=4",
    PREP: "local_dir={in}/local out_dir=prepped sizes=[64] training=[numina_cot,medmcqa] benchmarks=[math500,medqa]",
    EVAL: "model_path={tiny} eval.benchmarks_dir={data}/benchmarks benchmarks=[math500] eval.limit=2 "
          "eval.max_new_tokens=4 out_dir=evalout",
    TABLES: "", PLOTS: "",
}

@dataclass(frozen=True)
class Case:
    """One bad input: the CLI, its overrides (``{in}``, ``{data}``, ``{tiny}`` filled in), the files it needs."""

    id: str
    module: str
    args: str
    setup: Callable[[Path, str], None] | None = None  # (input dir, tiny model path) -> None
    base: bool = True  # start from BASE_ARGS
    subprocess: bool = False


# ---- inputs the cases read (written under tmp_path/in before the snapshot) ----------------------------

def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _lines(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


GOOD = {"instruction": "What is 2 plus 3?", "response": "2 plus 3 = 5. The answer is $\\boxed{5}$."}


def train_file(text: str) -> Callable[[Path, str], None]:
    return lambda d, _tiny: _write(d / "train.jsonl", text)


def no_tokenizer(d: Path, tiny: str) -> None:
    """The tiny model's folder without its tokenizer files."""
    (d / "no_tok").mkdir()
    for f in Path(tiny).iterdir():
        if f.is_file() and not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, d / "no_tok" / f.name)


def local_copy(edit: Callable[[Path], None] | None = None) -> Callable[[Path, str], None]:
    """A copy of the prep fixtures in ``in/local``, then ``edit(local)``."""
    def setup(d: Path, _tiny: str) -> None:
        shutil.copytree(FIXTURES, d / "local")
        if edit:
            edit(d / "local")
    return setup


def broken_parquet(local: Path) -> None:
    (local / "numina_cot.jsonl").unlink()
    _write(local / "numina_cot.parquet", "PAR1 this is not parquet")


def runs_root(files: dict[str, str]) -> Callable[[Path, str], None]:
    """A results root ``in/root`` holding ``files``."""
    def setup(d: Path, _tiny: str) -> None:
        for name, text in files.items():
            _write(d / "root" / name, text)
    return setup


def existing_subset(d: Path, tiny: str) -> None:
    """out_dir already holds a numina_cot/64 subset made with another seed (must not be overwritten)."""
    from conftest import compose_config
    from data_prep.__main__ import prepare_training

    local_copy()(d, tiny)
    cfg = compose_config("prep", [f"out_dir={Path.cwd() / 'prepped'}", f"local_dir={FIXTURES}", "sizes=[64]", "seed=5"])
    prepare_training("numina_cot", cfg)


CASES = [
    # -- train: model
    Case("train-model-path-missing", TRAIN, "model.path={in}/no-such-model"),
    Case("train-model-hub-offline", TRAIN, "model.path=someorg/nonexistent-model"),  # HF_HUB_OFFLINE=1 (conftest)
    Case("train-model-no-tokenizer", TRAIN, "model.path={in}/no_tok", no_tokenizer),
    Case("train-model-dtype-int8", TRAIN, "model.dtype=int8"),
    Case("train-model-group-unknown", TRAIN, "model=nonexistent"),
    # -- train: batch / optimiser / schedule
    Case("train-per-device-batch-0", TRAIN, "train.per_device_batch_size=0"),
    Case("train-global-batch-0", TRAIN, "train.global_batch_size=0"),
    Case("train-global-batch-not-multiple", TRAIN, "train.global_batch_size=10 train.per_device_batch_size=4"),
    Case("train-save-strategy-bogus", TRAIN, "train.save_strategy=bogus"),
    Case("train-optim-bogus", TRAIN, "train.optim=bogus"),
    Case("train-lr-scheduler-bogus", TRAIN, "train.lr_scheduler=bogus"),
    Case("train-lr-0", TRAIN, "train.learning_rate=0"),
    Case("train-lr-negative", TRAIN, "train.learning_rate=-1e-5"),
    Case("train-num-epochs-0", TRAIN, "train.num_epochs=0 train.max_steps=-1"),
    Case("train-max-steps-0", TRAIN, "train.max_steps=0"),
    Case("train-warmup-ratio-1.5", TRAIN, "train.warmup_ratio=1.5"),
    Case("train-max-grad-norm-negative", TRAIN, "train.max_grad_norm=-1"),
    Case("train-weight-decay-negative", TRAIN, "train.weight_decay=-0.1"),
    Case("train-logging-steps-0", TRAIN, "train.logging_steps=0"),
    Case("train-no-final-model-but-eval", TRAIN, "train.save_final_model=false eval.after_train=true"),
    Case("train-misspelt-key", TRAIN, "train.learnin_rate=1"),
    # -- train: method
    Case("train-method-group-bogus", TRAIN, "method=bogus"),
    Case("train-method-name-bogus", TRAIN, "method.name=bogus"),
    Case("train-kl-coef-negative", TRAIN, "method.kl_coef=-1", subprocess=True),
    Case("train-kl-direction-sideways", TRAIN, "method.kl_direction=sideways"),
    # -- train: data config
    Case("train-data-template-foo", TRAIN, "data.template=foo"),
    Case("train-data-domain-bio", TRAIN, "data.domain=bio"),
    Case("train-data-max-length-2", TRAIN, "data.max_length=2"),
    Case("train-data-dir-missing", TRAIN, "data.data_dir={in}/nodata"),
    # -- train: the training file (asft_repro/data.py)
    Case("data-train-file-missing", TRAIN, "data.train_file={in}/nope.jsonl"),
    Case("data-train-file-is-dir", TRAIN, "data.train_file={in}", train_file(_lines(GOOD))),
    Case("data-missing-fields", TRAIN, "data.train_file={in}/train.jsonl",
         train_file(_lines({"question": "q", "answer": "a"}))),
    Case("data-empty-file", TRAIN, "data.train_file={in}/train.jsonl", train_file("")),
    Case("data-broken-json", TRAIN, "data.train_file={in}/train.jsonl",
         train_file(_lines(GOOD) + '{"instruction": "x", "response": \n')),
    Case("data-all-responses-empty", TRAIN, "data.train_file={in}/train.jsonl",
         train_file(_lines({**GOOD, "response": ""}, {**GOOD, "response": "  "}))),
    Case("data-max-length-cuts-every-response", TRAIN, "data.train_file={in}/train.jsonl data.max_length=16",
         train_file(_lines(GOOD, GOOD))),
    Case("data-response-not-a-string", TRAIN, "data.train_file={in}/train.jsonl",
         train_file(_lines({**GOOD, "response": 5}))),
    Case("data-chat-without-assistant", TRAIN, "data.train_file={in}/train.jsonl",
         train_file(_lines({"messages": [{"role": "user", "content": "hi"}]}))),
    Case("data-broken-parquet", TRAIN, "data.train_file={in}/train.parquet",
         lambda d, _t: _write(d / "train.parquet", "PAR1 not parquet")),
    # -- eval.run
    Case("eval-template-foo", EVAL, "eval.template=foo"),
    Case("eval-limit-0", EVAL, "eval.limit=0"),
    Case("eval-batch-size-0", EVAL, "eval.batch_size=0"),
    Case("eval-n-samples-0", EVAL, "eval.n_samples=0"),
    Case("eval-max-new-tokens-0", EVAL, "eval.max_new_tokens=0"),
    Case("eval-temperature-negative", EVAL, "eval.temperature=-1"),
    Case("eval-top-p-1.5", EVAL, "eval.top_p=1.5"),
    Case("eval-backend-bogus", EVAL, "eval.backend=bogus"),
    Case("eval-mc-mode-bogus", EVAL, "eval.mc_mode=bogus"),
    Case("eval-unknown-benchmark", EVAL, "benchmarks=[gsm8k]"),
    Case("eval-model-path-missing", EVAL, "model_path={in}/no-such-model"),
    Case("eval-model-no-tokenizer", EVAL, "model_path={in}/no_tok", no_tokenizer),
    Case("eval-benchmarks-dir-missing", EVAL, "eval.benchmarks_dir={in}/nobench"),
    Case("eval-misspelt-key", EVAL, "eval.limt=2"),
    Case("eval-run-dir-missing", EVAL, "run_dir={in}/no-such-run", base=False),
    Case("eval-run-dir-not-a-run", EVAL, "run_dir={in}", base=False),
    # -- tables / plots
    Case("tables-root-missing", TABLES, "--root {in}/nowhere", subprocess=True),
    Case("tables-root-without-runs", TABLES, "--root {in}"),
    Case("tables-broken-metrics-json", TABLES, "--root {in}/root",
         runs_root({"demo/tiny-x-64-sft-s42/eval/metrics.json": "{broken", "demo/tiny-x-64-sft-s42/run.json": "{}"})),
    Case("tables-unknown-flag", TABLES, "--roots {in}"),
    Case("plots-root-missing", PLOTS, "--root {in}/nowhere"),
    Case("plots-root-without-runs", PLOTS, "--root {in}"),
    Case("plots-experiment-missing", PLOTS, "--root {in} --experiment nope"),
    Case("plots-broken-metrics-jsonl", PLOTS, "--root {in}/root",
         runs_root({"demo/tiny-x-64-sft-s42/metrics.jsonl": '{"step": 1, "kl_forward": 0.1}\n{broken\n{"step": 3}\n'})),
    # -- data_prep
    Case("prep-local-dir-missing", PREP, "local_dir={in}/nowhere"),
    Case("prep-local-dir-is-a-file", PREP, "local_dir={in}/file.txt", lambda d, _t: _write(d / "file.txt", "x")),
    Case("prep-broken-json", PREP, "", local_copy(lambda l: _write(l / "medmcqa" / "train.jsonl", '{"question": \n'))),
    Case("prep-broken-parquet", PREP, "", local_copy(broken_parquet)),
    Case("prep-empty-file", PREP, "", local_copy(lambda l: _write(l / "math500.jsonl", ""))),
    Case("prep-missing-fields", PREP, "", local_copy(lambda l: _write(l / "medqa.jsonl", _lines({"q": "x", "a": "y"})))),
    Case("prep-benchmark-no-valid-item", PREP, "",
         local_copy(lambda l: _write(l / "math500.jsonl", _lines({"problem": "  ", "answer": "1"})))),
    Case("prep-unknown-training-set", PREP, "training=[alpaca]", local_copy()),
    Case("prep-unknown-benchmark", PREP, "benchmarks=[gsm8k]", local_copy()),
    Case("prep-size-bogus", PREP, "sizes=[ten]", local_copy()),
    Case("prep-size-too-big", PREP, "sizes=[10k]", local_copy()),
    Case("prep-sampling-bogus", PREP, "sampling=bogus", local_copy()),
    Case("prep-misspelt-key", PREP, "sizez=[64]", local_copy()),
    Case("prep-existing-different-subset", PREP, "", existing_subset),
]


# ---- running a CLI and judging what it did ------------------------------------------------------------

def fill(case: Case, values: dict[str, str]) -> list[str]:
    """The command line: BASE_ARGS overridden key by key by the case's own arguments."""
    if not case.module.startswith(("asft_repro.train", "data_prep", "eval.run")):  # argparse: as written
        return [arg.format(**values) for arg in case.args.split()]
    merged: dict[str, str] = {}
    for arg in (BASE_ARGS[case.module].split() if case.base else []) + case.args.split():
        merged[arg.split("=", 1)[0] if "=" in arg else arg] = arg
    return [arg.format(**values) for arg in merged.values()]


def run_subprocess(module: str, argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file (size, mtime) and folder under ``roots``."""
    out = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            out[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else (-1, 0)
    return out


def verdict(module: str, code: int, stderr: str, changed: list[str]) -> str | None:
    """None when the run failed cleanly; else 'CATEGORY: detail'."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if code == 0:
        return f"SILENT: exit 0, last stderr line {last[:300]!r}"
    if "Traceback (most recent call last)" in stderr:
        return f"TRACEBACK: {last[:300]}"
    if not last.startswith(f"{module}: "):
        return f"UNCLEAR: last stderr lines {lines[-3:]!r}"[:600]
    if changed:
        return f"WROTE: {', '.join(sorted(changed)[:3])} ({last[:200]})"
    if "; " not in last[len(module) + 2:]:
        return f"NOFIX: {last[:300]}"
    return None


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys, demo_data, tiny_model_path):
    inputs, cwd = tmp_path / "in", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    if case.setup:
        case.setup(inputs, tiny_model_path)
    argv = fill(case, {"in": str(inputs), "data": str(demo_data), "tiny": tiny_model_path})
    before = snapshot(cwd, inputs, demo_data)
    if case.subprocess:
        code, stderr = run_subprocess(case.module, argv, cwd)
    else:
        code, stderr, _out = run_in_process(case.module, argv, monkeypatch, capsys)
    after = snapshot(cwd, inputs, demo_data)
    changed = [Path(p).relative_to(tmp_path).as_posix() if p.startswith(str(tmp_path)) else p
               for p in set(before) ^ set(after) | {p for p in before if p in after and before[p] != after[p]}]
    problem = verdict(case.module, code, stderr, changed)
    assert problem is None, problem


def test_enough_cases():
    assert len(CASES) >= 52 and len({c.id for c in CASES}) == len(CASES)


# ---- asft_repro/data.py directly: the messages, the dropped-row count, the speed ----------------------

@pytest.mark.parametrize("text, expected", [
    (_lines({"question": "q", "answer": "a"}), "fields found: 'answer', 'question'"),
    ("", "is empty"),
    (_lines(GOOD) + "{oops\n", "train.jsonl:2: not valid JSON"),
    (_lines({**GOOD, "response": ""}), "every response"),
    (_lines({"messages": [{"role": "assistant", "content": "a"}]}), "needs a user and an assistant turn"),
], ids=["fields", "empty", "json", "all-empty", "chat"])
def test_data_errors_name_file_and_fix(tmp_path, text, expected):
    from asft_repro.config import ConfigError, DataConfig
    from asft_repro.data import DataError, check_train_data

    (tmp_path / "train.jsonl").write_text(text)
    with pytest.raises(DataError, match=expected) as err:
        check_train_data(DataConfig(train_file=str(tmp_path / "train.jsonl")))
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value) and "; " in str(err.value)


def test_empty_responses_are_dropped_and_counted(tmp_path, tiny_model_path, caplog):
    from asft_repro.config import DataConfig
    from asft_repro.data import load_train_dataset
    from asft_repro.modeling import load_tokenizer

    (tmp_path / "train.jsonl").write_text(_lines(GOOD, {**GOOD, "response": " "}, GOOD, {**GOOD, "response": None}))
    dataset = load_train_dataset(DataConfig(train_file=str(tmp_path / "train.jsonl")), load_tokenizer(tiny_model_path))
    assert len(dataset) == 2
    assert "dropped 2 of 4 records with an empty response (line 2, 4)" in caplog.text


def test_max_length_error_gives_prompt_lengths(tmp_path, tiny_model_path):
    from asft_repro.config import DataConfig
    from asft_repro.data import DataError, load_train_dataset
    from asft_repro.modeling import load_tokenizer

    (tmp_path / "train.jsonl").write_text(_lines(GOOD))
    with pytest.raises(DataError, match=r"data.max_length=16 cuts off every response.*tokens long.*set data.max_length=\d+"):
        load_train_dataset(DataConfig(train_file=str(tmp_path / "train.jsonl"), max_length=16), load_tokenizer(tiny_model_path))


def test_check_streams_100k_records_fast(tmp_path):
    from asft_repro.config import DataConfig
    from asft_repro.data import check_train_data

    line = json.dumps(GOOD) + "\n"
    (tmp_path / "train.jsonl").write_text(line * 100_000)
    start = time.perf_counter()
    assert check_train_data(DataConfig(train_file=str(tmp_path / "train.jsonl"))).records == 100_000
    assert time.perf_counter() - start < 10
