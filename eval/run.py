"""python -m eval.run model_path=PATH [benchmarks=[math500,aime24]] [eval=default] [out_dir=DIR]

Scores a base model or a checkpoint without training (Hydra; same eval/ config group).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from asft_repro.config import ConfigError, register_configs
from eval.runner import evaluate

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()


@hydra.main(config_path=CONF_DIR, config_name="eval_run", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run_cfg = OmegaConf.to_object(cfg)
        model_path = run_cfg.model_path or run_cfg.model.path
        if model_path == "tiny":
            from asft_repro.tiny_model import ensure_tiny_model

            model_path = str(ensure_tiny_model())
        out = Path(run_cfg.out_dir or Path("outputs") / "eval" / Path(model_path).name)
        evaluate(run_cfg, model_path, out, run_cfg.benchmarks)
    except (ConfigError, FileNotFoundError, ValueError, ImportError, ConnectionError) as err:
        sys.exit(f"eval.run: {err}")


if __name__ == "__main__":
    main()
