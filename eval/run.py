"""Score a model without training (Hydra; the same eval/ config group as training).

    python -m eval.run model_path=PATH [benchmarks=[math500,aime24]] [eval=paper_sampling] [eval.KEY=VALUE] [out_dir=DIR]
    python -m eval.run run_dir=DIR [eval.KEY=VALUE ...]

Every result lands in a ``<settings_hash>/`` subfolder (settings.json, <benchmark>.jsonl, metrics.json;
see eval/runner.py), so other sampling settings or another model never reuse these records. The folder
above it is:

* ``out_dir=DIR``: DIR.
* ``run_dir=DIR``: DIR/eval. Scores a training run's model in a fresh process: DIR/config.yaml (the run's
  resolved config) gives the settings, DIR/run.json's ``model_path`` the model; ``eval=GROUP``,
  ``eval.KEY=VALUE`` and ``benchmarks=[...]`` given here win over the saved values (other overrides are
  refused: they would not describe the run). If run.json has ``wandb_id`` and the run reported to wandb,
  the scores go into that wandb run's summary (``eval/<benchmark>``, ``eval/Math Avg``); offline unless
  WANDB_MODE says otherwise.
* ``model_path=PATH``, a local folder: ``<PATH's parent>/eval/<PATH's name>``, next to the checkpoint, so
  each checkpoint gets its own folder even though every run calls its model ``final/``
  (outputs/exp/run/final -> outputs/exp/run/eval/final/<hash>/; outputs/exp/run/checkpoint-500 ->
  outputs/exp/run/eval/checkpoint-500/<hash>/).
* a hub id: ``outputs/eval/<id with / replaced by __>``; the tiny model (the default): ``outputs/eval/tiny``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from asft_repro.hydra_cli import hydra_task, process_main, run_cli
from asft_repro.config import Config, ConfigError, EvalRunConfig, register_configs
from asft_repro.errors import MissingInputError
from asft_repro.paths import CONF_DIR
from asft_repro.rundir import final_problem, redo_final_command
from asft_repro.tiny_model import ensure_tiny_model
from asft_repro.weights import structure_problem
from eval.runner import evaluate

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
RUN_DIR_KEYS = ("run_dir", "benchmarks", "out_dir")  # top-level keys a run_dir invocation may set


register_configs()


def resolve_model(model_arg: str) -> str:
    """``tiny`` -> the cached tiny model; a local folder or hub id as is; a missing local path fails clearly."""
    if model_arg == "tiny":
        return str(ensure_tiny_model())
    if not Path(model_arg).is_dir() and (Path(model_arg).exists() or not HUB_ID.fullmatch(model_arg)):
        raise MissingInputError(f"model_path={model_arg}: no such model folder; pass a checkpoint folder "
                                f"(e.g. outputs/<experiment>/<run>/final) or a hub id (org/name)")
    return model_arg


def default_eval_root(model_arg: str, model_path: str) -> Path:
    """Where ``model_path=...`` results go without out_dir (see the module docstring)."""
    if model_arg == "tiny":
        return Path("outputs") / "eval" / "tiny"
    path = Path(model_path)
    if path.is_dir():
        return path.resolve().parent / "eval" / path.name
    return Path("outputs") / "eval" / model_path.replace("/", "__")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def eval_keys_overridden(task_overrides: list[str]) -> set[str]:
    """The eval.* keys the command line sets (an ``eval=GROUP`` choice sets the keys of that file).

    Anything but eval.*, eval=GROUP and RUN_DIR_KEYS is refused: a run_dir is scored as it was configured.
    """
    keys: set[str] = set()
    for override in OverridesParser.create().parse_overrides(list(task_overrides)):
        name = override.key_or_group
        if name in RUN_DIR_KEYS:
            continue
        if name == "eval" and override.package is None:
            group = Path(CONF_DIR) / "eval" / f"{override.value()}.yaml"
            keys |= set(OmegaConf.load(group)) if group.exists() else set()
        elif name.startswith("eval."):
            keys.add(name.split(".")[1])
        else:
            raise ConfigError(f"{override.input_line}: run_dir=... scores the run as it was configured; "
                              f"only eval=GROUP, eval.KEY=VALUE, benchmarks=[...] and out_dir= may be given")
    return keys


def load_run(run_dir: Path, cfg: DictConfig, task_overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """The run's saved config (with this command line's eval overrides applied) and its run.json."""
    if not run_dir.is_dir():
        raise MissingInputError(f"run_dir={run_dir}: no such directory; pass a training run's folder "
                                f"(outputs/<experiment>/<run>)")
    config_file, record_file = run_dir / "config.yaml", run_dir / "run.json"
    for path in (config_file, record_file):
        if not path.is_file():
            raise MissingInputError(f"{path} not found; run_dir must be a folder written by python -m asft_repro.train "
                                    f"(it saves config.yaml and run.json)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_file))
    except Exception as err:  # omegaconf raises several types for a schema mismatch
        raise ConfigError(f"{config_file} does not fit the current config schema ({_first_line(err)}); "
                          f"re-run training or fix the file") from None
    for key in eval_keys_overridden(task_overrides):
        merged.eval[key] = cfg.eval[key]
    try:
        record = json.loads(record_file.read_text())
    except ValueError as err:
        raise ConfigError(f"{record_file}: not valid JSON ({err}); restore it or re-run training") from None
    if not record.get("model_path"):
        raise ConfigError(f"{record_file} has no model_path (training not finished?); finish it with "
                          f"train.resume=true, or score a checkpoint with model_path=PATH")
    return OmegaConf.to_object(merged), record


def wandb_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """``eval/<benchmark>`` accuracies and ``eval/<domain Avg>`` averages (None left out)."""
    summary = {f"eval/{name}": score["accuracy"] for name, score in metrics["benchmarks"].items()
               if score.get("accuracy") is not None}
    summary.update({f"eval/{label}": value for label, value in metrics["averages"].items() if value is not None})
    summary["eval/settings_hash"] = metrics["settings_hash"]
    return summary


def log_to_wandb(cfg: Config, run_dir: Path, wandb_id: str, metrics: dict[str, Any]) -> None:
    """Write the scores into the training run's wandb summary; offline unless WANDB_MODE says otherwise."""
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("disabled" if cfg.wandb.mode == "disabled" else "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(id=wandb_id, resume="allow", project=cfg.wandb.project, entity=cfg.wandb.entity,
                     group=cfg.experiment_name, name=cfg.run_name, dir=str(run_dir), mode=mode)
    for key, value in wandb_summary(metrics).items():
        run.summary[key] = value
    wandb.finish()


