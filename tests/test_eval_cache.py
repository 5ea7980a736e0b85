"""Evaluation records keyed by what produced them: per-model folders, settings subfolders, torn-file resume,
config checks, and ``python -m eval.run run_dir=...``'s main() (with the wandb summary, offline)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import eval.run as eval_run  # registers the eval_cli_schema the eval_run config extends
from asft_repro.config import ConfigError
from asft_repro.files import model_fingerprint
from asft_repro.jsonl import JsonlError, append_jsonl, read_jsonl
from conftest import compose_config, run_in_process


def score(demo_data: Path, *overrides: str) -> dict:
    """``python -m eval.run`` in-process: math500 only, 3 items, short answers."""
    overrides = (f"eval.benchmarks_dir={demo_data}/benchmarks", "eval.limit=3", "eval.max_new_tokens=6",
                 "benchmarks=[math500]", *overrides)
    return eval_run.run(compose_config("eval_run", list(overrides)), list(overrides))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- asft_repro.jsonl -------------------------------------------------------------------------------------

def test_jsonl_drops_torn_last_line_and_truncates(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b": [1, 2\n')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert str(path) in caplog.text and "not valid JSON" in caplog.text
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    append_jsonl(path, [{"a": 3}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_jsonl_drops_unterminated_last_line(tmp_path, caplog):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')  # valid JSON, but the write may have been cut before its end
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path) == [{"a": 1}]
    assert str(path) in caplog.text and "no trailing newline" in caplog.text
    append_jsonl(path, [{"a": 2}])
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'  # never glued onto a previous line


def test_jsonl_broken_middle_line_is_an_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(JsonlError, match=f"{path}:2: not valid JSON"):
        read_jsonl(path)
    assert path.read_text() == '{"a": 1}\n{"a": \n{"a": 3}\n'  # left untouched
    assert read_jsonl(tmp_path / "missing.jsonl") == []


# --- defect 1: every checkpoint folder is called final/ --------------------------------------------------

def perturbed_copy(src: str, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for weights in dst.glob("*.safetensors"):
        tensors = load_file(weights)
        torch.manual_seed(0)
        save_file({k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in tensors.items()},
                  weights, metadata={"format": "pt"})
    return dst


def test_checkpoints_named_final_are_scored_apart(tmp_path, demo_data, tiny_model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = Path(shutil.copytree(tiny_model_path, tmp_path / "exp" / "run_a" / "final"))
    second = perturbed_copy(tiny_model_path, tmp_path / "exp" / "run_b" / "final")
    m_first = score(demo_data, f"model_path={first}")
    m_second = score(demo_data, f"model_path={second}")
    for model, metrics in ((first, m_first), (second, m_second)):
        folder = model.parent / "eval" / "final" / metrics["settings_hash"]
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["model_path"] == str(model)
        assert saved["settings"]["model"] == model_fingerprint(str(model))  # the one fingerprint every cache uses
        assert json.loads((folder / "settings.json").read_text()) == saved["settings"]
        assert len(records(folder / "math500.jsonl")) == 3
    assert m_first["settings_hash"] != m_second["settings_hash"]
    assert m_first["settings"]["model"]["weights"] != m_second["settings"]["model"]["weights"]
    assert not (tmp_path / "outputs").exists()
    assert eval_run.default_eval_root("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B") == Path("outputs/eval/Qwen__Qwen2.5-7B")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        eval_run.resolve_model(str(tmp_path / "exp" / "run_c" / "final"))


# --- defect 2: records reused across sampling settings ---------------------------------------------------

def test_changed_settings_get_a_new_subfolder(tmp_path, demo_data, tiny_model_path):
    out = f"out_dir={tmp_path / 'ev'}"
    base = score(demo_data, out)
    base_file = tmp_path / "ev" / base["settings_hash"] / "math500.jsonl"
    before = base_file.read_text()
    assert [len(r["outputs"]) for r in records(base_file)] == [1, 1, 1]
    again = score(demo_data, out)  # same settings: same folder, records reused, nothing appended
    assert again["settings_hash"] == base["settings_hash"] and base_file.read_text() == before

    sampled = score(demo_data, out, "eval.n_samples=2", "eval.temperature=0.8")
    sampled_file = tmp_path / "ev" / sampled["settings_hash"] / "math500.jsonl"
    assert [len(r["outputs"]) for r in records(sampled_file)] == [2, 2, 2]
    assert sampled["benchmarks"]["math500"]["num_samples"] == 6
    assert sampled["settings"]["n_samples"] == 2 and sampled["settings"]["temperature"] == 0.8

    shorter = score(demo_data, out, "eval.max_new_tokens=2")
    chat = score(demo_data, out, "eval.template=chat")
    assert chat["settings"]["template"] == "chat" and base["settings"]["template"] == "alpaca"
    hashes = {m["settings_hash"] for m in (base, sampled, shorter, chat)}
    assert len(hashes) == 4
    assert {p.name for p in (tmp_path / "ev").iterdir()} == hashes
    for metrics in (base, sampled, shorter, chat):
        assert len(records(tmp_path / "ev" / metrics["settings_hash"] / "math500.jsonl")) == 3
    assert base_file.read_text() == before  # older settings' records untouched


# --- defect 3: torn / unterminated last line on resume ---------------------------------------------------

def test_resume_redoes_a_torn_or_unterminated_last_line(tmp_path, demo_data, tiny_model_path, caplog):
    out = f"out_dir={tmp_path / 'ev'}"
    first = score(demo_data, out)
    path = tmp_path / "ev" / first["settings_hash"] / "math500.jsonl"
    lines = path.read_text().splitlines(keepends=True)

    path.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # killed mid-write
    with caplog.at_level(logging.WARNING):
        torn = score(demo_data, out)
    assert str(path) in caplog.text
    assert records(path) == records_from(lines) and torn["benchmarks"] == first["benchmarks"]

    caplog.clear()
    path.write_text(lines[0] + lines[1].rstrip("\n"))  # two records kept, the second without its newline
    with caplog.at_level(logging.WARNING):
        unterminated = score(demo_data, out)
    assert str(path) in caplog.text and "no trailing newline" in caplog.text
    assert path.read_text().endswith("\n") and records(path) == records_from(lines)
    assert unterminated["benchmarks"] == first["benchmarks"]


def records_from(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


def test_resume_stops_on_a_broken_middle_line(tmp_path, demo_data, tiny_model_path):
    out = f"out_dir={tmp_path / 'ev'}"
    first = score(demo_data, out)
    path = tmp_path / "ev" / first["settings_hash"] / "math500.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"id": \n' + lines[2])
    with pytest.raises(JsonlError, match=f"{path}:2: not valid JSON"):
        score(demo_data, out)


# --- defect 4: bad eval values fail at config time, one line ---------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("eval.template=foo", "eval.template='foo' is invalid; use alpaca, alpaca_newline, chat or null"),
    ("eval.limit=0", "eval.limit=0 is invalid; set 1 or more, or null"),
    ("eval.batch_size=0", "eval.batch_size=0 is invalid; set it to 1 or more"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 is invalid; set it to 1 or more"),
    ("eval.temperature=-0.5", "eval.temperature=-0.5 is invalid; set 0 (greedy) or more"),
    ("eval.top_p=0", "eval.top_p=0.0 is invalid; set it in (0, 1]"),
    ("eval.top_p=1.5", "eval.top_p=1.5 is invalid; set it in (0, 1]"),
])
def test_bad_eval_values_fail_with_one_line(override, message):
    for config in ("config", "eval_run"):
        with pytest.raises(ConfigError) as err:
            OmegaConf.to_object(compose_config(config, [override]))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_eval_run_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_in_process("eval.run", ["eval.limit=0"], monkeypatch, capsys)
    assert code != 0
    assert err.strip().splitlines()[-1] == "eval.run: eval.limit=0 is invalid; set 1 or more, or null to score every item"
    code, err, _ = run_in_process("eval.run", [f"run_dir={tmp_path / 'nope'}"], monkeypatch, capsys)
    assert code != 0
    assert err.strip().splitlines()[-1].startswith(f"eval.run: run_dir={tmp_path / 'nope'}: no such directory")


# --- eval.run run_dir=... ---------------------------------------------------------------------------------

def make_run_dir(root: Path, demo_data: Path, model_path: str, **record) -> Path:
    """A finished run's folder as the trainer leaves it: config.yaml (resolved) and run.json."""
    run_dir = root / "demo" / "tiny-run"
    run_dir.mkdir(parents=True)
    cfg = compose_config("config", ["experiment=demo", f"data.data_dir={demo_data}", "train.report_to=[wandb]",
                                    f"eval.benchmarks_dir={demo_data}/benchmarks", "eval.limit=3",
                                    "eval.max_new_tokens=8", f"output_dir={run_dir}"])
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "run.json").write_text(json.dumps({"train_status": "complete", "model_path": model_path, **record}))
    return run_dir


