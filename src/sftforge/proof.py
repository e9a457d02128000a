"""Reading tokens back, for the mask proof (tokenize.py) and `inspect`: the text each range of
ids stands for where it is, and the runs of trained labels.

A range is decoded after a few tokens of context and the context's own text taken off, since
a SentencePiece decoder drops the leading space of whatever it decodes first. All the windows
of many conversations go to the tokenizer's decoder in one call: a call costs about a
millisecond beyond its work.
"""

from __future__ import annotations

import re


def trained_runs(labels: list[int], ignore_index: int) -> list[tuple[int, int]]:
    """[start, end) of each run of trained labels (those not `ignore_index`), found by a
    regex over one byte a label."""
    flags = bytes([label != ignore_index for label in labels])
    return [m.span() for m in _RUN_OF_ONES.finditer(flags)]


_RUN_OF_ONES = re.compile(b"\x01+")


def texts_in_place(tokenizer, ids: list[int], ranges: list[tuple[int, int]]) -> list[str]:
    """The text each range of `ids` stands for where it is, decoded after a few tokens of
    context (a SentencePiece decoder drops the leading space of whatever it decodes first);
    all in one call to the tokenizer's decoder."""
    return texts_of(decode_all(tokenizer, decode_windows(ids, ranges)))


def decode_windows(ids: list[int], ranges: list[tuple[int, int]]) -> list[list[int]]:
    """Two windows a range: its tokens after up to 4 of context, and the context alone."""
    windows = []
    for start, end in ranges:
        first = max(0, start - 4)
        windows += [ids[first:end], ids[first:start]]
    return windows


def decode_all(tokenizer, windows: list[list[int]]) -> list[str]:
    """Each window's text, special tokens written out, in one call to the decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode_batch(windows, skip_special_tokens=False)
    return [
        tokenizer.decode(w, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for w in windows
    ]


def texts_of(decoded: list[str]) -> list[str]:
    """What each range adds to its context, from `decode_windows`' decoded pairs."""
    pairs = zip(decoded[::2], decoded[1::2], strict=True)
    return [through[len(before) :] for through, before in pairs]
