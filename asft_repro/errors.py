"""The project's error base: what an entry point reports as one line (``module: what; fix``) with a non-zero exit.

Every error type the project raises for bad input, a refused run directory, a broken cache or a failed
engine derives from :class:`ProjectError` (besides its usual built-in base, e.g. ``ValueError``), so the
entry points catch exactly these and let any other exception keep its traceback.
"""

from __future__ import annotations


class ProjectError(Exception):
    """An error whose message is complete in one line: what is wrong and how to fix it."""


class MissingInputError(ProjectError, FileNotFoundError):
    """A file or folder the user named (or that a previous step should have written) does not exist."""
