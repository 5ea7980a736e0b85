"""Data prep on fixture files in the hub schemas: determinism, nesting, format, manifests, errors."""

import json

import pytest

from conftest import ROOT, compose_config
from data_prep.__main__ import expand_benchmarks, prepare_benchmark, prepare_training
from data_prep.sources import PrepError
from data_prep.subsets import parse_size

FIXTURES = str(ROOT / "data_prep" / "fixtures")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_subsets_are_nested_deterministic_and_counted(demo_data, tmp_path):
    small = read_jsonl(demo_data / "medmcqa" / "64" / "train.jsonl")
    large = read_jsonl(demo_data / "medmcqa" / "256" / "train.jsonl")
    assert len(small) == 64 and len(large) == 256
    assert small == large[:64]  # nested
    manifest = json.loads((demo_data / "medmcqa" / "256" / "manifest.json").read_text())
    assert manifest["dropped"] == 2 and manifest["valid_records"] == 398
    assert manifest["dropped_by_reason"] == {"answer index out of range": 1, "empty question or option": 1}

    cfg = compose_config("prep", [f"out_dir={tmp_path}", f"local_dir={FIXTURES}", "sizes=[64,256]", "training=[medmcqa]"])
    prepare_training("medmcqa", cfg)
    for size in ("64", "256"):
        assert (tmp_path / "medmcqa" / size / "train.jsonl").read_bytes() == (demo_data / "medmcqa" / size / "train.jsonl").read_bytes()
    cfg_seed = compose_config("prep", [f"out_dir={tmp_path / 'other'}", f"local_dir={FIXTURES}", "sizes=[64]", "seed=1"])
    prepare_training("medmcqa", cfg_seed)
    assert read_jsonl(tmp_path / "other" / "medmcqa" / "64" / "train.jsonl") != small


def test_medmcqa_record_format(demo_data):
    record = read_jsonl(demo_data / "medmcqa" / "64" / "train.jsonl")[0]
    user, assistant = record["messages"]
    assert user["role"] == "user" and user["content"].startswith("Question: ")
    assert "\n\nOptions:\nA. " in user["content"] and "\nD. " in user["content"]
    assert assistant["content"].endswith(".") and "So the answer to this question is " in assistant["content"]
    letter = assistant["content"][-2]
    assert letter in "ABCD"


def test_numina_drops_broken_rows(demo_data):
    manifest = json.loads((demo_data / "numina_cot" / "64" / "manifest.json").read_text())
    assert manifest["dropped"] == 2 and manifest["source"].endswith("numina_cot.jsonl")
    assert len(manifest["sha256"]) == 64


def test_existing_subset_is_reused_and_mismatch_refused(demo_data, tmp_path):
    cfg = compose_config("prep", [f"out_dir={tmp_path}", f"local_dir={FIXTURES}", "sizes=[64]"])
    prepare_training("numina_cot", cfg)
    before = (tmp_path / "numina_cot" / "64" / "train.jsonl").stat().st_mtime_ns
    prepare_training("numina_cot", cfg)  # reused, not rewritten
    assert (tmp_path / "numina_cot" / "64" / "train.jsonl").stat().st_mtime_ns == before
    other = compose_config("prep", [f"out_dir={tmp_path}", f"local_dir={FIXTURES}", "sizes=[64]", "seed=5"])
    with pytest.raises(PrepError, match="differs in: seed"):
        prepare_training("numina_cot", other)
    (tmp_path / "numina_cot" / "64" / "train.jsonl").write_text("tampered\n")
    with pytest.raises(PrepError, match="sha256"):
        prepare_training("numina_cot", cfg)


def test_benchmarks_normalised(demo_data):
    items = read_jsonl(demo_data / "benchmarks" / "medqa" / "test.jsonl")
    assert set(items[0]) == {"id", "benchmark", "prompt", "answer", "choices", "kind"}
    assert items[0]["kind"] == "multiple_choice" and items[0]["answer"] in "ABCD" and len(items[0]["choices"]) == 4
    olympiad = read_jsonl(demo_data / "benchmarks" / "olympiadbench" / "test.jsonl")[0]
    assert olympiad["kind"] == "math" and olympiad["choices"] is None and not olympiad["answer"].startswith("[")
    amc = read_jsonl(demo_data / "benchmarks" / "amc23" / "test.jsonl")[0]
    assert "." not in amc["answer"]  # 12.0 -> "12"
    mmlu = read_jsonl(demo_data / "benchmarks" / "mmlu_anatomy" / "test.jsonl")
    assert mmlu and all(item["benchmark"] == "mmlu_anatomy" for item in mmlu)


def test_no_network_and_no_local_copy_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose_config("prep", [f"out_dir={tmp_path}", "sizes=[64]"])
    with pytest.raises(PrepError, match=r"could not load 'AI-MO/NuminaMath-CoT'.*local_dir=DIR"):
        prepare_training("numina_cot", cfg)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_missing_local_copy_and_unknown_names(tmp_path):
    cfg = compose_config("prep", [f"out_dir={tmp_path}", f"local_dir={tmp_path}", "sizes=[64]"])
    with pytest.raises(PrepError, match="no local copy of 'openlifescienceai/medmcqa'"):
        prepare_training("medmcqa", cfg)
    with pytest.raises(PrepError, match="unknown benchmark 'gsm8k'"):
        expand_benchmarks(["gsm8k"], cfg)
    with pytest.raises(PrepError, match="unknown training set"):
        prepare_training("alpaca", cfg)
    too_big = compose_config("prep", [f"out_dir={tmp_path}", f"local_dir={FIXTURES}", "sizes=[10k]"])
    with pytest.raises(PrepError, match="only 398 are valid"):
        prepare_training("numina_cot", too_big)


def test_released_asft_files_and_sizes(tmp_path):
    cfg = compose_config("prep", [f"out_dir={tmp_path}", f"local_dir={FIXTURES}", "sizes=[16]", "sampling=head"])
    prepare_training("asft_medmcqa", cfg)
    rows = read_jsonl(tmp_path / "asft_medmcqa" / "16" / "train.jsonl")
    assert rows[0]["messages"][1]["content"].endswith("So the answer to this question is " + rows[0]["messages"][1]["content"][-2] + ".")
    assert parse_size("10k") == 10_000 and parse_size("1M") == 1_000_000 and parse_size(256) == 256
    with pytest.raises(PrepError):
        parse_size("ten")
    assert prepare_benchmark  # imported for the session fixture
