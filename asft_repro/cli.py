"""One error policy for every entry point: the project's errors end as one ``module: what; fix`` line and a
non-zero exit; any other exception keeps its traceback.

* argparse entry points (tables, plots, plan, bench, report) use this module's :class:`OneLineParser`,
  :func:`cli_error` and :func:`exit_on_error`. It imports neither torch nor transformers, so the commands that only
  read results start in about a second.
* Hydra entry points (train, anchor, eval.run, data_prep) use asft_repro/hydra_cli.py, the same policy for Hydra
  jobs and sweeps.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Iterator, NoReturn

from asft_repro.errors import ProjectError


def cli_error(program: str, what: str, fix: str) -> SystemExit:
    """The one-line error of the argparse CLIs: ``program: what; fix`` and exit status 1 (raise it)."""
    return SystemExit(f"{program}: {what}; {fix}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``module: what; fix`` line (``prog`` is the module name)."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"{self.prog}: {message}; run `python -m {self.prog} --help` for the options")


def setup_logging() -> None:
    """For argparse entry points: INFO lines to stderr as ``[module] message`` (Hydra apps get Hydra's logging)."""
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")


@contextlib.contextmanager
def exit_on_error(program: str) -> Iterator[None]:
    """For argparse entry points: a ProjectError inside becomes ``program: message`` and exit status 1."""
    try:
        yield
    except ProjectError as err:
        sys.exit(f"{program}: {err}")
