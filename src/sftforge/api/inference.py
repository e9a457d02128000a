"""Trained models, for use: `load_model` (a run, model folder, embedded name or .gguf, with
the template it was trained with and its stop tokens), `generate` through it, `chat`, and
`merge` / `convert` a run's output into a plain model."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from sftforge.config.loading import load_config
from sftforge.console import say, speaking
from sftforge.data.chat_messages import message_of
from sftforge.data.formats import CHAT_ROLES
from sftforge.data.messages import DataError, Message, Source
from sftforge.encode.encoder import Encoder
from sftforge.encode.templates import ChatTemplate
from sftforge.evaluation.chat import chat as chat_loop
from sftforge.evaluation.chat import tools_from_file
from sftforge.evaluation.generation import Prompt, generate_answers
from sftforge.models.devices import autocast_dtype, pick_device
from sftforge.models.tokenizer import text_side
from sftforge.models.trained import load_for_inference, merge_adapter
from sftforge.training.output import convert_checkpoint

__all__ = ["LoadedModel", "load_model", "chat", "merge", "convert"]


@dataclass
class LoadedModel:
    """A model ready to answer as it was trained to: its weights on a device, and the
    Encoder that renders prompts with its chat template and knows its stop tokens."""

    model: torch.nn.Module
    encoder: Encoder
    source: str

    @property
    def template(self) -> ChatTemplate:
        return self.encoder.template

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self.encoder.stop_ids

    def generate(
        self,
        prompts: str | list[Message | dict] | list[str | list[Message | dict]],
        max_new_tokens: int = 128,
        tools: tuple[dict, ...] = (),
    ) -> str | list[str]:
        """Greedy answers, stopping at the end-of-turn tokens. A prompt is a user message's
        text, or a conversation so far (Messages, or {"role", "content"} dicts); given a
        list of prompts, a list of answers."""
        many = isinstance(prompts, list) and prompts and not _is_message(prompts[0])
        batch = [_prompt(p, tools) for p in (prompts if many else [prompts])]
        answers = generate_answers(self.model, self.encoder, batch, max_new_tokens)
        return answers if many else answers[0]


def _is_message(item) -> bool:
    return isinstance(item, (Message, dict))


def _prompt(prompt, tools: tuple[dict, ...]) -> Prompt:
    """A prompt as the model is given it. {"role", "content", ...} dicts are read as a chat
    record's messages are: tool calls, tool results and reasoning kept, mistakes named."""
    if isinstance(prompt, str):
        return Prompt([Message("user", prompt)], tools)
    source = Source("prompt")
    messages = [
        m if isinstance(m, Message) else _message(m, f"messages[{k}]", source)
        for k, m in enumerate(prompt)
    ]
    return Prompt(messages, tools)


def _message(item: dict, where: str, source: Source) -> Message:
    role = item.get("role")
    if role not in CHAT_ROLES:
        raise DataError(source, f"role {role!r} is not one of {sorted(CHAT_ROLES)}", where)
    return message_of(item, CHAT_ROLES[role], role, where, "content", source)


def load_model(
    model: str | Path,
    *,
    template: str | ChatTemplate = "auto",
    device: str = "auto",
    precision: str = "auto",
    allow_pickle: bool = False,
    verbose: bool = False,
) -> LoadedModel:
    """A run directory (adapter or full model), a model folder, an embedded name, a .gguf
    file or a hub id, loaded for inference on `device` (auto: cuda, mps, cpu) with the chat
    template it was saved with ("auto"), or a built-in one, or another model's ChatTemplate.
    precision auto: bf16 on a GPU that computes it natively, else fp32."""
    with speaking(verbose):
        loaded, tokenizer = load_for_inference(str(model), allow_pickle=allow_pickle)
        encoder, _ = text_side(tokenizer, template, model=loaded)
        place = pick_device(device)
        if place.type == "cuda" and place.index is not None:
            torch.cuda.set_device(place)
        dtype = autocast_dtype(precision, place) if place.type != "cpu" else None
        loaded.to(place, dtype=dtype) if dtype else loaded.to(place)
        say(f"loaded {model} on {place} ({dtype or 'fp32'}); template {encoder.template.name}")
    return LoadedModel(loaded.eval(), encoder, str(model))


def chat(
    model: LoadedModel,
    *,
    system: str | None = None,
    tools: str | Path | tuple[dict, ...] = (),
    max_new_tokens: int = 256,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
) -> None:
    """Talk to `model`: each line read from `stdin` (default the terminal) is a user turn,
    each reply streams to `out` as it is generated; the history is kept. `tools`: function
    definitions offered in every prompt, or a JSON file listing them."""
    if isinstance(tools, (str, Path)):
        tools = tools_from_file(str(tools))
    chat_loop(
        model.model, model.encoder, system=system, max_new_tokens=max_new_tokens,
        stdin=stdin or sys.stdin, out=out or sys.stdout, tools=tools,
    )  # fmt: skip


def merge(
    adapter_dir: str | Path,
    output_dir: str | Path,
    *,
    allow_pickle: bool = False,
    verbose: bool = False,
) -> Path:
    """Fold a LoRA run's adapter into its full-precision base (for a QLoRA run too: its
    adapter trained on a 4-bit copy of that base), written as a plain transformers model with
    the run's tokenizer, template and generation config; returns `output_dir`."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    base = merge_adapter(adapter_dir, output_dir, allow_pickle=allow_pickle)
    run_config = adapter_dir / "sftforge.yaml"
    with speaking(verbose):
        say(f"merged model written to {output_dir}: the adapter folded into {base}")
        if run_config.is_file() and load_config(run_config).method == "qlora":
            say(
                "(a qlora run: its adapter was trained on a 4-bit copy of that base, and is "
                "merged into the full-precision base itself, not into the 4-bit copy)"
            )
    return output_dir


def convert(checkpoint: str | Path, output_dir: str | Path, *, verbose: bool = False) -> Path:
    """A checkpoint folder (checkpoints/step-NNNNNN, FSDP's sharded ones too) -> a plain
    model or adapter, loadable like a run's final output; returns where it was written."""
    written = convert_checkpoint(Path(checkpoint), Path(output_dir))
    with speaking(verbose):
        say(f"plain model written to {written} from {checkpoint}")
    return written
