"""Time to quality: training seconds until the held-out loss reaches a target, sftforge
against TRL's SFTTrainer, side by side in one run.

    .venv/bin/python bench/time_to_quality.py --precision fp32 --steps 20 --eval-every 2 \\
        --examples-per-step 16 --pairs 2

Tokens/s flatters a tool that learns less per step; this measures what a user waits for.
Both tools train LoRA on the demo data with the same settings as bench/compare.py (same
model, template, learning rate and constant schedule, examples per step, micro-batch),
alternating TRL and ours, each a fresh process under /usr/bin/time -v.

Both are scored by one evaluator: sftforge's held-out loss (mean cross-entropy over the
assistant tokens and their end-of-turn token of the demo's held-out set), in fp32. sftforge
measures it during training every --eval-every steps (its clock pauses meanwhile); TRL saves
its adapter every --eval-every steps (saving left out of its clock, see bench/run_trl.py) and
each saved adapter is loaded here, into the same base, and measured with the same function.

The target is the held-out loss TRL reaches at its last step (median over its runs): a loss
both tools reach. Each run's time to target is interpolated linearly between the two
measurements around the crossing; the ratio (TRL / ours) is taken within a pair.

Prints a markdown table and writes the raw runs to bench/results/ttq-<UTC timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import compare  # bench/compare.py: the TRL venv, model path, measured runs, versions

ROOT = compare.ROOT
TRAIN = Path("src/sftforge/assets/demo_train.jsonl")
HELD_OUT = Path("src/sftforge/assets/demo_eval.jsonl")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--examples-per-step", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-mode", choices=["plain", "padding_free"], default="plain")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--set", action="append", default=[], help="sftforge config KEY=VALUE")
    return p.parse_args()


def shared_flags(args) -> list[str]:
    return [
        "--data", str(TRAIN), "--method", "lora", "--precision", args.precision,
        "--examples-per-step", str(args.examples_per_step), "--micro-batch", str(args.micro_batch),
        "--steps", str(args.steps), "--warmup-steps", "1", "--max-length", str(args.max_length),
        "--lr", str(args.lr), "--seed", str(args.seed),
    ]  # fmt: skip


def ours_command(args) -> list[str]:
    extra = [f"--set={item}" for item in args.set]
    return [
        str(compare.OUR_PYTHON), "bench/throughput.py", *shared_flags(args),
        "--held-out", str(HELD_OUT), "--eval-every", str(args.eval_every), *extra,
    ]  # fmt: skip


def trl_command(args, model: str, save_dir: str) -> list[str]:
    return [
        str(compare.TRL_PYTHON), "bench/run_trl.py", "--model", model, *shared_flags(args),
        "--mode", args.trl_mode, "--save-every", str(args.eval_every), "--save-dir", save_dir,
    ]  # fmt: skip


class HeldOutLoss:
    """sftforge's held-out loss of a LoRA adapter saved by peft, on the demo's held-out set."""

    def __init__(self, args):
        import torch

        from sftforge.config.loading import load_config
        from sftforge.training.prepare import prepare
        from sftforge.training.training_data import load_examples

        self.config = load_config(
            None,
            [
                f"data.train={TRAIN}",
                f"eval.held_out={HELD_OUT}",
                f"max_length={args.max_length}",
                "lora.dropout=0.0",
                "training.precision=fp32",
            ],
        )
        self.device = torch.device("cpu")
        self.prepared = prepare(self.config, self.device)
        with tempfile.TemporaryDirectory() as out:
            data = load_examples(self.config, self.prepared.encoder, Path(out))
        self.examples = data.held_out_examples

    def __call__(self, adapter_dir: Path) -> float:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from sftforge.evaluation.generation import mean_token_loss

        model = self.prepared.model
        result = set_peft_model_state_dict(
            model, load_file(adapter_dir / "adapter_model.safetensors")
        )
        lora_missing = [k for k in result.missing_keys if "lora_" in k]
        if lora_missing or result.unexpected_keys:
            sys.exit(f"{adapter_dir}: adapter does not fit ({lora_missing[:2]}, "
                     f"{result.unexpected_keys[:2]})")  # fmt: skip
        return mean_token_loss(model, self.examples, self.device, self.prepared.encoder.pad_id)


def curve_of_trl(save_dir: Path, held_out_loss: HeldOutLoss) -> dict[int, tuple[float, float]]:
    seconds = json.loads((save_dir / "train_seconds.json").read_text())
    return {int(step): (s, held_out_loss(save_dir / f"step-{step}")) for step, s in seconds.items()}


def time_to(target: float, curve: dict[int, tuple[float, float]]) -> float | None:
    """Training seconds at which the held-out loss first reaches `target`, interpolated
    linearly between the measurements around the crossing; None if it never does."""
    points = [(0.0, float("inf"))] + [curve[s] for s in sorted(curve)]
    for (t0, l0), (t1, l1) in zip(points, points[1:], strict=False):
        if l1 <= target:
            if l0 == float("inf") or l0 == l1:
                return t1
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def main() -> None:
    args = parse_args()
    os.environ.update(compare.RUN_ENV)
    compare.ensure_trl_venv(False)
    model = compare.model_dir()
    started = dt.datetime.now(dt.timezone.utc)
    out_path = ROOT / "bench/results" / f"ttq-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {"cpu": compare.lscpu_field("Model name"), "cores": os.cpu_count()},
        "versions": {
            "sftforge_venv": compare.versions(
                compare.OUR_PYTHON, ["torch", "transformers", "peft"]
            ),
            "trl_venv": compare.versions(compare.TRL_PYTHON, ["trl", "torch", "transformers"]),
        },
        "git": compare.git_state(),
        "settings": vars(args),
        "runs": [],
    }
    held_out_loss = None
    for pair in range(args.pairs):
        with tempfile.TemporaryDirectory() as save_dir:
            for tool in ("trl", "sftforge"):
                cmd = trl_command(args, model, save_dir) if tool == "trl" else ours_command(args)
                print(f"[pair {pair}] {tool} ...", end=" ", flush=True)
                record = {"pair": pair, "tool": tool, **compare.run_measured(cmd, args.timeout)}
                if record["result"] is None:
                    print(f"FAILED: {record.get('stderr_tail', '')[-2000:]}")
                    sys.exit(1)
                if tool == "trl":
                    held_out_loss = held_out_loss or HeldOutLoss(args)
                    curve = curve_of_trl(Path(save_dir), held_out_loss)
                else:
                    curve = {int(s): tuple(v) for s, v in record["result"]["held_out"].items()}
                record["curve"] = curve
                report["runs"].append(record)
                last = curve[max(curve)]
                print(f"{record['wall_s']} s; held-out loss {last[1]:.4f} after {last[0]:.0f} s")
                out_path.write_text(json.dumps(report, indent=1) + "\n")

    summarize(report, args)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nraw runs: {out_path.relative_to(ROOT)}")


def summarize(report: dict, args) -> None:
    runs = report["runs"]
    trl_runs = [r for r in runs if r["tool"] == "trl"]
    target = compare.median([r["curve"][max(r["curve"])][1] for r in trl_runs])
    rows, ratios = {}, []
    for r in runs:
        r["time_to_target_s"] = time_to(target, r["curve"])
        rows.setdefault(r["tool"], []).append(r)
    for pair in range(args.pairs):
        trl, ours = (next(r for r in rows[t] if r["pair"] == pair) for t in ("trl", "sftforge"))
        if trl["time_to_target_s"] and ours["time_to_target_s"]:
            ratios.append(trl["time_to_target_s"] / ours["time_to_target_s"])
    report["summary"] = {"target": target, "ratios": ratios, "ratio": compare.median(ratios)}

    steps = sorted(runs[0]["curve"])
    print(
        f"\nLoRA, {args.precision}, {args.examples_per_step} examples/step (micro-batch "
        f"{args.micro_batch}), lr {args.lr:g} constant, {args.steps} steps; TRL {args.trl_mode}; "
        f"held-out loss by sftforge's evaluator on {HELD_OUT.name}; target {target:.4f} "
        f"(TRL's at step {args.steps})"
    )
    header = "| tool | runs | trained tok/s | peak RSS GiB | " + " | ".join(
        f"loss @{s}" for s in steps
    ) + " | seconds to target | TRL / ours |"  # fmt: skip
    print(header + "\n|" + "---|" * (header.count("|") - 1))
    ratio = report["summary"]["ratio"]
    ratio = "–" if ratio is None else f"**{ratio:.2f}**"
    for tool, mine in rows.items():
        med = compare.median
        losses = " | ".join(f"{med([r['curve'][s][1] for r in mine]):.4f}" for s in steps)
        seconds = med([r["time_to_target_s"] for r in mine])
        print(
            f"| {tool} | {len(mine)} "
            f"| {med([r['result']['trained_tokens_per_s'] for r in mine]):.1f} "
            f"| {med([r['max_rss_kb'] / 2**20 for r in mine if r['max_rss_kb']]):.2f} "
            f"| {losses} | {'–' if seconds is None else f'{seconds:.0f}'} "
            f"| {'' if tool == 'trl' else ratio} |"
        )


if __name__ == "__main__":
    main()
