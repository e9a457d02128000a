"""Data preparation throughput (render + tokenize + mask), sftforge against TRL, side by side.

Generates --conversations multi-turn conversations (deterministic; system prompt in 30 %, 1-3
exchanges), then times, alternating over --repeats rounds, each in its own process:

- sftforge: `encode_stream` (render with the chat template, tokenize, build the labels and
  prove every mask, into the columnar table training reads) in --num-proc processes, no
  cache; reading the file is timed apart (it streams during a run: see bench/scale.py);
- TRL 1.16 (bench/.venv-trl, made by bench/compare.py): SFTTrainer's `_prepare_dataset` on
  the same conversations as its conversational prompt-completion format (prompt = all
  messages but the last, completion = the last: the only multi-turn masking TRL offers with
  a template that has no generation tags), with dataset_num_proc = --num-proc.

The same SmolLM2 tokenizer and template for both. sftforge masks every assistant turn by
default; --train-on last_assistant_turn gives it TRL's mask (the same trained tokens).

--kind tools generates tool-calling conversations instead (the same two tools offered in
every record; one or two rounds of a user query, an assistant turn of 1-2 calls, their
results, and an answer; reasoning in a third of the answers), rendered by both with the
chatml built-in (SmolLM2's own template writes no tools), TRL given each record's `tools`.

    .venv/bin/python bench/preparation.py [--conversations 100000] [--num-proc 2] [--repeats 2]
        [--kind chat|tools]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_PYTHON = ROOT / "bench/.venv-trl/bin/python"
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
]

OURS = r"""
import json, sys, time
from sftforge.data.loading import load_conversations
from sftforge.encode.parallel import encode_stream
from sftforge.models.source import resolve_model_path
from sftforge.models.tokenizer import load_tokenizer
from sftforge.models.tokenizer import text_side
data, num_proc, train_on, template = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
encoder, _ = text_side(load_tokenizer(resolve_model_path("smollm2-135m")), template, train_on)
started = time.perf_counter()
conversations = load_conversations(data).conversations
loaded = time.perf_counter()
table = encode_stream(conversations, encoder, "error", num_proc).table
done = time.perf_counter()
trained = int(table.trained_counts.sum())
print("RESULT " + json.dumps({"seconds": done - loaded, "load_seconds": loaded - started,
    "conversations": len(table), "trained_tokens": trained}))
"""

TRL = r"""
import json, sys, time
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer
data, num_proc, model_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
template = sys.argv[5] if len(sys.argv) > 5 else None
rows = []
for line in open(data):
    record = json.loads(line)
    messages = record["messages"]
    row = {"prompt": messages[:-1], "completion": messages[-1:]}
    if "tools" in record:
        row["tools"] = record["tools"]
    rows.append(row)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
if template:
    tokenizer.chat_template = open(template).read()
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
    intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
args = SFTConfig(output_dir=out, dataset_num_proc=num_proc if num_proc > 1 else None,
    report_to=[], max_length=None, bf16=False, use_cpu=True)
tiny = Dataset.from_list(rows[:2])
trainer = SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer)
dataset = Dataset.from_list(rows)
started = time.perf_counter()
prepared = trainer._prepare_dataset(dataset, tokenizer, args, False, None, "train")
done = time.perf_counter()
if "labels" in prepared.column_names:
    trained = sum(sum(1 for x in row[1:] if x != -100) for row in prepared["labels"])
else:
    trained = sum(sum(m[1:]) for m in prepared["completion_mask"])
print("RESULT " + json.dumps({"seconds": done - started, "conversations": len(prepared),
    "trained_tokens": trained}))
