"""``train.strategy=fsdp2`` for real on 2 CPU gloo ranks (issue 17): equal to one process with the same global
batch, per-rank sharded checkpoints, one Hugging Face final/, SIGKILL after a checkpoint then resume; ``ddp`` ranks
against one process; the memory plan against a measured fsdp2 run.

Two torchrun launches in all (every launch costs each rank seconds of imports). The first runs tests/fsdp2_launch.py,
several jobs in one launch: memcheck's quick config (first, over a fresh process), the units of tests/rank_units.py,
ASFT with the fused head (checkpoints every 2 steps), ASFT on the logits path, ASFT from the cached anchor, SFT with
KL logging, ASFT with peft=lora, fused ASFT and LoRA ASFT again on DDP ranks, the fused (fsdp2) and cached-anchor
(ddp) runs again on padding-free packed rows (train.padding_free), the logits run resumed from a copy killed after its
last checkpoint (final/ not yet published), and last a copy of the fused run SIGKILLed right after its step-2
checkpoint. The second is ``torchrun -m asft_repro.train ... train.resume=true`` itself (the one end-to-end test of
the torchrun CLI): it resumes the killed run. The one-process references run in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from asft_repro.gpu_check import kill_tree
from asft_repro.memcheck import LAUNCH_ENV, QUICK, job_spec, table_row
from asft_repro.rundir import RunDirError, checkpoint_problem, last_complete_checkpoint
import kl_ranks
from conftest import ROOT, compose_config

K = 128
STEPS = 4
COMMON = ["experiment=demo", "data.size=64", f"train.max_steps={STEPS}", "train.global_batch_size=16",
          "train.per_device_batch_size=8", "train.report_to=[]", "eval.after_train=false", "train.padding_free=false"]
CHECKPOINTS = ["train.save_strategy=steps", "train.save_steps=2", "train.save_total_limit=2"]
VARIANTS = {
    "asft_fused": ["method=asft", *CHECKPOINTS],
    "asft_logits": ["method=asft", "train.fused_head=false", "train.save_strategy=steps", "train.save_steps=4"],
    "asft_cache": ["method=asft", "method.anchor=cache", f"method.anchor_k={K}", "train.save_strategy=no"],
    "sft_log_kl": ["method=sft", "train.log_kl=true", "train.save_strategy=no"],
    # peft=lora (issue 20): the anchor is the adapter-off pass of the sharded model itself
    "asft_lora": ["method=asft", "peft=lora", "train.learning_rate=5e-3", "train.save_strategy=no"],
}
DDP_VARIANTS = ("asft_fused", "asft_lora")  # also on 2 DDP ranks, in the same launch
KILLED = "asft_killed"  # the fused run again, SIGKILLed after its step-2 checkpoint
# train.padding_free (issue 21): packed rows on 2 ranks, against the padded runs of the same variant
PADDING_FREE = {"asft_fused_packed": ("asft_fused", "fsdp2"), "asft_cache_packed": ("asft_cache", "ddp")}


def overrides(data: Path, out: Path, variant: str, *extra: str) -> list[str]:
    return [*COMMON, f"data.data_dir={data}", *VARIANTS[variant], f"output_dir={out}", *extra]


def torchrun(tmp: Path, script: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 *script`` in ``tmp`` on CPU gloo ranks; all of it killed after 300 s."""
    env = {**os.environ, **LAUNCH_ENV, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]  # a free port
    with subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as launch:
        try:
            out, err = launch.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            kill_tree(launch.pid)  # torchrun and its ranks (each in a session of its own), none left behind
            out, err = launch.communicate()
    return subprocess.CompletedProcess(command, launch.returncode, out, err)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data, tiny_model_path) -> dict:
    """The first launch (see the module docstring) and every variant in one process (in this one)."""
    from asft_repro.anchor import build_anchor_cache
    from asft_repro.train import run

    tmp = tmp_path_factory.mktemp("fsdp2")
    data = tmp / "data"
    shutil.copytree(demo_data / "numina_cot", data / "numina_cot")
    build_anchor_cache(OmegaConf.to_object(compose_config("config", [
        "experiment=demo", f"data.data_dir={data}", "data.size=64", f"method.anchor_k={K}"])))
    memcheck = job_spec(tmp / "memcheck", QUICK[0], "fsdp2", 2)
    jobs = [{"memcheck": memcheck, "result": str(tmp / "memcheck.json")},
            {"units": str(tmp / "units"), "model_dir": tiny_model_path}]
    jobs += [{"overrides": overrides(data, tmp / "fsdp2" / v, v, "train.strategy=fsdp2")} for v in VARIANTS]
    jobs += [{"overrides": overrides(data, tmp / "ddp" / v, v, "train.strategy=ddp")} for v in DDP_VARIANTS]
    jobs += [{"overrides": overrides(data, tmp / "packed" / name, variant, f"train.strategy={strategy}",
                                     "train.padding_free=true")} for name, (variant, strategy) in PADDING_FREE.items()]
    last = tmp / "logits_killed"  # killed after its last checkpoint, before final/: the resume publishes final/
    jobs += [{"killed_copy": str(tmp / "fsdp2" / "asft_logits"), "to": str(last)},
             {"overrides": overrides(data, last, "asft_logits", "train.strategy=fsdp2", "train.resume=true")}]
    jobs.append({"overrides": overrides(data, tmp / KILLED, "asft_fused", "train.strategy=fsdp2"), "kill_after_save": 2})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    done = torchrun(tmp, [str(ROOT / "tests" / "fsdp2_launch.py"), str(tmp / "jobs.json")])
    assert done.returncode != 0 and "Signal 9 (SIGKILL)" in done.stderr, done.stderr[-3000:]  # the last job was killed
    memory = table_row(QUICK[0], "fsdp2", 2, memcheck, json.loads((tmp / "memcheck.json").read_text()))
    with pytest.MonkeyPatch.context() as env:  # what distributed.setup() sets stays in this test
        env.setenv("ACCELERATE_USE_CPU", "true")
        for variant in VARIANTS:  # the reference: 1 process, 2 micro-batches of 8 = the same global batch
            run(compose_config("config", overrides(data, tmp / "single" / variant, variant, "train.save_strategy=no")))
    return {"tmp": tmp, "data": data, "last": last, "memcheck": memory}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_fsdp2_ranks_match_one_process(runs, variant):
    sharded, single = runs["tmp"] / "fsdp2" / variant, runs["tmp"] / "single" / variant
    record = json.loads((sharded / "run.json").read_text())
    assert (record["world_size"], record["strategy"], record["train_status"]) == (2, "fsdp2", "complete")
    assert_same_training(sharded, single)
    if variant != "asft_fused":
        assert rows(sharded)[-1].get("kl_forward", 0) > 0.01  # the KL paths were exercised, not 0 vs 0


