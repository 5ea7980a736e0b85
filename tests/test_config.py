"""Configs: paper cells compose, typos and bad values fail with one clear line."""

import pytest
from omegaconf import OmegaConf

from asft_repro.config import ConfigError
from asft_repro.identity import base_name, config_hash, swept_values, training_identity
from conftest import compose_config


def test_paper_cells_compose():
    cfg = OmegaConf.to_object(compose_config("config", ["experiment=math_asft_10k"]))
    assert (cfg.model.path, cfg.data.name, cfg.data.size, cfg.method.name) == ("Qwen/Qwen2.5-7B", "numina_cot", "10k", "asft")
    assert cfg.method.kl_coef == 0.05 and cfg.method.kl_direction == "forward"
    assert (cfg.train.learning_rate, cfg.train.global_batch_size, cfg.train.num_epochs) == (5e-5, 256, 1)
    assert cfg.data.template == "alpaca" and cfg.experiment_name == "table1_math"
    assert cfg.output_dir.startswith("outputs/table1_math/qwen2.5-7b-numina_cot-10k-asft-kl0.05-s42-")
    assert cfg.train.strategy == "fsdp2" and cfg.train.resolved_precision(cfg.model.dtype) == "bf16-mixed"
    assert cfg.train.save_strategy == "steps" and cfg.train.gradient_checkpointing
    med = OmegaConf.to_object(compose_config("config", ["experiment=medical_dft_30k"]))
    assert (med.model.path, med.train.learning_rate, med.train.num_epochs, med.data.max_length) == ("meta-llama/Llama-2-7b-hf", 2e-5, 3, 512)
    rev = OmegaConf.to_object(compose_config("config", ["experiment=ablation_kl_direction", "method.kl_direction=reverse"]))
    assert "asft-kl0.05-reverse-s42-" in rev.run_name


def test_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "asft_repro.launcher.SlurmLauncher" and cfg.hydra.launcher.gpus_per_node == 8
    assert cfg.hydra.launcher.tasks_per_node == 8  # one rank per GPU by default


def test_slurm_launcher_refuses_one_task_for_eight_gpus():
    from asft_repro.launcher import SlurmLauncher

    with pytest.raises(ConfigError, match="tasks_per_node=1 but gpus_per_node=8"):
        SlurmLauncher(gpus_per_node=8, tasks_per_node=1, submitit_folder="x")
    SlurmLauncher(gpus_per_node=8, tasks_per_node=8, submitit_folder="x")  # the valid layout builds


def test_typo_in_key_fails_at_composition():
    with pytest.raises(Exception, match="lerning_rate"):
        compose_config("config", ["train.lerning_rate=1e-4"])


