"""Peak memory of the data commands against the number of records (issue 29, point 11).

`sftforge data stats | filter | convert | dedup` run on generated files of each --records
size (bench/preparation.py's generator: multi-turn chats of random words, no duplicates),
each in its own process, one after another; the figure is that process's peak resident set
(the kernel's ru_maxrss through os.wait4), the Python interpreter, torch, transformers and
the tokenizer included. `stats` runs with --num-proc 1 so the one process is the whole of it
(workers hold a few chunks each, the same at any size).

The claim: apart from the duplicate index (`stats` and `dedup`; sized per record below), no
command holds more for more records. "growth" is (peak at the largest size - peak at the
smallest) / (records between them): bytes held per extra record.

    .venv/bin/python bench/data_memory.py [--records 100000 400000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from preparation import generated_data  # noqa: E402

SFTFORGE = [sys.executable, "-m", "sftforge"]
COMMANDS = {
    "stats (exact and near duplicates)": ["data", "stats", "{data}", "--num-proc", "1"],
    "stats --exact-only": ["data", "stats", "{data}", "--num-proc", "1", "--exact-only"],
    "filter (token bounds, blocklist)": [
        "data",
        "filter",
        "{data}",
        "-o",
        "{out}",
        "--min-tokens",
        "60",
        "--max-tokens",
        "300",
        "--response-blocklist",
        r"\bzebra\b",
    ],  # fmt: skip
    "convert --to sharegpt": ["data", "convert", "{data}", "--to", "sharegpt", "-o", "{out}"],
    "dedup (exact and near)": ["data", "dedup", "{data}", "-o", "{out}"],
    "dedup --exact-only": ["data", "dedup", "{data}", "-o", "{out}", "--exact-only"],
}


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak resident set in MiB, wall seconds) of `command`, run to its end."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(command)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--only", help="run only the commands whose name contains this")
    args = parser.parse_args()
    sizes = sorted(args.records)
    files = {n: generated_data(n) for n in sizes}
    header = " | ".join(f"{n:,}: MiB (s)" for n in sizes)
    print(f"| command | {header} | largest / smallest | growth, bytes/record |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    # The first use of the model may convert its GGUF into the cache: not part of a figure.
    peak_rss(SFTFORGE + ["data", "stats", str(generated_data(100)), "--num-proc", "1"])
    with tempfile.TemporaryDirectory() as scratch:
        for name, template in COMMANDS.items():
            if args.only and args.only not in name:
                continue
            peaks = []
            for n in sizes:
                out = Path(scratch) / f"out_{n}.jsonl"
                command = [part.format(data=files[n], out=out) for part in template]
                peaks.append(peak_rss(SFTFORGE + command))
            cells = " | ".join(f"{mib:,.0f} ({seconds:,.0f})" for mib, seconds in peaks)
            ratio = peaks[-1][0] / peaks[0][0]
            growth = (peaks[-1][0] - peaks[0][0]) * 2**20 / (sizes[-1] - sizes[0])
            print(f"| {name} | {cells} | {ratio:.2f} | {growth:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
