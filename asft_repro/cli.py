"""Hydra command lines that fail in one line: overrides are composed once up front, so a misspelt key,
an unknown config group or bad override syntax reads ``module: what; fix`` instead of Hydra's report."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn


CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def override_problem(config_name: str, argv: list[str]) -> str | None:
    """The one-line problem with ``argv``'s overrides for ``config_name``, or None if they compose."""
    if any(arg.startswith("-") for arg in argv):
        return None  # --help, -m (sweeps), --cfg ...: Hydra's own flags, left to Hydra
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra")]
    from hydra import compose, initialize_config_dir

    from asft_repro.config import ConfigError, register_configs

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
    """Check the overrides, then hand over to the ``@hydra.main`` function."""
    problem = override_problem(config_name, sys.argv[1:])
    if problem:
        sys.exit(f"{program}: {problem}")
    hydra_main()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``module: what; fix`` line (``prog`` is the module name)."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"{self.prog}: {message}; run `python -m {self.prog} --help` for the options")