def assert_same_training(run: Path, reference: Path) -> None:
    """Every step's loss and metrics, and the final weights, within 1e-5 of ``reference``'s."""
    got, want = rows(run), rows(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # each step once: only rank 0 writes
    for row, ref in zip(got, want):
        assert row.keys() == ref.keys()
        for key in ("loss", "ce", "dft", "kl_forward", "kl_reverse", "dft_weight_ess", "grad_norm"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], abs=1e-5), (row["step"], key)
    assert max_diff(weights(run), weights(reference)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PADDING_FREE))
def test_padding_free_ranks_match_padded_batches(runs, name):
    variant, strategy = PADDING_FREE[name]
    packed = runs["tmp"] / "packed" / name
    record = json.loads((packed / "run.json").read_text())
    assert (record["world_size"], record["strategy"], record["train_status"]) == (2, strategy, "complete")
    assert "train.padding_free" not in json.dumps(record.get("identity", {}))  # the same training identity
    assert_same_training(packed, runs["tmp"] / "fsdp2" / variant)  # 2 ranks, padded
    assert_same_training(packed, runs["tmp"] / "single" / variant)  # 1 process, padded


@pytest.mark.slow
@pytest.mark.parametrize("variant", DDP_VARIANTS)
def test_two_ddp_ranks_match_one_process(runs, variant):
    ddp, single = runs["tmp"] / "ddp" / variant, runs["tmp"] / "single" / variant
    record = json.loads((ddp / "run.json").read_text())
    assert (record["world_size"], record["strategy"], record["train_status"]) == (2, "ddp", "complete")
    got, want = rows(ddp), rows(single)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # each step once: no rank logs twice
    for row, ref in zip(got, want):
        for key in ("loss", "ce", "dft", "kl_forward", "kl_reverse", "dft_weight_ess", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], abs=1e-5), (row["step"], key)
    assert max_diff(weights(ddp), weights(single)) < 1e-5 and got[-1]["kl_forward"] > 0.01
    if variant == "asft_lora":
        adapter = lambda run: load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))  # noqa: E731
        assert max_diff(adapter(ddp), adapter(single)) < 1e-5


@pytest.mark.slow
def test_checkpoints_are_sharded_per_rank_and_final_is_one_hf_folder(runs):
    from transformers import AutoModelForCausalLM

    run = runs["tmp"] / "fsdp2" / "asft_fused"
    checkpoint = run / "checkpoint-2"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: one file per rank
        names = {p.name for p in (checkpoint / folder).iterdir()}
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= names, names
    assert not list(checkpoint.glob("*.safetensors")) and not list(checkpoint.glob("*.bin"))  # nothing gathered
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["ShardLayout"]["args"] == {"strategy": "fsdp2", "world_size": 2, "sharded": True}
    assert checkpoint_problem(checkpoint) is None
    model = AutoModelForCausalLM.from_pretrained(run / "final")  # what eval.run and vLLM load
    final = weights(run)
    assert all(torch.equal(p.detach(), final[n]) for n, p in model.named_parameters() if n in final)
    assert (run / "final" / "tokenizer.json").exists()


