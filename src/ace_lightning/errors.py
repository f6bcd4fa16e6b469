"""The user errors: what a command line reports in one line with exit code 2.

Everything else (KeyError, TypeError, a ValueError raised by a library, ...) is a bug and keeps
its traceback. Each class also derives from the builtin a caller would expect, so
``except ValueError`` keeps working for code that validated before these classes existed.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Any, Callable, Iterable, NoReturn


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
    msg = str(err).strip().splitlines()[0].strip() if str(err).strip() else type(err).__name__
    # a message that is one quoted string (KeyError's str) loses its quotes; quotes inside a
    # message ("got 'FOO'") are the message's own
    if len(msg) >= 2 and msg[0] == msg[-1] and msg[0] in "'\"" and msg[0] not in msg[1:-1]:
        msg = msg[1:-1]
    return msg


def fail(message: str) -> NoReturn:
    """``error: <message>`` on stderr and exit code 2: how every command reports a user error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def fail_on(err: BaseException) -> NoReturn:
    fail(error_line(err))


class CommandParser(argparse.ArgumentParser):
    """The command line of the small commands (``python -m ace_lightning.pipeline``, ``... .summary``;
    ace-train and ace-certify are Hydra's): ``--help`` opens with what the command does, and a bad
    argument is one ``error:`` line with exit code 2, as every user error."""

    def __init__(self, module: str, description: str) -> None:
        super().__init__(prog=f"python -m {module}", description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def did_you_mean(key: str, known: Iterable[Any], prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest>'?)`` for the known name closest to ``key`` (difflib), or ''."""
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


# -- Hydra's own errors (a bad override, an unknown config option) as one line ----------------------

_WRAPPED = "ACE_HYDRA_ERRORS"  # set while hydra_entry runs (inherited by the processes a job starts)


def hydra_error_line(err: BaseException) -> str:
    """One line for an error Hydra raised while composing the config: an unknown key (a stage's
    knob named with its closest known one), an unknown option of a config group, a bad override."""
    from omegaconf import OmegaConf

    cause = err.__cause__
    parent, full_key = getattr(cause, "parent_node", None), getattr(cause, "full_key", None)
    if parent is not None and full_key and getattr(cause, "key", None) is not None and OmegaConf.is_dict(parent):
        key, known = str(cause.key), [str(k) for k in parent.keys()]
        inner = str(full_key)[:-len(key)]  # "stage.attack." for stage.attack.stepz
        if inner.startswith("stage."):
            root = parent._get_root()
            stage = OmegaConf.select(root, "stage.name", default=None, throw_on_missing=False)
            sub = inner[len("stage."):]
            return f"unknown knob '{sub}{key}' for stage '{stage}'{did_you_mean(key, known, sub)}"
        hint = did_you_mean(key, known, inner)
        if not hint:  # Hydra's own advice: the + form that adds a key
            plus = re.search(r"use (\+\S+)", str(err))
            hint = f" (to add it: {plus.group(1)})" if plus else ""
        return f"unknown key '{full_key}'{hint}"
    if type(err).__name__ == "OverrideParseException":
        first, _, rest = str(err).partition("\n")
        url = re.search(r"https://\S+", rest)
        return f"cannot parse an override: {' '.join(first.split())}" + (f" (grammar: {url.group(0)})" if url else "")
    text = str(err).split("Config search path:")[0]
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    options = re.findall(r"^\t(\S+)$", text, re.M)
    if missing and options:
        group, choice = missing.groups()
        return (f"unknown {group} '{choice}'{did_you_mean(choice, options)}; known: {', '.join(options)}")
    return " ".join(text.split())


def hydra_entry(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point with Hydra's own errors (a key the config does not have,
    an unknown option such as ``data=cifar``, an override it cannot parse) reported like the
    user errors: one ``error: ...`` line, exit code 2. ``HYDRA_FULL_ERROR=1`` keeps Hydra's report."""
    from hydra.errors import HydraException

    if os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(_WRAPPED):
        hydra_main()
        return
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _WRAPPED)}
    os.environ.update({"HYDRA_FULL_ERROR": "1", _WRAPPED: "1"})  # Hydra raises instead of printing
    try:
        hydra_main()
    except HydraException as err:
        if os.environ.get("ACE_TRACEBACK"):
            raise
        fail(hydra_error_line(err))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
