"""Side-by-side training throughput: sftforge against TRL's SFTTrainer, on this machine.

    .venv/bin/python bench/compare.py --datasets demo long --method lora --precision bf16 \
        --ours micro=8 --ours budget=4096,packing --pairs 3 --warmup-runs 1

Follows ../shared/BENCHMARKING.md: the same model, data, chat template, learning rate and
constant schedule, and examples per optimizer step for both tools; runs alternate
(TRL, ours, TRL, ours, ...) after optional unmeasured warm-up runs; every run is a fresh process
under `/usr/bin/time -v` so peak memory comes from the OS. Each --ours configuration is run once
per pair against the same TRL run, and ratios are taken within a pair.

--ours takes comma-separated items: micro=N (micro-batch; default --trl-micro-batch),
budget=T (token budget per micro-batch), packing, compile (torch.compile the decoder layers),
pure (LoRA with its frozen weights in bf16: training.precision=pure_bf16).

It first measures this machine's matmul peak (bench/matmul_peak.py) and passes it to
sftforge, whose result then carries its model FLOPs utilisation (MFU).

Prints a markdown table and writes every run, raw, to bench/results/<UTC timestamp>.json with
the versions, the machine and the command line. --dry-run prints the commands only.
"""

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# Relative to ROOT, where every run starts, so the recorded commands read as typed.
OUR_PYTHON = Path(".venv/bin/python")
TRL_VENV = Path("bench/.venv-trl")
TRL_PYTHON = TRL_VENV / "bin" / "python"
TRL_PACKAGES = [
    "trl==1.16.0",
    "transformers==5.23.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "accelerate==1.15.0",
]
DATASETS = {
    "demo": Path("src/sftforge/assets/demo_train.jsonl"),
    "long": Path("bench/data/long_prompts.jsonl"),
}
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=["demo", "long"])
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument(
        "--warmup-steps", type=int, default=2, help="steps each run leaves out of timing"
    )
    p.add_argument("--examples-per-step", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, help="default 2e-4 for lora, 2e-5 for full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-mode", choices=["plain", "padding_free", "bfd"], default="padding_free")
    p.add_argument("--trl-micro-batch", type=int, default=8)
    p.add_argument(
        "--trl-gradient-checkpointing",
        choices=["on", "off"],
        default="off",
        help="TRL's own default is on; off was ~15%% faster in a short check, and sftforge runs without it",
    )
    p.add_argument(
        "--ours",
        action="append",
        help="sftforge configuration, repeatable: micro=N | budget=T | budget=T,packing (default micro=8)",
    )
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument(
        "--warmup-runs", type=int, default=1, help="unmeasured runs of each, per dataset"
    )
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run")
    p.add_argument("--ours-script", default="bench/throughput.py", help=argparse.SUPPRESS)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    if args.lr is None:
        args.lr = 2e-4 if args.method == "lora" else 2e-5
    args.ours = args.ours or ["micro=8"]
    for spec in args.ours:
        ours_flags(spec, args)  # fail early on a bad spec
    return args


def ours_flags(spec: str, args: argparse.Namespace) -> list[str]:
    """'budget=4096,packing' -> ['--micro-batch', '8', '--token-budget', '4096', '--packing']."""
    micro, extra = args.trl_micro_batch, []
    for item in spec.split(","):
        key, _, value = item.strip().partition("=")
        if key == "micro" and value.isdigit():
            micro = int(value)
        elif key == "budget" and value.isdigit():
            extra += ["--token-budget", value]
        elif key in ("packing", "compile") and not value:
            extra.append(f"--{key}")
        elif key == "pure" and not value:
            extra += ["--precision", "pure_bf16"]  # after --precision bf16: the later one wins
        else:
            sys.exit(
                f"--ours {spec!r}: expected items micro=N, budget=T, packing, compile or pure; "
                f"found {item!r}"
            )
    return ["--micro-batch", str(micro), *extra]


