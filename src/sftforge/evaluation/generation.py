"""Held-out loss, generation with the training template, and scored answers."""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache

from sftforge.console import progress_bar
from sftforge.data.messages import Conversation, Message
from sftforge.data.tools import calls_as_text
from sftforge.encode.batches import collate, empty_batch
from sftforge.encode.encoder import Encoder, Example
from sftforge.models.loading import attends_in_sliding_windows, causal_lm
from sftforge.models.loss import TokenLoss, batch_loss
from sftforge.models.prefix_sharing import shared_step_batches


def mean_token_loss(
    model,
    examples: list[Example],
    device,
    pad_id: int,
    batch_size: int = 8,
    description: str = "held-out loss",
    shared_rows_of: int | None = None,
) -> float:
    """Mean next-token loss over the trained tokens of `examples`, in fp32, in eval mode."""
    total, count = summed_loss_and_count(
        TokenLoss(model),
        examples,
        device,
        pad_id,
        batch_size,
        description=description,
        shared_rows_of=shared_rows_of,
    )
    return total / max(count, 1)


@torch.no_grad()
def summed_loss_and_count(
    loss_module,
    examples: list[Example],
    device,
    pad_id: int,
    batch_size: int = 8,
    passes: int = 0,
    description: str = "held-out loss",
    shared_rows_of: int | None = None,
) -> tuple[float, int]:
    """(summed next-token loss, trained tokens) of `examples` through `loss_module` (a
    TokenLoss, maybe under DDP or FSDP), in eval mode; at least `passes` forward passes, the
    extra ones empty (under FSDP every rank takes part in every forward). With
    `shared_rows_of`, `batch_size` rows of that many tokens each hold their examples' common
    prefix once (models/prefix_sharing.py): the same loss, fewer tokens computed."""
    was_training = loss_module.training
    loss_module.eval()
    count = 0
    if shared_rows_of:
        lengths = [len(e.input_ids) for e in examples]
        everything = list(range(len(examples)))
        batches = shared_step_batches(
            examples, lengths, everything, pad_id, batch_size, pack_length=shared_rows_of
        )
    else:
        ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
        batches = [
            collate(ordered[b : b + batch_size], pad_id) for b in range(0, len(ordered), batch_size)
        ]
    batches += [empty_batch(pad_id)] * (passes - len(batches))
    summed = torch.zeros((), dtype=torch.float64, device=device)  # read once, at the end
    for batch in progress_bar(batches, description, unit="batch"):
        summed += batch_loss(loss_module, batch.to(device))
        count += batch.trained_tokens
    loss_module.train(was_training)
    return float(summed), count


class Prompt(NamedTuple):
    """What a model is given to answer: the messages so far, the tools offered, and the
    chat template's options (a record's own)."""

    messages: list[Message]
    tools: tuple[dict, ...] = ()
    options: dict | None = None

    @property
    def last_text(self) -> str:
        return self.messages[-1].content if self.messages else ""


def prompt_and_reference(conversation: Conversation) -> tuple[Prompt, str]:
    """The prompt before the last assistant turn, and that turn as text (the reference): its
    text, and its tool calls written as the chatml built-in writes them."""
    last = conversation.assistant_indices()[-1]
    message = conversation.messages[last]
    prompt = Prompt(
        list(conversation.messages[:last]), conversation.tools, conversation.template_options
    )
    return prompt, calls_as_text(message.content, message.tool_calls)


@torch.no_grad()
def generate_answers(
    model,
    encoder: Encoder,
    prompts: list[Prompt],
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers, batched with the KV cache, stopping at the encoder's stop tokens.

    Prompts are batched by length, so little is padded. The tokens that a batch's prompts
    begin with alike (a system prompt, tool definitions) are computed once and their cache
    shared; each prompt's rest is padded on its left, after that prefix. Positions follow
    the attention mask, so padding shifts nothing."""
    tokenizer = encoder.tokenizer
    device = next(model.parameters()).device
    stops, pad_id = list(encoder.stop_ids), encoder.pad_id
    share = not attends_in_sliding_windows(causal_lm(model).config)
    was_training = model.training
    model.eval()
    encoded = [encoder.encode_prompt(p.messages, p.tools, p.options) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda k: len(encoded[k]))
    answers: list[str] = [""] * len(prompts)
    bar = progress_bar(None, "generating answers", total=len(prompts), unit="answer")
    for b in range(0, len(order), batch_size):
        batch = [encoded[k] for k in order[b : b + batch_size]]
        shared = _common_start(batch) if share else 0
        rests = [ids[shared:] for ids in batch]
        width = shared + max(len(ids) for ids in rests)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        input_ids[:, :shared] = torch.tensor(batch[0][:shared])
        attention[:, :shared] = 1
        for row, ids in enumerate(rests):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        cache = None
        if shared:
            cache = DynamicCache(config=causal_lm(model).config)
            model(input_ids=input_ids[:1, :shared].to(device), cache=cache, use_cache=True)
            cache.batch_repeat_interleave(len(batch))
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            cache=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad_id,
        )
        for k, row in zip(order[b : b + batch_size], out[:, width:].tolist(), strict=True):
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers[k] = tokenizer.decode(row[:cut], skip_special_tokens=False)
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return answers


def _common_start(encoded: list[list[int]]) -> int:
    """Leading tokens every prompt has (leaving each at least one of its own to start from)."""
    first = encoded[0]
    n = min(len(ids) for ids in encoded) - 1
    return next((i for i in range(n) if any(ids[i] != first[i] for ids in encoded)), max(n, 0))


def answer_and_score(
    model, encoder: Encoder, conversations: list[Conversation], scorer, max_new_tokens: int
) -> list[dict]:
    """One result per conversation: its prompt, reference (last assistant turn), answer, score."""
    pairs = [prompt_and_reference(c) for c in conversations]
    answers = generate_answers(model, encoder, [p for p, _ in pairs], max_new_tokens)
    results = []
    for conv, (prompt, reference), answer in zip(conversations, pairs, answers, strict=True):
        record = {"source": str(conv.source), "prompt": prompt.last_text}
        score = float(scorer(answer, reference, record)) if scorer else None
        results.append(record | {"reference": reference, "answer": answer, "score": score})
    return results


def mean_score(results: list[dict]) -> float | None:
    scores = [r["score"] for r in results if r["score"] is not None]
    return sum(scores) / len(scores) if scores else None
