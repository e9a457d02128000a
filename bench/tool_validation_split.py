"""A validation split of the bundled tool task's *training* file, for choosing settings
without its held-out file: a seeded 20 % of the training records held back (drawn among those that call tools), each cut after
its last assistant turn that calls tools (the tool scorer needs a reference that makes calls;
a training record often ends with an answer written from the tools' results), and the other
80 % to train on.

    .venv/bin/python bench/tool_validation_split.py OUT_DIR
    .venv/bin/sftforge demo --task tools --output RUN data.train=OUT_DIR/train.jsonl \
        eval.held_out=OUT_DIR/validation.jsonl [settings]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from sftforge.evaluation.forgetting import bundled


def tool_call_turns(record: dict) -> list[int]:
    messages = record["messages"]
    return [k for k, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]


def split(records: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training records, validation records): the validation records drawn among those that
    call tools."""
    calling = [i for i, record in enumerate(records) if tool_call_turns(record)]
    random.Random(seed).shuffle(calling)
    held = sorted(calling[: round(share * len(records))])
    train = [r for i, r in enumerate(records) if i not in set(held)]
    validation = [
        records[i] | {"messages": records[i]["messages"][: tool_call_turns(records[i])[-1] + 1]}
        for i in held
    ]
    return train, validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    lines = bundled("tools_train.jsonl").read_text().splitlines()
    train, validation = split([json.loads(line) for line in lines], args.share, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        text = "".join(json.dumps(row) + "\n" for row in rows)
        (args.out_dir / f"{name}.jsonl").write_text(text)
    print(f"{len(train)} training records, {len(validation)} validation: {args.out_dir}")


if __name__ == "__main__":
    main()