def ensure_trl_venv(dry_run: bool) -> None:
    """Create bench/.venv-trl with the pinned peer; never touches the project venv."""
    if (ROOT / TRL_PYTHON).exists():
        return
    steps = [
        [sys.executable, "-m", "venv", str(TRL_VENV)],
        [str(TRL_PYTHON), "-m", "pip", "install", "--quiet", "torch==2.13.0"],
        [str(TRL_PYTHON), "-m", "pip", "install", "--quiet", *TRL_PACKAGES],
    ]
    for cmd in steps:
        print("$ " + shlex.join(cmd), flush=True)
        if not dry_run:
            subprocess.run(cmd, check=True, cwd=ROOT)


def model_dir() -> str:
    from sftforge.models.source import default_cache_dir, resolve_model_path

    return str(resolve_model_path("smollm2-135m", default_cache_dir()))


def ensure_long_data(model: str, dry_run: bool) -> None:
    if (ROOT / DATASETS["long"]).exists():
        return
    cmd = [str(OUR_PYTHON), "bench/make_long_prompt_data.py", "--model", model]
    print("$ " + shlex.join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, check=True, cwd=ROOT)


def trl_label(args: argparse.Namespace) -> str:
    return f"{args.trl_mode},micro={args.trl_micro_batch},gc={args.trl_gradient_checkpointing}"


def common_flags(args: argparse.Namespace, data: Path) -> list[str]:
    return [
        "--data", str(data),
        "--method", args.method,
        "--precision", args.precision,
        "--examples-per-step", str(args.examples_per_step),
        "--steps", str(args.steps),
        "--warmup-steps", str(args.warmup_steps),
        "--max-length", str(args.max_length),
        "--lr", str(args.lr),
        "--seed", str(args.seed),
    ]  # fmt: skip


def trl_command(args: argparse.Namespace, model: str, data: Path) -> list[str]:
    return [
        str(TRL_PYTHON), "bench/run_trl.py", "--model", model, *common_flags(args, data),
        "--micro-batch", str(args.trl_micro_batch),
        "--mode", args.trl_mode,
        "--gradient-checkpointing", args.trl_gradient_checkpointing,
    ]  # fmt: skip


def ours_command(
    args: argparse.Namespace, spec: str, data: Path, peak_tflops: float | None
) -> list[str]:
    peak = ["--peak-tflops", f"{peak_tflops:.4f}"] if peak_tflops else []
    return [
        str(OUR_PYTHON), args.ours_script, *common_flags(args, data), *ours_flags(spec, args),
        *peak,
    ]  # fmt: skip


