"""Configs: paper cells compose, typos and bad values fail with one clear line."""

import pytest
from omegaconf import OmegaConf

from asft_repro.config import ConfigError, run_name
from conftest import compose_config


def test_paper_cells_compose():
    cfg = OmegaConf.to_object(compose_config("config", ["experiment=math_asft_10k"]))
    assert (cfg.model.path, cfg.data.name, cfg.data.size, cfg.method.name) == ("Qwen/Qwen2.5-7B", "numina_cot", "10k", "asft")
    assert cfg.method.kl_coef == 0.05 and cfg.method.kl_direction == "forward"
    assert (cfg.train.learning_rate, cfg.train.global_batch_size, cfg.train.num_epochs) == (5e-5, 256, 1)
    assert cfg.data.template == "alpaca" and cfg.experiment_name == "table1_math"
    assert cfg.output_dir == "outputs/table1_math/qwen2.5-7b-numina_cot-10k-asft-kl0.05-s42"
    med = OmegaConf.to_object(compose_config("config", ["experiment=medical_dft_30k"]))
    assert (med.model.path, med.train.learning_rate, med.train.num_epochs, med.data.max_length) == ("meta-llama/Llama-2-7b-hf", 2e-5, 3, 512)
    rev = OmegaConf.to_object(compose_config("config", ["experiment=ablation_kl_direction", "method.kl_direction=reverse"]))
    assert rev.run_name.endswith("asft-kl0.05-reverse-s42")


def test_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.gpus_per_node == 8


def test_typo_in_key_fails_at_composition():
    with pytest.raises(Exception, match="lerning_rate"):
        compose_config("config", ["train.lerning_rate=1e-4"])


def test_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="kl_coef"):
        compose_config("config", ["method.kl_coef=lots"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("method.kl_coef=-0.1", "kl_coef=-0.1: must be >= 0"),
        ("method.name=ppo", "method.name='ppo'"),
        ("method.kl_direction=sideways", "forward or reverse"),
        ("data.template=vicuna", "data.template"),
        ("train.global_batch_size=10", "multiple of"),
        ("eval.backend=tgi", "eval.backend"),
    ],
)
def test_bad_values_fail_with_one_line(override, match):
    with pytest.raises(ConfigError, match=match):
        OmegaConf.to_object(compose_config("config", [override]))


def test_run_name_tags():
    assert run_name("tiny", "medmcqa", "10k", "sft", 0.05, "forward", 1) == "tiny-medmcqa-10k-sft-s1"
    assert run_name("tiny", "medmcqa", "10k", "sft_kl", 0.1, "reverse", 1) == "tiny-medmcqa-10k-sft_kl-kl0.1-reverse-s1"
