"""`sftforge` as torchrun runs it, with a fault injected into one rank for the tests of
tests/test_distributed.py (the package has no hooks for faults; this script wraps it):

    FAULTY_RANK=1 FAIL_AT_STEP=3   that rank raises in its 3rd optimizer step
    FAULTY_RANK=1 HANG_AT_STEP=3   that rank stops answering in its 3rd step (sleeps for
                                   ever, having written the time it began to HANG_MARK)
    FAULTY_RANK=1 KILL_AT_STEP=3   that rank dies of SIGKILL in its 3rd step
    FAULTY_RANK=1 SLOW_PREPARE_S=20  that rank takes 20 s more to prepare its data
    ENCODING_LOG=path              each rank that encodes the data (not from the cache)
                                   appends its rank to that file
"""

import os
import signal
import sys
import time
from pathlib import Path

import sftforge.encode.cache
import sftforge.training.loop
from sftforge.cli.main import main

faulty = os.environ.get("RANK") == os.environ.get("FAULTY_RANK")


def fail(step: int) -> None:
    raise RuntimeError(f"injected failure in step {step}")


def hang(step: int) -> None:
    Path(os.environ["HANG_MARK"]).write_text(str(time.time()))
    while True:
        time.sleep(3600)


def die(step: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


FAULTS = {"FAIL_AT_STEP": fail, "HANG_AT_STEP": hang, "KILL_AT_STEP": die}


def inject(fault, fault_at: int) -> None:
    """`fault(step)` at the start of this rank's `fault_at`-th step."""
    gradients_of_step = sftforge.training.loop.step_gradients
    calls = []

    def step_gradients_with_fault(*args, **kwargs):
        calls.append(1)
        if len(calls) == fault_at:
            fault(fault_at)
        return gradients_of_step(*args, **kwargs)

    sftforge.training.loop.step_gradients = step_gradients_with_fault


for variable, fault in FAULTS.items():
    if faulty and variable in os.environ:
        inject(fault, int(os.environ[variable]))

if faulty and "SLOW_PREPARE_S" in os.environ:
    load_examples_once = sftforge.training.loop.load_examples_once

    def slow_load_examples(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_PREPARE_S"]))
        return load_examples_once(*args, **kwargs)

    sftforge.training.loop.load_examples_once = slow_load_examples

if "ENCODING_LOG" in os.environ:
    encode_stream = sftforge.encode.cache.encode_stream

    def logged_encode_stream(*args, **kwargs):
        with open(os.environ["ENCODING_LOG"], "a") as log:
            log.write(f"{os.environ['RANK']}\n")
        return encode_stream(*args, **kwargs)

    sftforge.encode.cache.encode_stream = logged_encode_stream

sys.exit(main())
