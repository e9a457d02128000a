"""Train SmolLM2 with TRL 1.16's SFTTrainer for a few steps and report its throughput.

    HF_HUB_OFFLINE=1 bench/.venv-trl/bin/python bench/run_trl.py --model MODEL_DIR \
        --data src/sftforge/assets/demo_train.jsonl --method lora --precision bf16 \
        --examples-per-step 32 --micro-batch 8 --steps 8 --warmup-steps 2 --mode padding_free

The peer's side of bench/compare.py (see ../shared/BENCHMARKING.md). Each JSONL line is
{"messages": [...]} ending with the assistant turn; it becomes TRL's conversational
prompt-completion format (prompt = all but the last message, completion = the last), so TRL
trains on the completion only.

Modes (all keep examples from attending to each other):
  plain         right-padded batches with an attention mask;
  padding_free  SFTConfig(padding_free=True): each micro-batch is one row, examples separated
                by position_ids (transformers builds a block-diagonal mask from them for SDPA);
  bfd           packing=True, packing_strategy="bfd": rows of up to --max-length tokens, each
                holding several whole examples separated by position_ids. Here --micro-batch and
                --examples-per-step count packed rows, as in TRL; the RESULT line reports how
                many examples a step really held.

Counting: a wrapper around TRL's collator records, per micro-batch, the real tokens (no padding)
and the trained tokens (labels[:, 1:] != -100: TRL's fused LM head scores hidden state t
against label t+1, and the padding-free collator already masks the first token of each packed
example). Accelerate's DataLoaderShard collates one batch ahead of the one it yields, so the
tallies are kept per micro-batch in collation order and the timed window (steps W+1..S) sums
exactly the micro-batches those steps consumed.

TRL's completion is everything the template prints after the prompt, so with ChatML it ends with
the "\n" after <|im_end|>: one trained token per example more than sftforge's mask (assistant
text + end-of-turn marker). trained_tokens_per_s counts what TRL trains;
trained_tokens_per_s_to_end_of_turn leaves those tokens out, for a same-mask comparison.

Prints one line: RESULT {json}.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local transformers model directory")
    p.add_argument("--data", required=True, help="JSONL of {'messages': [...]}")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--mode", choices=["plain", "padding_free", "bfd"], default="padding_free")
    p.add_argument("--examples-per-step", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=2, help="optimizer steps left out of timing")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gradient-checkpointing",
        choices=["on", "off"],
        default="off",
        help="TRL's SFTConfig default is on; off is faster here, fits in memory, and matches "
        "sftforge's default",
    )
    p.add_argument(
        "--save-every",
        type=int,
        help="save the adapter every N steps into --save-dir/step-N (time to quality); the "
        "saving is left out of every timing",
    )
    p.add_argument("--save-dir", help="where --save-every writes, with train_seconds.json")
    args = p.parse_args()
    if (args.save_every is None) != (args.save_dir is None):
        p.error("--save-every and --save-dir go together")
    if args.examples_per_step % args.micro_batch:
        p.error(
            f"--micro-batch {args.micro_batch} must divide --examples-per-step {args.examples_per_step}"
        )
    if not 0 <= args.warmup_steps < args.steps:
        p.error(
            f"--warmup-steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}"
        )
    return args


def load_conversations(path: str) -> list[list[dict]]:
    conversations = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                sys.exit(f"{path}:{line_no}: expected the last message to be the assistant's")
            conversations.append(messages)
    return conversations


def token_lengths(tokenizer, conversations: list[list[dict]]) -> list[int]:
    """Length of each whole conversation with the model's chat template, as TRL tokenizes it."""
    return [
        len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
        for m in conversations
    ]


def training_rows(conversations, lengths, args) -> list[dict]:
    """Enough prompt-completion rows that every timed step gets a full batch.

    Trainer ends an epoch with a short step when the data runs out, so the data is repeated (in
    file order; Trainer's seeded RandomSampler shuffles it) to cover one spare step beyond --steps.
    With bfd, a step takes rows of up to max_length tokens, so repeat until the tokens alone
    would fill that many rows.
    """
    per_step = args.examples_per_step
    if args.mode == "bfd":
        tokens_needed = (args.steps + 1) * per_step * args.max_length
        copies = math.ceil(tokens_needed / sum(lengths)) + 1
        count = copies * len(conversations)
    else:
        count = (args.steps + 1) * per_step
    return [
        {"prompt": m[:-1], "completion": [m[-1]]}
        for m in (conversations[i % len(conversations)] for i in range(count))
    ]


