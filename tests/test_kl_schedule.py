"""λ schedules (method.kl_schedule): values per step, the adaptive controller, its state across a kill and a resume,
2 ranks = 1 process, the run identity, tables, plots and the demo's check."""

from __future__ import annotations

import json
import logging
import math
import shutil
from types import SimpleNamespace

import pytest
import yaml
from matplotlib.image import imread
from omegaconf import OmegaConf
from safetensors.torch import load_file

from asft_repro.identity import base_name, config_hash, swept_values, training_identity
from asft_repro.kl_controller import KLController
from asft_repro.kl_schedule import SCHEDULE_KEYS, adaptive_coef, schedule_label, scheduled_coef
from asft_repro.plots import write_plots
from asft_repro.schedule_demo import kl_hold
from asft_repro.tables import write_tables
from asft_repro.train import run
from asft_repro.wandb_setup import run_tags
from conftest import compose_config
from kl_ranks import feed
from test_tables import make_run

ARGS = SimpleNamespace(device="cpu")  # what on_step_end reads of the TrainingArguments


# ---- values per step, by hand --------------------------------------------------------------------

def test_linear_and_cosine_decay_per_step():
    linear = [scheduled_coef("linear", 0.05, 0.005, k, 5) for k in range(5)]
    assert linear == pytest.approx([0.05, 0.03875, 0.0275, 0.01625, 0.005], abs=1e-15)  # (0.005-0.05)/4 per step
    cosine = [scheduled_coef("cosine", 0.05, 0.005, k, 5) for k in range(5)]
    half_cos = (1 - math.cos(math.pi / 4)) / 2  # 0.1464...
    assert cosine == pytest.approx([0.05, 0.05 - 0.045 * half_cos, 0.0275, 0.005 + 0.045 * half_cos, 0.005], abs=1e-15)
    assert [scheduled_coef("constant", 0.05, None, k, 5) for k in range(5)] == [0.05] * 5


def test_warmup_ramps_from_zero_then_decays():
    warm = [scheduled_coef("linear", 0.05, 0.005, k, 6, warmup=2) for k in range(6)]
    assert warm == pytest.approx([0.0, 0.025, 0.05, 0.035, 0.02, 0.005], abs=1e-15)  # decay over steps 2..5
    by_ratio = KLController("linear", 0.05, 0.005, kl_warmup_ratio=0.25)  # ceil(0.25 * 6) = 2 steps
    assert [by_ratio.coef_at(k, 6) for k in range(6)] == pytest.approx(warm, abs=1e-15)


def test_adaptive_update_by_hand():
    assert adaptive_coef(0.1, 0.21, 0.2, 10, 1e-4, 10) == pytest.approx(0.1 * (1 + 0.05 / 10))  # inside the clip
    assert adaptive_coef(0.1, 0.50, 0.2, 10, 1e-4, 10) == pytest.approx(0.1 * 1.02)  # +150% clipped to +20%
    assert adaptive_coef(0.1, 0.0, 0.2, 4, 1e-4, 10) == pytest.approx(0.1 * 0.95)  # -100% clipped to -20%, horizon 4
    assert adaptive_coef(0.0999, 9.0, 0.2, 1, 1e-4, 0.1) == 0.1  # held at kl_coef_max
    assert adaptive_coef(0.011, 0.0, 0.2, 1, 0.01, 10) == 0.01  # held at kl_coef_min


def test_controller_uses_the_token_mean_of_the_whole_accumulated_step():
    controller = KLController("adaptive", 0.1, kl_target=0.2, kl_horizon=10)
    # step 0: micro-batches with KL means 0.1 (30 tokens) and 0.35 (10 tokens): token mean 0.1625, not 0.225
    used = feed(controller, [[(3.0, 30.0), (3.5, 10.0)], [(0.0, 5.0)], [(21.0, 100.0)]])
    lam1 = 0.1 * (1 + (0.1625 - 0.2) / 0.2 / 10)
    lam2 = lam1 * (1 - 0.2 / 10)
    assert used == pytest.approx([0.1, lam1, lam2], rel=1e-12)
    assert controller.coef == pytest.approx(lam2 * (1 + 0.05 / 10), rel=1e-12)  # step 2: KL 0.21


