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

from .formats import Message
from .tokenize import Encoder


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
def reply(model, encoder: Encoder, history: list[Message], out: TextIO, max_new_tokens: int) -> str:
    ids = torch.tensor([encoder.encode_prompt(history)], device=next(model.parameters()).device)
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
) -> None:
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
        answer = reply(model, encoder, history, out, max_new_tokens)
        history.append(Message("assistant", answer))