def matmul_peak(dry_run: bool) -> dict | None:
    """This machine's fp32 and bf16 matmul peak (GFLOP/s), measured now."""
    cmd = [str(OUR_PYTHON), "bench/matmul_peak.py"]
    print("$ " + shlex.join(cmd), flush=True)
    if dry_run:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    print(out, flush=True)
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def run_measured(cmd: list[str], timeout: int) -> dict:
    """Run one benchmark process under /usr/bin/time -v; parse its RESULT line and peak RSS."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        returncode, stdout, stderr = None, e.stdout or "", (e.stderr or "") + "\n[timed out]"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
        stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
    record = {
        "command": shlex.join(cmd),
        "returncode": returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "max_rss_kb": None,
        "result": None,
    }
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if rss:
        record["max_rss_kb"] = int(rss.group(1))
    results = [line[len("RESULT ") :] for line in stdout.splitlines() if line.startswith("RESULT ")]
    if results:
        record["result"] = json.loads(results[-1])
    if returncode != 0 or not results:
        record["stderr_tail"] = stderr[-4000:]
    return record


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def loss_at(runs: list[dict], step: int) -> float | None:
    return median(
        [r["result"]["losses"][step - 1] for r in runs if len(r["result"]["losses"]) >= step]
    )


def summarize(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per dataset and tool configuration, from the measured (non-warm-up) runs."""
    rows = []
    steps_shown = sorted({1, max(1, args.steps // 2), args.steps})
    for dataset in args.datasets:
        measured = [
            r for r in runs if r["dataset"] == dataset and r["role"] == "pair" and r["result"]
        ]
        trl_by_pair = {r["pair"]: r for r in measured if r["tool"] == "trl"}
        for tool, config in [("trl", trl_label(args))] + [("sftforge", s) for s in args.ours]:
            mine = [r for r in measured if r["tool"] == tool and r["config"] == config]
            row = {
                "dataset": dataset,
                "tool": tool,
                "config": config,
                "runs": len(mine),
                "tokens_per_s": median([r["result"]["tokens_per_s"] for r in mine]),
                "trained_tokens_per_s": median([r["result"]["trained_tokens_per_s"] for r in mine]),
                "peak_rss_gib": median([r["max_rss_kb"] / 2**20 for r in mine if r["max_rss_kb"]]),
                "mfu": median([r["result"].get("mfu") for r in mine]),
                "losses": {step: loss_at(mine, step) for step in steps_shown},
                "ratio_trained_tokens_per_s": None,
                "ratio_same_mask": None,
                "ratio_peak_rss": None,
            }
            if tool != "trl":
                paired = [(r, trl_by_pair.get(r["pair"])) for r in mine]
                paired = [(r, t) for r, t in paired if t is not None]
                row["ratio_trained_tokens_per_s"] = median(
                    [
                        r["result"]["trained_tokens_per_s"] / t["result"]["trained_tokens_per_s"]
                        for r, t in paired
                        if t["result"]["trained_tokens_per_s"]
                    ]
                )
                # TRL also trains the "\n" after <|im_end|>; ours stops at <|im_end|>
                row["ratio_same_mask"] = median(
                    [
                        r["result"]["trained_tokens_per_s"]
                        / t["result"]["trained_tokens_per_s_to_end_of_turn"]
                        for r, t in paired
                        if t["result"].get("trained_tokens_per_s_to_end_of_turn")
                    ]
                )
                row["ratio_peak_rss"] = median(
                    [
                        r["max_rss_kb"] / t["max_rss_kb"]
                        for r, t in paired
                        if r["max_rss_kb"] and t["max_rss_kb"]
                    ]
                )
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    def fmt(x, spec):
        return "–" if x is None else format(x, spec)

    steps_shown = list(rows[0]["losses"]) if rows else []
    header = (
        "| dataset | tool | config | runs | tokens/s | trained tokens/s | peak RSS GiB | "
        + " | ".join(f"loss @{s}" for s in steps_shown)
        + " | MFU | trained tok/s ours/TRL | same mask ours/TRL | RSS ours/TRL |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        lines.append(
            f"| {row['dataset']} | {row['tool']} | {row['config']} | {row['runs']} "
            f"| {fmt(row['tokens_per_s'], '.1f')} | {fmt(row['trained_tokens_per_s'], '.1f')} "
            f"| {fmt(row['peak_rss_gib'], '.2f')} | "
            + " | ".join(fmt(row["losses"][s], ".4f") for s in steps_shown)
            + f" | {fmt(row['mfu'], '.0%')}"
            + f" | {fmt(row['ratio_trained_tokens_per_s'], '.2f')} | {fmt(row['ratio_same_mask'], '.2f')}"
            + f" | {fmt(row['ratio_peak_rss'], '.2f')} |"
        )
    return "\n".join(lines)


def lscpu_field(name: str) -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def versions(python: Path, modules: list[str]) -> dict:
    code = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code, *modules], capture_output=True, text=True, cwd=ROOT
        )
        return json.loads(out.stdout)
    except (OSError, json.JSONDecodeError):
        return {"error": f"could not read versions from {python}"}


def git_state() -> dict:
    def git(*cmd):
        return subprocess.run(
            ["git", *cmd], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def main() -> None:
    args = parse_args()
    os.environ.update(RUN_ENV)  # for resolving the model here, and inherited by every run
    ensure_trl_venv(args.dry_run)
    model = model_dir()
    ensure_long_data(model, args.dry_run)

    peak = matmul_peak(args.dry_run)
    peak_tflops = peak[f"{args.precision}_gflops"] / 1000 if peak else None

    # The schedule: per dataset, warm-up runs, then pairs; within a pair TRL first, then each of ours.
    schedule = []
    for dataset in args.datasets:
        data = DATASETS[dataset]
        trl = ("trl", trl_label(args), trl_command(args, model, data))
        ours = [
            ("sftforge", spec, ours_command(args, spec, data, peak_tflops)) for spec in args.ours
        ]
        for i in range(args.warmup_runs):
            schedule += [(dataset, "warmup", i, *run) for run in [trl, *ours]]
        for i in range(args.pairs):
            schedule += [(dataset, "pair", i, *run) for run in [trl, *ours]]

    if args.dry_run:
        for dataset, role, i, tool, config, cmd in schedule:
            print(f"# {dataset} {role} {i} {tool} {config}\n/usr/bin/time -v {shlex.join(cmd)}")
        return

    started = dt.datetime.now(dt.timezone.utc)
    out_path = BENCH / "results" / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    report = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {
            "cpu": lscpu_field("Model name"),
            "cores": os.cpu_count(),
            "flags_bf16_amx": [
                f for f in (lscpu_field("Flags") or "").split() if "bf16" in f or "amx" in f
            ],
            "platform": platform.platform(),
        },
        "versions": {
            "sftforge_venv": versions(OUR_PYTHON, ["sftforge", "torch", "transformers", "peft"]),
            "trl_venv": versions(
                TRL_PYTHON, ["trl", "torch", "transformers", "peft", "datasets", "accelerate"]
            ),
        },
        "git": git_state(),
        "model": model,
        "matmul_peak": peak,
        "settings": {k: v for k, v in vars(args).items() if k != "dry_run"},
        "datasets": {name: str(DATASETS[name]) for name in args.datasets},
        "runs": [],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for n, (dataset, role, i, tool, config, cmd) in enumerate(schedule, 1):
        print(
            f"[{n}/{len(schedule)}] {dataset} {role} {i} {tool} {config} ...", end=" ", flush=True
        )
        record = {"dataset": dataset, "role": role, "pair": i, "tool": tool, "config": config}
        record.update(run_measured(cmd, args.timeout))
        report["runs"].append(record)
        result = record["result"]
        if result:
            rss = f"{record['max_rss_kb'] / 2**20:.2f} GiB" if record["max_rss_kb"] else "?"
            tps = result["trained_tokens_per_s"]
            print(f"{tps:.1f} trained tok/s, {rss}, {record['wall_s']} s", flush=True)
        else:
            print(f"FAILED (exit {record['returncode']}), see {out_path}", flush=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n")  # keep partial results

    report["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    report["summary"] = summarize(report["runs"], args)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(
        f"{args.method}, {args.precision}, {args.examples_per_step} examples/step, {args.steps} steps "
        f"({args.warmup_steps} untimed), lr {args.lr:g}, max_length {args.max_length}; "
        f"TRL {args.trl_mode}, micro-batch {args.trl_micro_batch}, "
        f"gradient checkpointing {args.trl_gradient_checkpointing}; {args.pairs} pairs "
        f"after {args.warmup_runs} warm-up run(s) of each"
    )
    print(markdown_table(report["summary"]))
    print(
        "\nMedians over the measured runs; ratios are medians of per-pair ratios. 'same mask' "
        'divides by TRL\'s trained tokens without the "\\n" after <|im_end|> that TRL also trains.'
    )
    if args.trl_mode == "bfd":
        print(
            "TRL bfd: micro-batch and examples per step count packed rows, so a TRL step held "
            "more examples than ours (see examples_per_step_measured in the raw runs)."
        )
    print(f"\nraw runs: {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