"""


def words_from(r: random.Random):
    """sentence(k): k words drawn by `r`, capitalised, with a full stop."""
    return lambda k: " ".join(r.choice(WORDS) for _ in range(k)).capitalize() + "."


def generate(n: int, path: Path) -> None:
    r = random.Random(0)
    sentence = words_from(r)

    with open(path, "w") as f:
        for _ in range(n):
            messages = []
            if r.random() < 0.3:
                messages.append({"role": "system", "content": sentence(8)})
            for _ in range(r.randint(1, 3)):
                user = " ".join(sentence(r.randint(5, 15)) for _ in range(r.randint(1, 3)))
                reply = " ".join(sentence(r.randint(5, 20)) for _ in range(r.randint(1, 4)))
                messages += [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": reply},
                ]
            f.write(json.dumps({"messages": messages}) + "\n")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    }
    for name, description in (
        ("search_notes", "Search the user's notes"),
        ("search_web", "Search the web"),
    )
]


def generate_tools(n: int, path: Path) -> None:
    """Tool-calling conversations: every record offers TOOLS; in each round the user asks,
    the assistant calls one or two tools (no text), the results come back, it answers."""
    r = random.Random(0)
    sentence = words_from(r)

    with open(path, "w") as f:
        for _ in range(n):
            messages = []
            for _ in range(r.randint(1, 2)):
                messages.append({"role": "user", "content": sentence(r.randint(6, 18))})
                calls = [
                    {
                        "id": f"call_{k}",
                        "type": "function",
                        "function": {
                            "name": r.choice(TOOLS)["function"]["name"],
                            "arguments": json.dumps(
                                {"query": sentence(r.randint(2, 6)), "limit": r.randint(1, 9)}
                            ),
                        },
                    }
                    for k in range(r.randint(1, 2))
                ]
                messages.append({"role": "assistant", "content": "", "tool_calls": calls})
                for c in calls:
                    result = json.dumps({"results": [sentence(r.randint(5, 15))]})
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
                answer = {"role": "assistant", "content": sentence(r.randint(8, 25))}
                if r.random() < 0.33:
                    answer["reasoning_content"] = sentence(r.randint(5, 15))
                messages.append(answer)
            f.write(json.dumps({"tools": TOOLS, "messages": messages}) + "\n")


def generated_data(n: int, kind: str = "chat") -> Path:
    """bench/data/prep_N.jsonl (or prep_tools_N.jsonl), generated the first time it is asked
    for."""
    name = f"prep_{n}.jsonl" if kind == "chat" else f"prep_{kind}_{n}.jsonl"
    data = ROOT / "bench/data" / name
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        (generate if kind == "chat" else generate_tools)(n, data)
    return data


def run(command: list[str]) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"failed: {command[:3]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-on", default="all_assistant_turns")
    parser.add_argument("--kind", choices=("chat", "tools"), default="chat")
    args = parser.parse_args()
    data = generated_data(args.conversations, args.kind)
    sys.path.insert(0, str(ROOT / "src"))
    from sftforge.models.source import resolve_model_path

    model_dir = str(resolve_model_path("smollm2-135m"))
    template = "auto" if args.kind == "chat" else "chatml"
    ours = [sys.executable, "-c", OURS, str(data), str(args.num_proc), args.train_on, template]
    trl = [str(TRL_PYTHON), "-c", TRL, str(data), str(args.num_proc), model_dir, "/tmp/prep-trl"]
    if args.kind == "tools":
        trl.append(str(ROOT / "src/sftforge/encode/chat_templates/chatml.jinja"))
    results: dict[str, list[dict]] = {"sftforge": [], "TRL": []}
    for round_ in range(args.repeats):
        for name, command in (("sftforge", ours), ("TRL", trl)):
            results[name].append(run(command))
            r = results[name][-1]
            print(f"round {round_ + 1}: {name}: {r['conversations'] / r['seconds']:.0f} conv/s")
    speeds = {n: [r["conversations"] / r["seconds"] for r in rs] for n, rs in results.items()}
    ratios = [a / b for a, b in zip(speeds["sftforge"], speeds["TRL"], strict=True)]
    print(f"\n{args.conversations:,} {args.kind} conversations, {args.num_proc} processes each")
    print("| tool | conversations/s | trained tokens |")
    print("|---|---:|---:|")
    for name, rs in results.items():
        print(f"| {name} | {statistics.median(speeds[name]):.0f} | {rs[0]['trained_tokens']:,} |")
    print(f"sftforge / TRL (median of the pairwise ratios): {statistics.median(ratios):.2f}x")
    print(
        f"sftforge reading the file: {results['sftforge'][0]['load_seconds']:.1f} s (not in the figure)"
    )


if __name__ == "__main__":
    main()
