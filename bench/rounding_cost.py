"""What stochastic rounding adds to a step: the seconds to round every trained matrix of
SmolLM2-135M (full fine-tuning: 135M parameters) and put the masters back, on a device.

    .venv/bin/python bench/rounding_cost.py [--device cuda] [--repeats 5]

Prints the median over --repeats of one round-and-restore, and the bytes of residual it
holds meanwhile. Set it beside a step's time from bench/throughput.py on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from sftforge.models.source import default_cache_dir, resolve_model_path
from sftforge.training.stochastic_rounding import StochasticBf16Weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    path = str(resolve_model_path("smollm2-135m", default_cache_dir()))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    rounding = StochasticBf16Weights(list(model.parameters()))
    elements = sum(p.numel() for p in rounding.matrices)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = []
    for seed in range(args.repeats + 1):
        synchronize()
        started = time.perf_counter()
        with rounding.rounded(seed):
            synchronize()
        synchronize()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds[1:])  # the first warms up
    print(f"{elements:,} matrix elements on {device}: {median * 1000:.1f} ms a step "
          f"(round and restore), residual {elements * 4 / 2**20:.0f} MiB while the step runs")  # fmt: skip


if __name__ == "__main__":
    main()
