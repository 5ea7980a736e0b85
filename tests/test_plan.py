"""The memory / cost plan: every job of a sweep, named as the launch names it, memory by the documented formula."""

from __future__ import annotations

import pytest

from asft_repro.plan import Hardware, main, plan

PAPER_MATH = ["experiment=table1_math", "method=sft,dft,asft", "data.size=10k,30k,100k"]


def test_paper_grid_is_listed_and_fits_80gb():
    table = plan(PAPER_MATH, Hardware())
    assert len(table) == 9 and table["run_dir"].is_unique
    assert set(table["status"]) == {"new"} and set(table["strategy"]) == {"fsdp2"} and (table["fits"] == "yes").all()
    assert table.set_index("run_dir")["steps"].filter(like="-10k-").tolist() == [40, 40, 40]  # ceil(10000 / 256)
    assert table["run_dir"].str.startswith("outputs/table1_math/qwen2.5-7b-numina_cot-").all()


def test_memory_follows_the_documented_formula():
    row = plan(["experiment=math_asft_10k"], Hardware()).iloc[0]
    p, w, b, t, h, layers, v = 7.62e9, 8, 4, 2048, 3584, 28, 152064
    expected = {
        # in bf16: FSDP2's root unit (embedding + untied head), 2 layers of policy and base, the base's head (fused head)
        "policy+optim_GB": 16 * p / w, "base_GB": 2 * p / w,
        "gathered_GB": 2 * (2 * v * h + 2 * 2 * (p - 2 * v * h) / layers + v * h),
        "activations_GB": layers * b * t * h * 2 + 17 * b * t * h * 2,
        "head_GB": 4 * 4 * 110 * v + 4 * v * h,  # the fused head: 4 fp32 chunk buffers of 110 rows, fp32 head gradient
    }
    for key, value in expected.items():
        assert row[key] == pytest.approx(value / 1e9, abs=0.06), key
    assert row["mem_GB"] == pytest.approx(sum(expected.values()) / 1e9 + 2 * 1024 ** 3 / 1e9, abs=0.2)


def test_logits_path_counts_full_logits():
    row = plan(["experiment=math_asft_10k", "train.fused_head=false"], Hardware()).iloc[0]
    assert row["head_GB"] == pytest.approx(4 * 2048 * 152064 * (2 + 4 + 4 + 2) / 1e9, abs=0.06)


def test_over_budget_job_is_flagged_with_a_nonzero_exit(capsys):
    table = plan(["experiment=medical_asft_10k", "train.strategy=ddp"], Hardware())
    assert table.iloc[0]["fits"].startswith("NO") and table.iloc[0]["mem_GB"] > 80
    with pytest.raises(SystemExit, match="1 job\\(s\\) exceed 80 GB per GPU.*train.strategy=fsdp2"):
        main(["experiment=medical_asft_10k", "train.strategy=ddp"])
    assert "NO: over budget" in capsys.readouterr().out


