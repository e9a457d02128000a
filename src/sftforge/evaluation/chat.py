"""`sftforge chat`: talk to a model with the template it was trained with, streaming tokens.

On a terminal it prompts and keeps the conversation (`/reset` starts over, `/quit` ends).
With input piped in, each line is a user turn and each reply is printed on its own line, so
scripts can use it.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from transformers import TextStreamer

from sftforge.data.messages import Message
from sftforge.data.tools import generated_turn
from sftforge.encode.encoder import Encoder


class _Streamer(TextStreamer):
    """Writes generated text to a stream as it comes (TextStreamer prints to stdout)."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.out.write(text)
        if stream_end:
            self.out.write("\n")
        self.out.flush()


@torch.no_grad()
def reply(
    model,
    encoder: Encoder,
    history: list[Message],
    out: TextIO,
    max_new_tokens: int,
    tools: tuple[dict, ...] = (),
) -> str:
    prompt = encoder.encode_prompt(history, tools)
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    stops = list(encoder.stop_ids)
    generated = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=encoder.pad_id,
        streamer=_Streamer(encoder.tokenizer, out),
    )[0, ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(generated) if t in stops), len(generated))
    return encoder.tokenizer.decode(generated[:cut], skip_special_tokens=False)


def chat(
    model,
    encoder: Encoder,
    system: str | None = None,
    max_new_tokens: int = 256,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    tools: tuple[dict, ...] = (),
) -> None:
    """Answer each line read; with `tools` (function definitions) offered in every prompt,
    the model's calls are kept in the history as calls (tool results are not run here)."""
    # Read at call time, not bound when the module is imported: a redirected stream counts.
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    model.eval()
    history: list[Message] = [Message("system", system)] if system else []
    if interactive:
        out.write("sftforge chat: /reset to start over, /quit or Ctrl-D to leave\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/quit":
            break
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not text.strip():
            continue
        history.append(Message("user", text))
        answer = reply(model, encoder, history, out, max_new_tokens, tools)
        history.append(generated_message(answer))


def generated_message(answer: str) -> Message:
    """A generated answer as the assistant message it is: its reasoning and tool calls
    apart from its text, so that the next prompt writes them as the template does."""
    reasoning, text, calls = generated_turn(answer)
    if calls is None:  # a call that does not parse stays text, as the model wrote it
        return Message("assistant", answer)
    return Message("assistant", text, reasoning=reasoning, tool_calls=calls)


def tools_from_file(path: str) -> tuple[dict, ...]:
    """The function definitions a JSON file lists (`chat --tools`), checked as data's are."""
    from pathlib import Path

    from sftforge.data.messages import Source
    from sftforge.data.tools import parse_tools

    return parse_tools(Path(path).read_text("utf-8"), Source(path))
