"""Data at scale: peak memory and wall time of `sftforge data stats` and of a run's data
preparation on a generated file of --conversations multi-turn conversations (the generator
of bench/preparation.py: 1M is 635 MB of JSONL, about 150M tokens with SmolLM2).

Each step runs in its own process, one after another, and its wall time and peak RSS are
printed: GNU time's maximum resident set, which is that of the largest single process (the
main one, or a forked encoding worker), not a sum (forked workers share the parent's pages):

1. `sftforge data stats FILE` (tokenized with SmolLM2 in --num-proc processes, with exact
   and near-duplicate search);
2. training preparation, `load_examples` as `sftforge train` calls it (data.held_out 1000,
   max_length 512, the cache under a fresh folder): a first run, which encodes and writes the
   cache, then a second, which reads it;
3. for scale, the same preparation of the in-memory API that lists every Example
   (`--list-preparation`, off by default: at 1M it needs about 8 GiB).

    .venv/bin/python bench/scale.py [--conversations 1000000] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

PREPARE = r"""
import json, resource, sys, time
from pathlib import Path
from sftforge.config.loading import load_config
from sftforge.training.training_data import load_examples
from sftforge.models.source import resolve_model_path
from sftforge.models.tokenizer import load_tokenizer
from sftforge.models.tokenizer import text_side
data, cache, num_proc, out = sys.argv[1:]
encoder, _ = text_side(load_tokenizer(resolve_model_path("smollm2-135m")), "auto")
config = load_config(None, [f"data.train={data}", f"cache_dir={cache}", "max_length=512",
    f"data.num_proc={num_proc}", "eval.held_out=1000", "data.on_invalid=skip"])
started = time.perf_counter()
prepared = load_examples(config, encoder, Path(out))
took = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": took, "examples": len(prepared.examples),
    "tokens": prepared.report.tokens, "held_out": len(prepared.held_out_examples),
    "self_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(command: list[str]) -> dict:
    """Run `command`; its wall time and the peak RSS of it and its children (GNU time)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    started = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS %M", *command],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    took = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"failed: {command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    peak = max(int(x.split()[1]) for x in done.stderr.splitlines() if x.startswith("MAXRSS"))
    result = {"wall_s": took, "peak_rss_mib": peak / 1024}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result |= json.loads(line[len("RESULT ") :])
    result["tail"] = done.stdout.splitlines()[-40:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=1_000_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--skip-stats", action="store_true")
    args = parser.parse_args()
    from preparation import generated_data

    data = generated_data(args.conversations)
    size = data.stat().st_size / 2**20
    print(f"{data.name}: {args.conversations:,} conversations, {size:,.0f} MiB")
    python = sys.executable
    rows = []
    if not args.skip_stats:
        stats = [python, "-m", "sftforge", "data", "stats", str(data)]
        stats += ["--num-proc", str(args.num_proc), "--max-length", "512"]
        r = measure(stats)
        print("\n".join(r["tail"]))
        rows.append(("data stats (encode, exact and near duplicates)", r))
    with tempfile.TemporaryDirectory() as scratch:
        prepare = [python, "-c", PREPARE, str(data), f"{scratch}/cache", str(args.num_proc)]
        for label in ("preparation, first run (encodes, writes the cache)", "preparation, cached"):
            r = measure([*prepare, f"{scratch}/run"])
            print("\n".join(r["tail"][-12:]))
            rows.append((label, r))
    print(f"\n{args.conversations:,} conversations ({size:,.0f} MiB), {args.num_proc} processes")
    print("| step | wall s | peak RSS MiB (largest process) |")
    print("|---|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['wall_s']:.0f} | {r['peak_rss_mib']:,.0f} |")


if __name__ == "__main__":
    main()