def test_slurm_launcher_sets_the_world_size():
    row = plan(["experiment=math_asft_10k", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.nodes=2"], Hardware(gpus=1)).iloc[0]
    assert row["ranks"] == 8


def test_detectable_effects_from_prepared_files_or_published_sizes(tmp_path, capsys):
    """The plan prints benchmark -> items -> MDE: prepared files counted (a group's members pooled), else published."""
    import math

    from asft_repro.plan import detectable_effects

    for member, rows in [("medqa", 40), *((f"mmlu_{s}", 5) for s in ("anatomy", "clinical_knowledge", "college_biology",
                                                                      "college_medicine", "medical_genetics",
                                                                      "professional_medicine"))]:
        (tmp_path / member).mkdir()
        (tmp_path / member / "test.jsonl").write_text('{"id": 1}\n' * rows)
    table = plan(["experiment=demo", "data=demo_medical", "method=asft", f"eval.benchmarks_dir={tmp_path}"], Hardware())
    evals = [{**ev, "tables_dir": str(tmp_path / "tables")} for ev in table.attrs["evals"]]  # no earlier tables run
    effects = detectable_effects(evals).set_index("benchmark")
    assert effects.loc["medqa", "n_items"] == 40 and effects.loc["medqa", "items from"] == "prepared file"
    assert effects.loc["mmlu_medical", "n_items"] == 30 and effects.loc["medmcqa", "n_items"] == 4183
    assert effects.loc["medmcqa", "items from"] == "published"
    z = 1.959963984540054 + 0.8416212335729143
    assert effects.loc["medqa", "MDE_points"] == pytest.approx(100 * z * math.sqrt(0.25 / 40))
    assert effects.loc["Medical Avg", "MDE_points"] == pytest.approx(100 * z * math.sqrt(0.25 * (1 / 30 + 1 / 40 + 1 / 4183)) / 3)
    (tmp_path / "tables").mkdir()  # an earlier `tables` run measured medqa's discordance: it is used
    (tmp_path / "tables" / "comparisons.csv").write_text("benchmark,metric,discordance\nmedqa,acc,0.5\nmedqa,mean_acc,0.1\n")
    measured = detectable_effects(evals).set_index("benchmark")
    assert measured.loc["medqa", "discordance"] == 0.5 and measured.loc["medmcqa", "discordance"] == 0.25
    main(["experiment=table1_math", "method=sft", "data.size=10k", "--discordance", "0.2"])
    out = capsys.readouterr().out
    assert "Smallest paired difference" in out and "| math     | aime24" in out and "26.2" in out  # 2.80^2 / 30 > 2.80 * sqrt(.2 / 30)


def test_lora_and_qlora_memory_follow_the_documented_formula():
    """peft=lora / qlora on one GPU: a frozen bf16 (or NF4) base, fp32 adapters with AdamW, no base copy."""
    from asft_repro.plan import NF4_BYTES

    p, b, t, h, layers, v, inter, kv, r = 7.62e9, 4, 2048, 3584, 28, 152064, 18944, 512, 8
    adapters = r * layers * (2 * h + 2 * h + 2 * (h + kv) + 3 * (h + inter))  # q, o, k, v, gate, up, down
    assert adapters == pytest.approx(20.19e6, rel=1e-3)  # peft's own count for Qwen2.5-7B at r=8 (print_trainable_parameters)
    full = plan(["experiment=lora_math", "method=asft", "peft=none", "train.strategy=ddp"], Hardware(gpus=1)).iloc[0]
    row = plan(["experiment=lora_math", "method=asft"], Hardware(gpus=1, gpu_mem_gb=24)).iloc[0]
    assert row["policy+optim_GB"] == pytest.approx((2 * p + 16 * adapters) / 1e9, abs=0.06)
    assert row["base_GB"] == 0 and row["gathered_GB"] == 0 and full["base_GB"] > 15  # the anchor is not a second copy
    assert row["activations_GB"] == pytest.approx((layers * b * t * h * 2 + 17 * b * t * h * 2) / 1e9, abs=0.06)
    assert row["head_GB"] == pytest.approx(4 * 4 * 110 * v / 1e9, abs=0.06)  # chunks only: the head is frozen
    assert row["fits"] == "yes" and row["mem_GB"] < 24 < full["mem_GB"]
    q = plan(["experiment=lora_math", "method=asft", "peft=qlora"], Hardware(gpus=1, gpu_mem_gb=24)).iloc[0]
    root = 2 * v * h
    assert q["policy+optim_GB"] == pytest.approx((NF4_BYTES * (p - root) + 4 * root + 16 * adapters) / 1e9, abs=0.06)
    assert q["mem_GB"] < row["mem_GB"] - 6
    assert "-asft-kl0.03-lora_r8-s42-" in row["run_dir"] and "-qlora_r8-" in q["run_dir"]


def test_plan_counts_real_token_lengths_padded_and_padding_free(demo_data, capsys):
    """With prepared data and its tokenizer at hand, tokens (and GPU-hours) come from the records' real lengths."""
    job = ["experiment=math_asft_10k", f"data.data_dir={demo_data}", "data.size=64", "model.path=tiny"]
    slow = Hardware(tflops=1e-9)  # the tiny model: GPU-hours large enough to compare after rounding
    padded, packed = (plan([*job, f"train.padding_free={on}"], slow).iloc[0] for on in ("false", "true"))
    from asft_repro.data import load_train_dataset
    from asft_repro.modeling import load_tokenizer, resolve_path
    from conftest import compose_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(compose_config("config", job))
    lengths = [len(r) for r in load_train_dataset(cfg.data, load_tokenizer(resolve_path(cfg.model)))["input_ids"]]
    epochs = padded["steps"] * cfg.train.global_batch_size // len(lengths)  # 3 steps of 256 = 12 passes over 64 records
    assert padded["tokens_from"] == "data" and padded["tokens_padding_free"] == epochs * sum(lengths)
    assert sum(lengths) * epochs < padded["tokens_padded"] <= padded["steps"] * cfg.train.global_batch_size * max(lengths)
    assert (padded["tokens"], packed["tokens"]) == (padded["tokens_padded"], padded["tokens_padding_free"])
    assert packed["GPU_h"] / padded["GPU_h"] == pytest.approx(packed["tokens"] / padded["tokens"], rel=0.02)
    main([*job, "train.padding_free=true"])
    assert "tokens: real token lengths of the prepared data (data); padded" in capsys.readouterr().out


def test_plan_without_data_bounds_tokens_by_max_length(capsys):
    row = plan(["experiment=math_asft_10k", "data.data_dir=/nonexistent"], Hardware()).iloc[0]
    assert row["tokens_from"] == "max_length" and row["tokens"] == row["steps"] * 256 * 2048
    main(["experiment=math_asft_10k", "data.data_dir=/nonexistent"])
    assert "records x data.max_length" in capsys.readouterr().out