def test_reverse_direction_steers_on_kl_reverse():
    controller = KLController("adaptive", 0.1, kl_target=0.2, kl_horizon=10, kl_direction="reverse")
    controller.add({"kl_forward_sum": 100.0, "kl_reverse_sum": 2.1, "num_tokens": 10.0}, 0.1)
    controller.on_step_end(ARGS, None, None)
    assert controller.coef == pytest.approx(0.1 * (1 + 0.05 / 10))


def test_state_round_trips_through_trainer_state_json():
    controller = KLController("adaptive", 0.1, kl_target=0.2, kl_horizon=10)
    feed(controller, [[(0.0, 10.0)]] * 3)
    saved = json.loads(json.dumps({"KLController": controller.state()}))  # as trainer_state.json holds it
    fresh = KLController("adaptive", 0.1, kl_target=0.2, kl_horizon=10)
    fresh.on_train_begin(ARGS, SimpleNamespace(stateful_callbacks=saved), None)
    assert fresh.coef == controller.coef == pytest.approx(0.1 * 0.98 ** 3)
    rebuilt = KLController.from_state(saved["KLController"])  # transformers' own restore path builds it from args
    assert rebuilt.coef == controller.coef and rebuilt.settings == controller.settings


# ---- config, identity, run name -------------------------------------------------------------------

def test_constant_schedule_keeps_every_existing_hash_and_name():
    for overrides in (["experiment=math_asft_10k"], ["experiment=demo", "method=sft"], ["experiment=demo", "method=sft_kl"]):
        cfg = compose_config("config", overrides)
        old = OmegaConf.to_container(cfg, resolve=True)
        for key in SCHEDULE_KEYS:
            del old["method"][key]  # the config as it was before schedules existed
        assert training_identity(cfg) == training_identity(old)
        assert config_hash(training_identity(cfg)) == config_hash(training_identity(old))
        assert "klsched" not in cfg.run_name


def test_schedules_are_named_and_hashed_by_what_they_use():
    def ident(*o):
        return training_identity(compose_config("config", ["experiment=demo", *o]))

    adaptive = ident("method.kl_schedule=adaptive", "method.kl_target=0.3")
    assert {k for k in adaptive if k.startswith("method.kl_")} == {
        "method.kl_coef", "method.kl_direction", "method.kl_schedule", "method.kl_target", "method.kl_horizon",
        "method.kl_coef_min", "method.kl_coef_max"}
    linear = ident("method.kl_schedule=linear", "method.kl_coef_end=0.005")
    assert "method.kl_target" not in linear and linear["method.kl_coef_end"] == 0.005
    hashes = {config_hash(i) for i in (adaptive, linear, ident(), ident("method.kl_schedule=adaptive", "method.kl_target=0.1"),
                                       ident("method.kl_schedule=adaptive", "method.kl_target=0.3", "method.kl_horizon=20"),
                                       ident("method.kl_schedule=cosine", "method.kl_coef_end=0.005"))}
    assert len(hashes) == 6
    cfg = OmegaConf.to_container(compose_config("config", ["experiment=demo", "method.kl_schedule=adaptive",
                                                           "method.kl_target=0.5"]), resolve=True)
    assert base_name(cfg) == "tiny-numina_cot-256-asft-kl0.05-klsched_adaptive-t0.5-s42"
    longer = ident("method.kl_schedule=adaptive", "method.kl_target=0.5", "method.kl_horizon=20")
    assert swept_values(["method.kl_schedule=adaptive", "method.kl_target=0.5", "method.kl_horizon=20"],
                        longer) == ["kl_horizon_20.0"]  # schedule and target are spelt by the base name