class TallyingCollator:
    """Wraps TRL's collator; records real, trained and example counts of every micro-batch.

    `past_end_of_turn` counts trained tokens whose previous token is the end-of-turn marker:
    the "\\n" the ChatML template prints after <|im_end|>, which TRL's completion includes and
    sftforge's mask (assistant text + end-of-turn marker) does not.
    """

    def __init__(self, collator, end_of_turn_id: int):
        self.collator = collator
        self.end_of_turn_id = end_of_turn_id
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch["labels"]
        if "attention_mask" in batch:
            tokens = int(batch["attention_mask"].sum())
            examples = int(labels.size(0))
        else:  # padding-free / packed: one row, all positions real, examples start at position 0
            tokens = int(batch["input_ids"].numel())
            examples = int((batch["position_ids"] == 0).sum())
        targets = labels[..., 1:] != -100  # TRL scores hidden state t against label t + 1
        trained = int(targets.sum())
        past_end_of_turn = int((targets & (labels[..., :-1] == self.end_of_turn_id)).sum())
        self.batches.append(
            {
                "tokens": tokens,
                "trained": trained,
                "past_end_of_turn": past_end_of_turn,
                "examples": examples,
            }
        )
        return batch


def guard_packed_attention(model) -> dict:
    """Fail loudly if a row packing several examples gets plain causal attention.

    transformers builds the block-diagonal mask from position_ids only when it is given no
    attention_mask and no KV cache (TRL's compute_loss passes use_cache=False); a forward with
    the cache on returns no mask, and SDPA then lets packed examples attend to each other.
    """
    module = sys.modules[type(model).__module__]
    build_mask = module.create_causal_mask
    counts = {"packed_forwards": 0}

    def checked(*args, **kwargs):
        mask = build_mask(*args, **kwargs)
        position_ids = kwargs.get("position_ids")
        packed = position_ids is not None and bool((position_ids[:, 1:] == 0).any())
        if packed and kwargs.get("attention_mask") is None:
            if mask is None:
                raise RuntimeError(
                    "packed row without a block-diagonal mask: examples would cross-attend"
                )
            counts["packed_forwards"] += 1
        return mask

    module.create_causal_mask = checked
    return counts


