"""The user errors: what a command line reports in one line with exit code 2.

Everything else (KeyError, TypeError, a ValueError raised by a library, ...) is a bug and keeps
its traceback. Each class also derives from the builtin a caller would expect, so
``except ValueError`` keeps working for code that validated before these classes existed.
"""
from __future__ import annotations

import os
import sys


class ACEError(Exception):
    """Base of every user error: bad configuration, missing inputs, missing data."""

    def __str__(self) -> str:  # always one line, whatever the builtin base would print
        return " ".join(str(self.args[0]).split()) if self.args else type(self).__name__


class ConfigError(ACEError, ValueError):
    """A configured value is invalid (unknown method, a radius outside (0, 1], ...)."""


class StageInputError(ACEError, ValueError):
    """A stage's input in the run folder is missing or inconsistent (run the earlier stage first)."""


class InputNotFoundError(ACEError, FileNotFoundError):
    """A file the user named (weights, records, labels) does not exist."""


class DatasetNotFoundError(ACEError, FileNotFoundError):
    """Dataset files are missing, incomplete or malformed; the message says where and what to do."""



class SoundnessError(RuntimeError):
    """An attack broke an input the bounds certified: a bug in a bound, never a user error."""


USER_ERRORS = (ACEError,)


def error_line(err: BaseException) -> str:
    """The first line of a user error's message (ACE_TRACEBACK=1: re-raise it, for debugging)."""
    if os.environ.get("ACE_TRACEBACK"):
        raise err
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return msg.strip("'\"")


def fail(message: str) -> None:
    """``error: <message>`` on stderr and exit code 2: how every command reports a user error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fail_on(err: BaseException) -> None:
    fail(error_line(err))