def check_weights(model_path: str, record: dict[str, Any] | None = None) -> None:
    """ConfigError (one line, naming the file) for a model folder whose weights differ from run.json's
    ``final_files`` (sizes and sha256s; a training run) or are torn (any local folder); nothing for a hub id."""
    folder = Path(model_path)
    if not folder.is_dir():
        return
    problem = final_problem(folder, record) if record else None
    if problem:
        raise ConfigError(f"{problem}, so it is not scored; re-save it with `{redo_final_command(record)}` "
                          f"(or retrain)")
    problem = structure_problem(folder)
    if problem:
        raise ConfigError(f"{problem}: it cannot be scored; re-save the model or pass another model_path")


def run(cfg: DictConfig, task_overrides: list[str]) -> dict[str, Any]:
    """What ``main`` does, given the composed config and the command line's overrides; returns metrics."""
    cli: EvalRunConfig = OmegaConf.to_object(cfg)
    if cli.run_dir:
        if cli.model_path:
            raise ConfigError("give model_path=... or run_dir=..., not both (run_dir scores the model in its run.json)")
        run_dir = Path(cli.run_dir)
        run_cfg, record = load_run(run_dir, cfg, task_overrides)
        model_path = resolve_model(record["model_path"])
        check_weights(model_path, record)
        metrics = evaluate(run_cfg, model_path, Path(cli.out_dir) if cli.out_dir else run_dir / "eval",
                           cli.benchmarks or run_cfg.eval.benchmarks)
        if record.get("wandb_id") and "wandb" in run_cfg.train.report_to:
            log_to_wandb(run_cfg, run_dir, record["wandb_id"], metrics)
        return metrics
    model_arg = cli.model_path or cli.model.path
    model_path = resolve_model(model_arg)
    check_weights(model_path)
    root = Path(cli.out_dir) if cli.out_dir else default_eval_root(model_arg, model_path)
    return evaluate(cli, model_path, root, cli.benchmarks)


@hydra.main(config_path=CONF_DIR, config_name="eval_run", version_base="1.3")
@hydra_task("eval.run")
def _main(cfg: DictConfig) -> None:
    run(cfg, list(HydraConfig.get().overrides.task))


def main() -> None:
    run_cli("eval.run", "eval_run", _main)


if __name__ == "__main__":
    process_main(main)
