"""What sftforge tells the person running it, and where.

Every message goes through the `sftforge` logger: `say` for what a run is doing (shown when
asked: the command line always asks, the Python API when called with `verbose=True`, or any
logging configuration of the caller's), `warn` for what needs attention (on stderr even
when nobody asked, as Python shows any warning logged without a handler). Progress bars are
tqdm's, which draw in a terminal and as a widget in Jupyter, by the main process only.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from tqdm.auto import tqdm

LOGGER = logging.getLogger("sftforge")


def say(message: str) -> None:
    """A line about what is being done (a run's progress, where a file was written)."""
    LOGGER.info(message)


def warn(message: str) -> None:
    """A line that needs the reader's attention (an unsafe option, a slow fallback)."""
    LOGGER.warning(message)


def is_main_process() -> bool:
    """Rank 0 under torchrun (which sets RANK), or a process alone."""
    return os.environ.get("RANK", "0") == "0"


class _Console(logging.Handler):
    """Messages to the streams as they are when each one is written (so a redirected or
    captured stdout gets them): `say` to stdout, `warn` and worse to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        print(self.format(record), file=stream, flush=True)


@contextmanager
def speaking(verbose: bool = True):
    """Within it, `say` and `warn` print (when `verbose`); nested uses print once."""
    if not verbose or any(isinstance(h, _Console) for h in LOGGER.handlers):
        yield
        return
    handler, level = _Console(), LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)


def progress_bar(iterable, description: str, total: int | None = None, unit: str = "it"):
    """A transient progress bar for a phase that may take a while (evaluation, generation),
    shown by the main process only."""
    return tqdm(
        iterable, description, total=total, unit=unit, leave=False, dynamic_ncols=True,
        disable=not is_main_process(),
    )  # fmt: skip