def test_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="kl_coef"):
        compose_config("config", ["method.kl_coef=lots"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("method.kl_coef=-0.1", "kl_coef=-0.1 is invalid; set it to 0 or more"),
        ("method.name=ppo", "method.name='ppo'"),
        ("method.kl_direction=sideways", "forward or reverse"),
        ("data.template=vicuna", "data.template"),
        ("train.global_batch_size=10", "multiple of"),
        ("eval.backend=tgi", "eval.backend"),
        ("train.per_device_batch_size=0", "per_device_batch_size=0 is invalid; set it to 1 or more"),
        ("train.save_strategy=bogus", "train.save_strategy='bogus'"),
        ("train.optim=bogus", "train.optim='bogus'"),
        ("train.lr_scheduler=bogus", "train.lr_scheduler='bogus'"),
        ("train.num_epochs=0", "nothing to train"),
        ("train.strategy=dp", "train.strategy='dp'"),
        ("train.precision=fp8", "train.precision='fp8'"),
        ("method.kl_schedule=exponential", "method.kl_schedule='exponential' is not known"),
        ("method.kl_schedule=adaptive method.kl_target=0", r"kl_target=0.0 is invalid .*set a positive KL"),
        ("method.kl_schedule=adaptive method.kl_target=-0.1", r"kl_target=-0.1 is invalid .*set a positive KL"),
        ("method.kl_schedule=adaptive", r"kl_target=null is invalid .*set the KL to hold"),
        ("method.kl_schedule=adaptive method.kl_target=0.1 method.kl_horizon=0", "kl_horizon=0.0 is invalid; set a positive"),
        ("method.kl_schedule=adaptive method.kl_target=0.1 method.kl_horizon=-5", "kl_horizon=-5.0 is invalid"),
        ("method.kl_schedule=adaptive method.kl_target=0.1 method.kl_coef_min=0.1", "the adaptive start must lie in the bounds"),
        ("method.kl_schedule=adaptive method.kl_target=0.1 method.kl_coef_max=0.01", "the adaptive start must lie in the bounds"),
        ("method.kl_coef_end=0.01", r"kl_coef_end=0.01 is invalid with method.kl_schedule=constant; drop it"),
        ("method.kl_schedule=linear", r"kl_coef_end=null is invalid with method.kl_schedule=linear"),
        ("method.kl_schedule=cosine method.kl_coef_end=-1", r"kl_coef_end=-1.0 is invalid .*set it to 0 or more"),
        ("method.kl_target=0.1", r"kl_target=0.1 is invalid with method.kl_schedule=constant; drop it"),
        ("method.kl_warmup_steps=5", r"is invalid with method.kl_schedule=constant; drop it"),
        ("method.kl_schedule=linear method.kl_coef_end=0 method.kl_warmup_steps=5 method.kl_warmup_ratio=0.1",
         "set only one of them"),
        ("method=dft method.kl_schedule=linear method.kl_coef_end=0.1", r"kl_schedule=linear is invalid with method.name=dft"),
    ],
)
def test_bad_values_fail_with_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        OmegaConf.to_object(compose_config("config", override.split()))
    assert "\n" not in str(err.value)


def test_run_name_tags():
    cell = {"model": {"name": "tiny"}, "data": {"name": "medmcqa", "size": "10k", "domain": "medical"},
            "train": {"seed": 1}, "method": {"name": "sft", "kl_coef": 0.05, "kl_direction": "forward"}}
    assert base_name(cell) == "tiny-medmcqa-10k-sft-s1"
    cell["method"] = {"name": "sft_kl", "kl_coef": 0.1, "kl_direction": "reverse"}
    assert base_name(cell) == "tiny-medmcqa-10k-sft_kl-kl0.1-reverse-s1"
    cell["method"] = {"name": "base", "kl_coef": 0.05, "kl_direction": "forward"}
    assert base_name(cell) == "tiny-medical-base"


def identity_of(*overrides):
    return training_identity(compose_config("config", ["experiment=ablation_lr_batch", *overrides]))


def test_ablation_cells_get_their_own_identity_and_name():
    low, high = identity_of("train.learning_rate=5e-6"), identity_of("train.learning_rate=2e-4")
    assert config_hash(low) != config_hash(high)  # the old run_name gave both one directory
    assert swept_values(["train.learning_rate=5e-6", "method=asft", "eval.limit=3"], low) == ["learning_rate_5e-06"]
    assert swept_values(["train=paper_math"], low) == ["train_paper_math"]


def test_identity_ignores_what_does_not_change_the_model():
    same = {config_hash(identity_of(*o)) for o in ([], ["train.per_device_batch_size=8"], ["eval.limit=3"],
                                                   ["train.report_to=[]"], ["data.data_dir=/elsewhere"],
                                                   ["train.strategy=ddp"], ["train.resume=true"])}
    assert len(same) == 1
    dft = {config_hash(identity_of("method=dft", f"method.kl_coef={c}")) for c in (0.05, 0.2)}
    assert len(dft) == 1  # lambda means nothing to DFT
    base = {config_hash(identity_of("method=base", f"train.learning_rate={lr}")) for lr in (1e-5, 1e-4)}
    assert len(base) == 1  # a Base row is the model alone
