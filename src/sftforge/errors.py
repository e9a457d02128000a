"""The exceptions sftforge raises on purpose, so that a caller can tell them from bugs.

Each message says what was expected, what was found, where (file:line, record, config key)
and what to do. The command line turns them into one paragraph and an exit code:
InputError 2 (the input must change), RunFailed 1, RunInterrupted 128 + the signal.
"""

from __future__ import annotations


class SftforgeError(Exception):
    """Any error sftforge raises on purpose."""


class InputError(SftforgeError, ValueError):
    """A config, data file, template, model folder or option that cannot be used as given."""


class MissingFileError(InputError, FileNotFoundError):
    """A file or folder named in the input that is not there."""


class RunFailed(SftforgeError, RuntimeError):
    """A run that started and could not go on (a non-finite loss, a broken invariant)."""


class RunInterrupted(SftforgeError, RuntimeError):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint (resume=auto goes on)."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number