class StepClock(TrainerCallback):
    """Wall time and how many micro-batches had been collated at the end of each optimizer
    step; with `save_every`, the adapter saved every N steps, the saving left out of the times."""

    def __init__(self, tally: TallyingCollator, save_every: int | None, save_dir: str | None):
        self.tally = tally
        self.step_end_times: list[float] = []
        self.collated_at_step_end: list[int] = []
        self.losses: list[float] = []
        self.save_every, self.save_dir = save_every, save_dir
        self.saving_s = 0.0
        self.train_seconds: dict[int, float] = {}  # step -> training seconds at its end

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_time = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        now = time.perf_counter() - self.saving_s
        self.step_end_times.append(now)
        self.collated_at_step_end.append(len(self.tally.batches))
        step = state.global_step
        if self.save_every and step % self.save_every == 0:
            self.train_seconds[step] = now - self.start_time
            started = time.perf_counter()
            model.save_pretrained(os.path.join(self.save_dir, f"step-{step}"))
            with open(os.path.join(self.save_dir, "train_seconds.json"), "w") as f:
                json.dump(self.train_seconds, f)
            self.saving_s += time.perf_counter() - started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main() -> None:
    args = parse_args()  # SFTTrainer seeds everything from SFTConfig.seed
    grad_accum = args.examples_per_step // args.micro_batch

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    conversations = load_conversations(args.data)
    lengths = token_lengths(tokenizer, conversations)
    too_long = [i for i, n in enumerate(lengths) if n > args.max_length]
    if too_long and args.mode == "padding_free":
        # TRL refuses max_length with padding_free and no packing, so nothing would truncate them
        sys.exit(
            f"{args.data}: {len(too_long)} examples exceed --max-length {args.max_length} tokens "
            f"(first: line {too_long[0] + 1}, {lengths[too_long[0]]} tokens); padding_free cannot truncate"
        )
    dataset = Dataset.from_list(training_rows(conversations, lengths, args))

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa"
    )
    packed_check = guard_packed_attention(model)
    peft_config = None
    if args.method == "lora":
        peft_config = peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

    with tempfile.TemporaryDirectory() as output_dir:
        config = SFTConfig(
            output_dir=output_dir,
            bf16=args.precision == "bf16",
            use_cpu=True,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=args.steps,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=grad_accum,
            gradient_checkpointing=args.gradient_checkpointing == "on",
            completion_only_loss=True,
            # padding_free without packing rejects max_length; lengths were checked above instead
            max_length=None if args.mode == "padding_free" else args.max_length,
            padding_free=args.mode == "padding_free",
            packing=args.mode == "bfd",
            packing_strategy="bfd",
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        rows_needed = args.steps * args.examples_per_step
        if len(trainer.train_dataset) < rows_needed:
            sys.exit(
                f"only {len(trainer.train_dataset)} training rows after preparation, need {rows_needed}"
            )
        # TRL rejects a custom collator with padding-free, so wrap its own one after construction;
        # Trainer reads self.data_collator when it builds the dataloader in train().
        tally = TallyingCollator(trainer.data_collator, tokenizer.eos_token_id)
        trainer.data_collator = tally
        clock = StepClock(tally, args.save_every, args.save_dir)
        trainer.add_callback(clock)
        trainer.train()

    steps = len(clock.step_end_times)
    if steps != args.steps or len(clock.losses) != args.steps:
        sys.exit(
            f"expected {args.steps} steps and losses, got {steps} steps and {len(clock.losses)} losses"
        )
    # Each step consumes grad_accum micro-batches; the dataloader has collated at most one more.
    lookahead = [n - (s + 1) * grad_accum for s, n in enumerate(clock.collated_at_step_end)]
    if not all(x in (0, 1) for x in lookahead):
        sys.exit(f"unexpected collation lookahead at step ends: {lookahead}")

    if args.mode != "plain" and packed_check["packed_forwards"] == 0:
        sys.exit("no packed forward was checked for a block-diagonal mask")

    timed = tally.batches[args.warmup_steps * grad_accum : args.steps * grad_accum]
    times = [clock.start_time, *clock.step_end_times]  # times[s] = end of step s
    seconds = times[args.steps] - times[args.warmup_steps]
    tokens = sum(b["tokens"] for b in timed)
    trained = sum(b["trained"] for b in timed)
    examples = sum(b["examples"] for b in timed)
    past_end_of_turn = sum(b["past_end_of_turn"] for b in timed)
    consumed = tally.batches[: args.steps * grad_accum]
    result = {
        "tool": "trl",
        "mode": args.mode,
        "method": args.method,
        "precision": args.precision,
        "micro_batch": args.micro_batch,
        "grad_accum": grad_accum,
        "examples_per_step": args.examples_per_step,
        "examples_per_step_measured": examples / (args.steps - args.warmup_steps),
        "gradient_checkpointing": args.gradient_checkpointing == "on",
        "steps_timed": args.steps - args.warmup_steps,
        "seconds_timed": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "trained_tokens_per_s": round(trained / seconds, 1),
        "trained_tokens_per_s_to_end_of_turn": round((trained - past_end_of_turn) / seconds, 1),
        "tokens_timed": tokens,
        "trained_tokens_timed": trained,
        "trained_past_end_of_turn_timed": past_end_of_turn,
        "trained_tokens_total": sum(b["trained"] for b in consumed),
        "losses": clock.losses,
        "lookahead_batches": lookahead,
        "packed_forwards_checked": packed_check["packed_forwards"],
        "optim": getattr(config.optim, "value", str(config.optim)),
        "threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
        },
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