@pytest.mark.slow
def test_a_checkpoint_missing_a_rank_shard_is_incomplete(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["tmp"] / "fsdp2" / "asft_fused", run)
    (run / "checkpoint-4" / "optimizer_0" / "__1_0.distcp").unlink()
    assert checkpoint_problem(run / "checkpoint-4") == \
        "optimizer_0/ lacks the shard of rank 1 (__1_0.distcp) of the 2 ranks that saved it"
    (run / "checkpoint-2" / "pytorch_model_fsdp_0" / ".metadata").unlink()
    assert "pytorch_model_fsdp_0/.metadata missing" in checkpoint_problem(run / "checkpoint-2")
    assert last_complete_checkpoint(run) is None  # nothing resumable: both skipped, nothing deleted
    assert (run / "checkpoint-4" / "optimizer_0" / "__0_0.distcp").exists()


@pytest.fixture(scope="module")
def resumed(runs) -> dict:
    """The second launch, ``torchrun -m asft_repro.train`` resuming the SIGKILLed run; before it, the same resume
    in one process (refused: the checkpoint's shards are 2 ranks')."""
    from asft_repro.train import run

    tmp, data = runs["tmp"], runs["data"]
    killed = tmp / KILLED
    before = {"checkpoints": {p.name for p in killed.glob("checkpoint-*")}, "final": (killed / "final").exists(),
              "record": json.loads((killed / "run.json").read_text())}
    resume = overrides(data, killed, "asft_fused", "train.strategy=fsdp2", "train.resume=true")
    with pytest.MonkeyPatch.context() as env, pytest.raises(RunDirError) as refused:
        env.setenv("ACCELERATE_USE_CPU", "true")
        run(compose_config("config", resume))
    after_refusal = {"record": json.loads((killed / "run.json").read_text()), "kept": (killed / "checkpoint-2").is_dir()}
    kept = (killed / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns
    done = torchrun(tmp, ["-m", "asft_repro.train", *resume])
    assert done.returncode == 0, done.stderr[-3000:]
    return {"killed": killed, "before": before, "refused": str(refused.value), "after_refusal": after_refusal,
            "kept_mtime": kept, "console": done.stdout + done.stderr}


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(runs, resumed):
    tmp, killed, before = runs["tmp"], resumed["killed"], resumed["before"]
    assert before["checkpoints"] == {"checkpoint-2"} and not before["final"]
    assert before["record"]["train_status"] == "running"
    # another world size cannot resume a sharded checkpoint: one line naming the original size, nothing touched
    assert re.search("saved by 2 fsdp2 rank.*resume with 2 rank", resumed["refused"])
    assert resumed["after_refusal"] == {"record": before["record"], "kept": True}
    # resumed from checkpoint-2, not restarted from step 0 (which would rewrite it)
    assert (killed / "checkpoint-2" / "trainer_state.json").stat().st_mtime_ns == resumed["kept_mtime"]
    assert (killed / "checkpoint-4" / "optimizer_0" / "__1_0.distcp").exists()
    assert max_diff(weights(killed), weights(tmp / "fsdp2" / "asft_fused")) < 1e-6
    assert [r["step"] for r in rows(killed)] == list(range(1, STEPS + 1))
    assert rows(killed) == rows(tmp / "fsdp2" / "asft_fused")
    assert json.loads((killed / "run.json").read_text())["train_status"] == "complete"
    console = resumed["console"]  # the torchrun CLI: one job on 2 ranks, never DataParallel
    assert "2 ranks x 1 accumulation" in console and "DataParallel" not in console


@pytest.mark.slow
def test_a_run_killed_after_its_last_checkpoint_publishes_final_without_another_step(runs):
    last = runs["last"]
    assert [r["step"] for r in rows(last)] == list(range(1, STEPS + 1))  # no step retrained
    assert max_diff(weights(last), weights(runs["tmp"] / "fsdp2" / "asft_logits")) == 0.0
    assert json.loads((last / "run.json").read_text())["train_status"] == "complete"


def _checkpoint(folder: Path, strategy: str | None, world_size: int = 2, sharded: bool = True) -> Path:
    folder.mkdir(parents=True)
    args = {"strategy": strategy, "world_size": world_size, "sharded": sharded}
    layout = {"ShardLayout": {"args": args}} if strategy else {}
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2, "stateful_callbacks": layout}))
    return folder


