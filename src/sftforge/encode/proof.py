"""Reading tokens back, for the mask proof (encode/encoder.py) and `inspect`: the text each range of
ids stands for where it is, the runs of trained labels, and the proof itself (`mask_problem`).

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


def mask_problem(ids, labels, atoms, rendered, shown_texts, ignore_index, stop_ids, tokenizer):
    """Prove an example's mask, or say why it cannot be: every run of text decodes back
    from its tokens where they stand (`shown_texts`: texts_in_place of the plain atoms; a
    special atom's one id is the tokenizer's id for its very text, by construction), the
    runs of trained tokens hold exactly the text of the rendered conversation's trained
    spans, and each ends with one of `stop_ids` (None: any token may end them).

    `atoms` are encode/encoder.py's: text, special or not, their [start, end) of `ids`, and
    whether they were tokenized as a string of their own (`string_start`)."""
    text, spans = rendered.text, rendered.trained_spans
    plain = [atom for atom in atoms if not atom.special]
    for atom, shown in zip(plain, shown_texts, strict=True):
        if not _decodes_to(shown, atom.text, atom.string_start):
            return (
                f"the tokens of {atom.text[:60]!r} decode to {shown[:60]!r}: they do not "
                "decode back to the rendered text (a character the tokenizer cannot write?)"
            )
    runs = trained_runs(labels, ignore_index)
    if len(runs) != len(spans):
        return f"expected {len(spans)} trained spans, found {len(runs)}"
    for (t0, t1), (c0, c1) in zip(runs, spans, strict=True):
        inside = [a for a in atoms if t0 <= a.tokens[0] and a.tokens[1] <= t1]
        trained = "".join(a.text for a in inside)
        if trained != text[c0:c1]:
            return f"trained tokens hold {trained!r}, expected {text[c0:c1]!r}"
        if stop_ids is not None and ids[t1 - 1] not in stop_ids:
            end = tokenizer.convert_ids_to_tokens(ids[t1 - 1])
            stops = tokenizer.convert_ids_to_tokens(list(stop_ids))
            return (
                f"an assistant turn ends with {end!r}, which is not one of the stop tokens "
                f"{stops} (the end of a one-turn conversation, and eos): generation would "
                "not stop where training taught it to"
            )
    return None


def _decodes_to(shown: str, text: str, string_start: bool) -> bool:
    """Whether tokens decoded in place (`shown`) give back their `text`. A string's start
    may differ by the prefix space the tokenizer itself puts there (the same at
    inference): added after a special token (legacy Llama), or absorbing a space the
    text began with."""
    if shown == text:
        return True
    if not string_start:
        return False
    return shown == " " + text or " " + shown == text
