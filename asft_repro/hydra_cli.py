"""The error policy of asft_repro/cli.py for the Hydra entry points (train, anchor, eval.run, data_prep).

Each wraps its task with :func:`hydra_task`: a :class:`~asft_repro.errors.ProjectError` becomes :class:`JobFailed`,
a Hydra "compact" exception: Hydra prints its one line and exits 1. In a sweep (``-m``) the failure stays inside
Hydra's job handling, so the remaining jobs still run; at the end the sweep exits 1 with one line naming every
failed job. When Hydra cannot compose the command line's overrides, :func:`run_cli` names the problem (a misspelt
key, an unknown config group, bad override syntax) in one line too, instead of Hydra's report.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

from asft_repro.config import ConfigError, register_configs
from asft_repro.errors import ProjectError
from asft_repro.paths import CONF_DIR

log = logging.getLogger(__name__)


class JobFailed(CompactHydraException):
    """A Hydra job's project error; Hydra prints ``str()`` of it as is (one line) and exits 1.

    In a sweep run in this process, every failed job of the sweep is listed, whichever one Hydra raises.
    """

    def __init__(self, line: str, failures: list[str] | None = None) -> None:
        super().__init__(line)
        self.line, self.failures = line, failures

    def __str__(self) -> str:
        if not self.failures:
            return self.line
        program = self.line.split(":", 1)[0]
        return (f"{program}: {len(self.failures)} job(s) of the sweep failed (the others ran): "
                + " | ".join(self.failures) + "; fix them and rerun the sweep (finished jobs are reused with "
                "train.resume=true)")


_SWEEP_FAILURES: list[str] = []  # this process's failed sweep jobs, in order
_TASKS_STARTED: list[str] = []  # the programs whose task function this process has entered (run_cli resets it)


def hydra_task(program: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorate a Hydra task function so that a ProjectError ends the job as one line (see the module docstring)."""

    def wrap(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(fn)
        def task(cfg: Any) -> Any:
            _TASKS_STARTED.append(program)
            try:
                return fn(cfg)
            except ProjectError as err:
                line = f"{program}: {err}"
                hydra = HydraConfig.get() if HydraConfig.initialized() else None
                if hydra is None or hydra.mode != RunMode.MULTIRUN:
                    raise JobFailed(line) from None
                overrides = " ".join(hydra.overrides.task)
                log.error("job %s (%s) failed: %s", hydra.job.num, overrides, line)
                _SWEEP_FAILURES.append(f"job {hydra.job.num} ({overrides}): {err}")
                raise JobFailed(line, _SWEEP_FAILURES) from None
        return task
    return wrap


def override_problem(config_name: str, argv: list[str]) -> str | None:
    """The one-line problem with ``argv``'s overrides for ``config_name``, or None if they compose."""
    if any(arg.startswith("-") for arg in argv):
        return None  # --help, -m (sweeps), --cfg ...: Hydra's own flags, left to Hydra
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra")]
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except ConfigError:
        return None  # a bad value: the program reports it in its own words
    except Exception as err:  # noqa: BLE001 - Hydra / OmegaConf composition errors of every kind
        text = f"{err} {err.__cause__ or ''}"
        unknown = re.search(r"Could not override '([^']+)'|Key '([^']+)' not in '(\w+)'", text)
        if unknown and ("not in struct" in text or "not in '" in text):
            key = unknown.group(1) or f"{unknown.group(3)}.{unknown.group(2)}"
            return f"unknown key '{key}'; check the spelling (the same command with --cfg job lists every key)"
        group = re.search(r"Could not find '([^']+)'", text)
        if group:
            folder = Path(CONF_DIR) / Path(group.group(1)).parent
            options = sorted(p.stem for p in folder.glob("*.yaml"))
            return f"no config '{group.group(1)}'; choose one of {', '.join(options)} (files in {folder})"
        lines = [line.strip() for line in str(err).splitlines() if line.strip() and not line.strip().startswith("See ")]
        return (f"bad override ({': '.join(lines)[:300]}); write key=value, lists as key=[a,b] "
                f"(https://hydra.cc/docs/advanced/override_grammar/basic)")
    return None


def run_cli(program: str, config_name: str, hydra_main: Callable[[], None]) -> None:
    """Hand over to the ``@hydra.main`` function; a failed job, or overrides that do not compose, end as one line.

    ``HYDRA_FULL_ERROR=1`` makes Hydra re-raise a job's exception instead of printing it with a hint after it:
    :class:`JobFailed` is then printed here as the last line. An exception before the task started is Hydra's
    composition of the command line (nothing written yet): :func:`override_problem` names it, composing the overrides
    again only then. Any other exception keeps its whole traceback.
    """
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _TASKS_STARTED.clear()
    try:
        hydra_main()
    except JobFailed as failed:
        sys.exit(str(failed))
    except Exception:
        problem = None if _TASKS_STARTED else override_problem(config_name, sys.argv[1:])
        if problem:
            sys.exit(f"{program}: {problem}")
        raise


def process_main(main: Callable[[], None]) -> None:
    """``python -m`` of a training or evaluation entry point: ``main()`` after freezing what the imports created.
    Those objects live as long as the process, so the collector's full passes (the Trainer runs one per train(),
    evaluation one per closed model) need not walk them again, ~0.3 s each. Only at process start: called later,
    it would also keep the garbage of earlier work alive for good. Unfrozen at exit, and in any forked child (vLLM's
    engine process), so that interpreter shutdown frees them as extension modules expect (triton's nanobind reports
    frozen ones as leaks on stderr, after the one-line error)."""
    gc.freeze()
    os.register_at_fork(after_in_child=gc.unfreeze)
    try:
        main()
    finally:
        gc.unfreeze()