def test_every_schedule_setting_is_a_wandb_tag_and_label():
    cfg = OmegaConf.to_object(compose_config("config", ["method.kl_schedule=cosine", "method.kl_coef_end=0.01",
                                                        "method.kl_warmup_steps=5"]))
    assert "lambda_schedule:cosine" in run_tags(cfg)
    assert schedule_label(vars(cfg.method)) == "cosine to 0.01 warmup 5"
    assert schedule_label({"kl_schedule": "adaptive", "kl_target": 0.3, "kl_horizon": 10.0}) == "adaptive KL=0.3 h=10"
    assert schedule_label({"name": "asft"}) == ""


# ---- training: λ logged and exact, resume after a kill ---------------------------------------------

def sched_cfg(out, demo_data, *overrides):
    return compose_config("config", [
        "experiment=demo", f"data.data_dir={demo_data}", f"output_dir={out}", "train.report_to=[]", "data.size=64",
        "method=asft", "eval.after_train=false", "train.global_batch_size=8", "train.per_device_batch_size=4",
        "train.save_strategy=steps", "train.save_steps=2", "train.max_steps=6", "train.save_total_limit=null",
        "method.kl_coef=0.5", *overrides])


ADAPTIVE = ("method.kl_schedule=adaptive", "method.kl_target=0.02", "method.kl_horizon=2")


def train_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"ce"' in line]


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory, demo_data, tiny_model_path):
    out = tmp_path_factory.mktemp("sched") / "adaptive"
    run(sched_cfg(out, demo_data, *ADAPTIVE))
    return out


