"""`sftforge` as torchrun runs it, with a fault injected into one rank for the tests of
tests/test_distributed.py (the package has no hooks for faults; this script wraps it):

    FAULTY_RANK=1 FAIL_AT_STEP=3   that rank raises in its 3rd optimizer step
    FAULTY_RANK=1 SLOW_PREPARE_S=20  that rank takes 20 s more to prepare its data
"""

import os
import sys
import time

import sftforge.training.loop
from sftforge.cli.main import main

faulty = os.environ.get("RANK") == os.environ.get("FAULTY_RANK")

if faulty and "FAIL_AT_STEP" in os.environ:
    fail_at = int(os.environ["FAIL_AT_STEP"])
    accumulate = sftforge.training.loop.accumulate_gradients
    calls = []

    def accumulate_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError(f"injected failure in step {fail_at}")
        return accumulate(*args, **kwargs)

    sftforge.training.loop.accumulate_gradients = accumulate_then_fail

if faulty and "SLOW_PREPARE_S" in os.environ:
    load_examples = sftforge.training.loop.load_examples

    def slow_load_examples(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_PREPARE_S"]))
        return load_examples(*args, **kwargs)

    sftforge.training.loop.load_examples = slow_load_examples

sys.exit(main())
