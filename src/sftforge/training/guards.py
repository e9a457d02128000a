"""What stops a run cleanly: a stop signal (finish the step, checkpoint, exit saying how to
go on) and a step whose loss or gradient is not finite (never applied; named with its
records and the last good checkpoint)."""

from __future__ import annotations

import math
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from sftforge.console import warn
from sftforge.errors import RunFailed
from sftforge.training.checkpoint import latest_checkpoint


class NonFiniteError(RunFailed):
    pass


@contextmanager
def stop_requests():
    """Turn the first SIGINT or SIGTERM into a request to stop after the current step (the
    loop then checkpoints); a second one stops at once, as usual."""
    stop = SimpleNamespace(signal=None)
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def request(number, frame):
        stop.signal = signal.Signals(number)
        warn(
            f"\n{stop.signal.name}: finishing this step, then saving a checkpoint "
            "(send it again to stop at once)"
        )
        for s, handler in previous.items():
            signal.signal(s, handler)

    for s in previous:
        signal.signal(s, request)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def nonfinite_step(step: int, loss: float, grad_norm: float, sources: list[str]) -> str:
    """What went wrong in `step`, naming the records (`sources`) of its examples."""
    shown = ", ".join(sources[:5])
    more = f" and {len(sources) - 5} more" if len(sources) > 5 else ""
    if not math.isfinite(loss):
        what = f"the loss ({loss}) is not finite"
    else:
        what = f"the gradient norm ({grad_norm}) is not finite, though the loss ({loss:.4g}) is"
    return f"step {step}: {what} (the step's examples: {shown}{more})"


def nonfinite_stop(what: str, output_dir: Path) -> str:
    last = latest_checkpoint(output_dir)
    kept = (
        f"the last good checkpoint is {last} (resume=auto continues from it)"
        if last
        else "no checkpoint was written before it"
    )
    return (
        f"{what}; the run stopped without applying it, and {kept}. Try a lower training.lr "
        "or training.precision=fp32, or look at those records; training.skip_nonfinite_steps=N "
        "skips up to N such steps instead"
    )