def test_a_sharded_checkpoint_resumes_only_on_the_layout_that_saved_it(tmp_path):
    from asft_repro.shards import layout_change

    sharded = _checkpoint(tmp_path / "checkpoint-2", "fsdp2")
    assert layout_change(sharded, "fsdp2", True, 2) is None
    assert layout_change(sharded, "fsdp2", True, 4) == (
        "checkpoint-2 was saved by 2 fsdp2 rank(s) (sharded), this launch has 4 fsdp2 rank(s) (sharded); resume with "
        "2 rank(s) and train.strategy=fsdp2 (torchrun --nproc_per_node 2, or hydra.launcher gpus_per_node x nodes = 2), "
        "or train into a new output_dir")
    assert "this launch has 2 ddp rank(s);" in layout_change(sharded, "ddp", False, 2)
    replicated = _checkpoint(tmp_path / "checkpoint-4", "ddp", sharded=False)
    assert layout_change(replicated, "ddp", False, 8) is None  # DDP checkpoints resume on any world size
    assert "saved by 2 ddp rank(s), this launch has 2 fsdp2 rank(s) (sharded)" in layout_change(replicated, "fsdp2", True, 2)
    old = _checkpoint(tmp_path / "checkpoint-6", None)  # saved before layouts were recorded: read off its files
    assert layout_change(old, "ddp", False, 4) is None
    assert "saved by some ddp rank(s), this launch has 2 fsdp2 rank(s) (sharded)" in layout_change(old, "fsdp2", True, 2)
    (old / "pytorch_model_fsdp_0").mkdir()
    for rank in (0, 1):
        (old / "pytorch_model_fsdp_0" / f"__{rank}_0.distcp").write_bytes(b"x")
    assert layout_change(old, "fsdp2", True, 2) is None and "resume with 2 rank(s)" in layout_change(old, "fsdp2", True, 4)


def test_dcp_shards_of_every_recorded_rank_are_required(tmp_path):
    from asft_repro.shards import dcp_problem

    folder = _checkpoint(tmp_path / "checkpoint-2", "fsdp2", world_size=3)
    assert dcp_problem(folder) == "no pytorch_model_fsdp_0/ (the sharded model)"
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / name).mkdir()
        for file in (".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"):
            (folder / name / file).write_bytes(b"x")
    assert dcp_problem(folder) is None
    (folder / "optimizer_0" / "__2_0.distcp").write_bytes(b"")  # torn: an empty shard counts as missing
    assert dcp_problem(folder) == "optimizer_0/ lacks the shard of rank 2 (__2_0.distcp) of the 3 ranks that saved it"
    assert dcp_problem(_checkpoint(tmp_path / "ddp", "ddp", sharded=False)) is None


@pytest.mark.slow
def test_plan_memory_formula_against_a_measured_fsdp2_run(runs):
    """`python -m asft_repro.memcheck --quick`'s one config, measured by its own ``measure_rank`` on 2 fsdp2 ranks at
    the start of the first launch: peak RSS growth vs the formula (the full table, within 15%, is in docs/scale.md;
    this small model's fixed costs allow a looser bound)."""
    row = runs["memcheck"]
    assert row["device"] == "cpu" and row["plan"]["gathered"] > 0 and row["plan"]["ddp_buckets"] == 0
    assert 0.75 <= row["ratio"] <= 1.35, row


@pytest.fixture(scope="module")
def ranks(runs) -> list[dict]:
    """What tests/rank_units.py wrote on each rank of the first launch."""
    return [json.loads((runs["tmp"] / f"units.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_base_on_two_ranks(ranks):
    for result in (r["base"] for r in ranks):
        assert result["diff"] < 1e-5  # the sharded base computes the same logits
        assert result["all_dtensor"] and result["frozen"] and not result["training"]
        assert result["local"] <= 0.6 * result["total"]  # each rank holds about half of the weights


@pytest.mark.slow
def test_fused_head_under_fsdp2_matches_full_logits(ranks):
    assert all(r["fused"]["worst"] < 1e-5 for r in ranks)


@pytest.mark.slow
def test_adaptive_lambda_on_two_ranks_follows_the_one_process_path(ranks):
    """The all-rank KL reduction (asft_repro.kl_controller.all_rank_sum) on a real 2-process gloo group."""
    one = kl_ranks.adaptive()
    single = [*kl_ranks.feed(one, kl_ranks.STEPS), one.coef]  # one process holding both micro-batches of every step
    for got in (r["kl_controller"] for r in ranks):
        assert got["lambda"] == pytest.approx(single, rel=1e-12) and got["sums"] == [2.0, 1.0]
    assert len(set(single)) == len(single)  # λ moved every step
