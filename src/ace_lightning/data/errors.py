"""The one error a missing or malformed dataset raises.

A subclass of FileNotFoundError so callers (the CLI) can map it to exit code 2 with a single
line: the message names the folder that was searched and how to get the data.
"""
from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """Dataset files are missing, incomplete or malformed; the message says where and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # always one line

    def __str__(self) -> str:  # FileNotFoundError would prefix "[Errno ...]" when given 2 args
        return self.args[0]