@pytest.mark.slow
def test_adaptive_lambda_follows_each_steps_logged_kl(adaptive_run):
    rows = train_rows(adaptive_run)  # 2 micro-batches per optimizer step, logged every step
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[0]["kl_coef"] == 0.5
    for prev, row in zip(rows, rows[1:]):  # λ of step k+1 = one update from λ and the token-mean KL of step k
        assert row["kl_coef"] == pytest.approx(adaptive_coef(prev["kl_coef"], prev["kl_forward"], 0.02, 2, 1e-4, 10), rel=1e-6)
    assert len({r["kl_coef"] for r in rows}) == 6
    saved = json.loads((adaptive_run / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["KLController"]["attributes"]["coef"] == pytest.approx(
        adaptive_coef(rows[3]["kl_coef"], rows[3]["kl_forward"], 0.02, 2, 1e-4, 10), rel=1e-6)


@pytest.mark.slow
def test_resume_after_a_kill_continues_the_same_lambda_path(tmp_path, demo_data, adaptive_run):
    out = tmp_path / "adaptive"
    shutil.copytree(adaptive_run, out)
    shutil.rmtree(out / "final")
    for later in ("checkpoint-4", "checkpoint-6"):  # killed after step 5: only checkpoint-2 survives
        shutil.rmtree(out / later)
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "train_status": "running"}))
    run(sched_cfg(out, demo_data, *ADAPTIVE, "train.resume=true"))
    resumed, reference = train_rows(out), train_rows(adaptive_run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(resumed[2:], reference[2:]):  # steps 3-6 re-run with the λ restored from checkpoint-2
        assert a["kl_coef"] == pytest.approx(b["kl_coef"], rel=1e-6, abs=1e-6)
        for key in ("loss", "kl_forward"):  # logged rounded to 6 decimals
            assert a[key] == pytest.approx(b[key], abs=2e-6)
    final, ref = load_file(str(out / "final" / "model.safetensors")), load_file(str(adaptive_run / "final" / "model.safetensors"))
    assert max((final[k] - ref[k]).abs().max().item() for k in ref) < 1e-6


@pytest.mark.slow
def test_linear_schedule_logs_the_lambda_of_each_step(tmp_path, demo_data, tiny_model_path, caplog):
    with caplog.at_level(logging.INFO, logger="asft_repro.train"):
        run(sched_cfg(tmp_path / "linear", demo_data, "method.kl_schedule=linear", "method.kl_coef_end=0.1",
                      "train.max_steps=4", "train.save_strategy=no", "train.global_batch_size=4"))
    rows = train_rows(tmp_path / "linear")
    assert [r["kl_coef"] for r in rows] == pytest.approx([0.5, 0.5 - 0.4 / 3, 0.5 - 0.8 / 3, 0.1], rel=1e-12)
    assert "λ 0.3667" in caplog.text  # the console line shows λ


# ---- tables, plots, the demo's check --------------------------------------------------------------

def scheduled_run(root, name, schedule: dict, **kwargs):
    run = make_run(root, name, method="asft", **kwargs)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["method"].update(schedule)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_tables_separate_and_label_schedules(tmp_path):
    make_run(tmp_path, "sft", method="sft", score=5.0)
    make_run(tmp_path, "asft", method="asft", score=10.0)
    scheduled_run(tmp_path, "lin", {"kl_schedule": "linear", "kl_coef_end": 0.005}, score=11.0)
    for seed in (1, 2):
        scheduled_run(tmp_path, f"ad{seed}", {"kl_schedule": "adaptive", "kl_target": 0.1, "kl_horizon": 10.0}, seed=seed,
                      score=12.0)
    tables = write_tables(tmp_path, tmp_path / "tables", "exp", use_wandb=False)
    assert list(tables["table1_math_exp_qwen2.5-7b"].frame.index) == ["10k SFT", "10k ASFT"]  # constant λ only
    assert "ablation_lambda_math_exp_qwen2.5-7b" not in tables  # a schedule is not a λ ablation
    sched = tables["ablation_lambda_schedule_math_exp_qwen2.5-7b"].frame
    assert list(sched.index) == ["10k ASFT λ=0.05 forward", "10k ASFT λ=0.05 forward adaptive KL=0.1 h=10",
                                 "10k ASFT λ=0.05 forward linear to 0.005"]
    assert sched["n_runs"].tolist() == [1, 2, 1] and sched["Math Avg"].tolist() == [10.0, 12.0, 11.0]
    assert not math.isnan(sched["paper Math Avg"].iloc[0]) and sched["paper Math Avg"].iloc[1:].isna().all()


def test_plots_add_a_lambda_panel_when_lambda_varies(tmp_path):
    rows = [{"step": s, "kl_forward": 0.1 * s, "ce": 2.0, "loss": 1.0, "dft_weight_ess": 0.5, "kl_coef": 0.05 * 0.98 ** s}
            for s in range(1, 6)]
    run = scheduled_run(tmp_path, "ad", {"kl_schedule": "adaptive", "kl_target": 0.1, "kl_horizon": 10.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (wide,) = write_plots(tmp_path, tmp_path / "plots", "exp")
    (run / "metrics.jsonl").write_text("".join(json.dumps({**r, "kl_coef": 0.05}) + "\n" for r in rows))
    (narrow,) = write_plots(tmp_path, tmp_path / "plots2", "exp")
    assert imread(wide).shape[1] == round(4.2 * 5 * 110) and imread(narrow).shape[1] == round(4.2 * 4 * 110)


def test_demo_check_on_synthetic_rows():
    rows = [{"step": s, "kl_forward": kl, "kl_coef": lam} for s, kl, lam in
            [(1, 0.0, 0.5), (2, 0.9, 0.4), (3, 0.5, 0.45), (4, 0.3, 0.5), (5, 0.33, 0.52), (6, 0.27, 0.51)]]
    rows.insert(3, {"step": 3, "train_runtime": 1.0})  # non-training rows are ignored
    hold = kl_hold("run", rows, target=0.3)
    assert hold.mean_kl == pytest.approx(0.3) and hold.steps == 6 and hold.holds and hold.lambda_moved  # steps 4-6
    assert (hold.lambda_first, hold.lambda_last, hold.lambda_low, hold.lambda_high) == (0.5, 0.51, 0.4, 0.52)
    assert not kl_hold("run", rows, target=0.2).holds  # 0.3 = 1.5 x target
    assert kl_hold("run", rows, target=0.26).holds and not kl_hold("run", rows, target=0.24).holds  # 1.15x, 1.25x
    assert not kl_hold("run", [{**r, "kl_coef": 0.5} for r in rows if "kl_forward" in r], target=0.3).lambda_moved