def test_run_dir_scores_the_runs_model_and_logs_wandb_offline(tmp_path, demo_data, tiny_model_path, monkeypatch, capsys):
    """In this process: the same main() that training's child ``python -m eval.run run_dir=...`` runs (that child
    path is tests/test_pipeline.py's sweep)."""
    run_dir = make_run_dir(tmp_path, demo_data, tiny_model_path, wandb_id="evalcache-test-1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, err, _ = run_in_process("eval.run", [f"run_dir={run_dir}", "eval.max_new_tokens=6"], monkeypatch, capsys)
    assert code == 0, err[-2000:]
    (metrics_file,) = run_dir.glob("eval/*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics_file.parent.name == metrics["settings_hash"]
    assert metrics["model_path"] == tiny_model_path
    assert set(metrics["benchmarks"]) == {"math500", "minerva", "olympiadbench", "aime24", "amc23"}
    assert metrics["settings"]["max_new_tokens"] == 6 and metrics["settings"]["limit"] == 3  # override wins
    # the offline run (same id as training's) holds the summary records; wandb 0.31 keeps them in its .wandb log
    (log,) = run_dir.glob("wandb/offline-run-*-evalcache-test-1/run-evalcache-test-1.wandb")
    logged = log.read_bytes()
    for key in ("eval/math500", "eval/amc23", "eval/Math Avg", "eval/settings_hash"):
        assert key.encode() in logged, key
    assert json.dumps(metrics["settings_hash"]).encode() in logged
    assert b"eval/Medical Avg" not in logged  # no medical benchmark scored: no average logged


def test_run_dir_errors(tmp_path, demo_data, tiny_model_path):
    run_dir = make_run_dir(tmp_path, demo_data, tiny_model_path)
    with pytest.raises(ConfigError, match="data.size=10k: run_dir=... scores the run as it was configured"):
        eval_run.run(compose_config("eval_run", [f"run_dir={run_dir}", "data.size=10k"]), [f"run_dir={run_dir}", "data.size=10k"])
    (run_dir / "run.json").write_text(json.dumps({"train_status": "running"}))
    with pytest.raises(ConfigError, match="has no model_path"):
        eval_run.run(compose_config("eval_run", [f"run_dir={run_dir}"]), [f"run_dir={run_dir}"])
    (run_dir / "run.json").unlink()
    with pytest.raises(FileNotFoundError, match="run.json not found"):
        eval_run.run(compose_config("eval_run", [f"run_dir={run_dir}"]), [f"run_dir={run_dir}"])
