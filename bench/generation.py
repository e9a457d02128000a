"""Time `generate_answers` on the bundled tool task's held-out prompts (the demo's base model,
its template, fp32), the way the demo's before/after evaluation generates.

    .venv/bin/python bench/generation.py --batch-size 16 --max-new-tokens 128

Prints one `RESULT {json}` line: seconds for the prompts, and for the same prompts with one
new token (about the prefill's share)."""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sftforge.data.loading import load_conversations
from sftforge.evaluation.forgetting import bundled
from sftforge.evaluation.generation import generate_answers, prompt_and_reference
from sftforge.training.demo import demo_config
from sftforge.training.prepare import prepare


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=60)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        prepared = prepare(demo_config(Path(out), [], "tools"), torch.device("cpu"))
    conversations = load_conversations(str(bundled("tools_eval.jsonl"))).conversations
    prompts = [prompt_and_reference(c)[0] for c in conversations][: args.prompts]

    def seconds(new_tokens: int) -> float:
        start = time.perf_counter()
        generate_answers(prepared.model, prepared.encoder, prompts, new_tokens, args.batch_size)
        return time.perf_counter() - start

    one = seconds(1)
    full = seconds(args.max_new_tokens)
    result = {"prompts": len(prompts), "batch_size": args.batch_size}
    result |= {"max_new_tokens": args.max_new_tokens, "seconds": full, "one_token_s": one}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
