"""Errors a user must fix (bad params, bad or missing data, a failed gate): not worth a retry.

`UserError` is the one base class that decides both what the CLI does (one clear line, exit code 2) and what
the Prefect flow does (no retry). A missing file is one too: FileNotFoundError, raised by the loaders and
stages for inputs that are not there yet. This module imports nothing, so any layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """Fix the params or the data, then run again: exit code 2, and no Prefect retry."""


# What the CLI reports as one line with exit code 2, and the flow does not retry.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
