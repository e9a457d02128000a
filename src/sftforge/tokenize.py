"""Rendered text + assistant spans -> input_ids + labels, exact and checked.

How text becomes tokens, and why:
- Special tokens are recognised only where the *template* wrote them. A user who types
  `<|im_end|>` gets the characters, not the token.
- Between special tokens, text is tokenized as one run, as a tokenizer does for a whole
  prompt, except at the start and end of every assistant turn: the prompt a model sees at
  inference ends at the generation prompt and is tokenized alone, so training must not let
  BPE merge the template's last characters with the first characters of the answer.
- A run is tokenized as it would be in its place in the whole text. SentencePiece-style
  tokenizers (Llama 2, Mistral) put a prefix space before text at the start of a string
  (and, by their settings, after a special token), so a run that continues text cut at a
  turn boundary, or follows a special token where the tokenizer adds none, is tokenized
  behind an anchor whose tokens are then dropped. Which runs need that is learned once,
  from the tokenizer itself.
- Labels are the input ids on trained tokens and -100 elsewhere (not shifted: the loss does
  that). Each example is then checked: every run of text decodes back from its tokens where
  they stand (in context: a SentencePiece decoder drops the leading space of whatever it
  decodes first), and the trained tokens are exactly the runs of the assistant turns, whose
  text is the answer plus its end-of-turn marker. A mask that cannot be proven is an error.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from .conversation import Conversation, DataError, Message
from .templates import ChatTemplate, TemplateError, render_conversation, render_prompt

IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn", "all_tokens")
TRUNCATION = ("drop", "truncate")
# Text tokenized in front of a run that must not get a string's prefix space; its tokens are
# dropped. A newline: SentencePiece vocabularies hold it as a byte, merged with nothing.
ANCHOR = "\n"


@dataclass
class Example:
    """One tokenized training example: plain lists, ready for padding or packing."""

    input_ids: list[int]
    labels: list[int]
    source: str

    @property
    def trained_token_count(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class EncodingReport:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: list[str] = field(default_factory=list)  # sources of examples cut to max_length
    dropped_too_long: list[str] = field(default_factory=list)
    dropped_nothing_trained: list[str] = field(default_factory=list)
    max_tokens: int = 0

    def summary(self, max_length: int) -> str:
        lines = [
            f"examples: {self.examples}, tokens: {self.tokens}, trained tokens: "
            f"{self.trained_tokens}, longest: {self.max_tokens} (max_length {max_length})"
        ]
        for label, sources in (
            ("truncated to max_length", self.truncated),
            ("dropped: longer than max_length", self.dropped_too_long),
            ("dropped: no trained token left", self.dropped_nothing_trained),
        ):
            if sources:
                shown = ", ".join(sources[:5]) + (" ..." if len(sources) > 5 else "")
                lines.append(f"{label}: {len(sources)} ({shown})")
        return "\n".join(lines)


@dataclass
class _Atom:
    text: str
    special: bool
    trained: bool
    segment: int  # index of the stretch between two cuts that this text lies in
    tokens: tuple[int, int] = (0, 0)  # [start, end) of its ids, once tokenized
    string_start: bool = False  # tokenized as a string of its own, prefix space and all


class Encoder:
    """Turns Conversations into Examples with one tokenizer and one chat template."""

    def __init__(self, tokenizer, template: ChatTemplate, train_on: str = "all_assistant_turns"):
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.end_of_turn_ids: set[int] = set()  # special tokens seen closing a trained turn
        self.special_ids: dict[str, int] = dict(tokenizer.get_added_vocab())
        for tok in (tokenizer.eos_token, tokenizer.bos_token):
            if tok and tok not in self.special_ids:
                self.special_ids[tok] = tokenizer.convert_tokens_to_ids(tok)
        by_length = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(re.escape(t) for t in by_length) or "(?!)")
        self._anchor_ids = self._ids([ANCHOR])[0]
        self._prefix_at_start, self._prefix_after_special = self._probe_prefix_space()

    # ---- public -------------------------------------------------------------------------

    def encode(self, conversation: Conversation) -> Example:
        """Tokens and labels for one conversation; raises DataError naming its source."""
        source = str(conversation.source)
        try:
            if conversation.is_raw_text:
                return self._encode_raw_text(conversation)
            rendered = render_conversation(conversation, self.template, set(self.special_ids))
        except TemplateError as e:
            raise DataError(conversation.source, str(e), field="messages") from e
        # Every assistant turn is cut from its prompt as at inference, trained or not.
        cuts = rendered.assistant_spans
        spans = cuts
        if self.train_on == "last_assistant_turn":
            spans = cuts[-1:]
        elif self.train_on == "all_tokens":
            spans = [(0, len(rendered.text))]
        ids, trained_ranges, atoms = self._tokenize(rendered.parts, cuts, spans)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in trained_ranges:
            labels[start:end] = ids[start:end]
        self._check(ids, atoms, trained_ranges, rendered.text, spans, conversation)
        if self.train_on != "all_tokens":
            special = set(self.special_ids.values())
            self.end_of_turn_ids.update(
                ids[end - 1] for _, end in trained_ranges if ids[end - 1] in special
            )
        return Example(ids, labels, source)

    def encode_prompt(self, messages: list[Message] | tuple[Message, ...]) -> list[int]:
        """The ids a model is given at inference: history plus generation prompt."""
        rendered = render_prompt(messages, self.template, set(self.special_ids))
        ids, _, _ = self._tokenize(rendered.parts, rendered.assistant_spans, [])
        return ids

    # ---- internals ----------------------------------------------------------------------

    def _encode_raw_text(self, conversation: Conversation) -> Example:
        ids = self.tokenizer(conversation.text, split_special_tokens=True).input_ids
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        decoded = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if decoded != conversation.text:
            raise DataError(
                conversation.source,
                "the tokenizer cannot represent this text exactly (it does not decode back); "
                "remove the characters it lacks",
                field="text",
            )
        return Example(ids, list(ids), str(conversation.source))

    def _atoms(self, parts, cut_spans, spans: list[tuple[int, int]]) -> list[_Atom]:
        cuts = sorted({p for span in [*cut_spans, *spans] for p in span})
        atoms: list[_Atom] = []
        for part in parts:
            start, end = part.start, part.start + len(part.text)
            inner = [c for c in cuts if start < c < end]
            for a, b in zip([start, *inner], [*inner, end], strict=True):
                piece = part.text[a - start : b - start]
                trained = any(s <= a and b <= e for s, e in spans)
                segment = bisect.bisect_right(cuts, a)
                if part.is_content:
                    atoms.append(_Atom(piece, False, trained, segment))
                else:
                    atoms.extend(self._split_special(piece, trained, segment))
        return _merge_text_runs(atoms)

    def _split_special(self, text: str, trained: bool, segment: int) -> list[_Atom]:
        """Template text: special tokens the template wrote become their ids."""
        atoms, pos = [], 0
        for m in self._special_pattern.finditer(text):
            if m.start() > pos:
                atoms.append(_Atom(text[pos : m.start()], False, trained, segment))
            atoms.append(_Atom(m.group(0), True, trained, segment))
            pos = m.end()
        if pos < len(text):
            atoms.append(_Atom(text[pos:], False, trained, segment))
        return atoms

    def _tokenize(self, parts, cut_spans, spans):
        """Ids of the rendered parts, cut at every span boundary; the token ranges of
        `spans` (the trained ones); and the atoms, each knowing its tokens."""
        atoms = self._atoms(parts, cut_spans, spans)
        plain = [k for k, a in enumerate(atoms) if not a.special]
        anchored = {k for k in plain if self._continues_text(atoms, k)}
        texts = [ANCHOR + atoms[k].text if k in anchored else atoms[k].text for k in plain]
        encoded = dict(zip(plain, self._ids(texts) if texts else [], strict=True))
        ids: list[int] = []
        trained_ranges: list[tuple[int, int]] = []
        for k, atom in enumerate(atoms):
            start = len(ids)
            if atom.special:
                ids.append(self.special_ids[atom.text])
            else:
                ids.extend(self._drop_anchor(encoded[k]) if k in anchored else encoded[k])
                atom.string_start = self._prefix_at_start and k not in anchored
            atom.tokens = (start, len(ids))
            if atom.trained and len(ids) > start:
                if trained_ranges and trained_ranges[-1][1] == start:
                    trained_ranges[-1] = (trained_ranges[-1][0], len(ids))
                else:
                    trained_ranges.append((start, len(ids)))
        return ids, trained_ranges, atoms

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Plain text to ids: no special tokens added, none recognised in the text."""
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True).input_ids

    def _continues_text(self, atoms: list[_Atom], k: int) -> bool:
        """Whether plain atom k must be tokenized as text that continues (no prefix space),
        where tokenizing it alone would give it the prefix space of a string's start."""
        if not self._prefix_at_start or k == 0:
            return False  # the text's very start is tokenized as the tokenizer does any string
        if atoms[k - 1].special:
            return not self._prefix_after_special
        return True  # text cut at a turn boundary goes on from the text before the cut

    def _drop_anchor(self, ids: list[int]) -> list[int]:
        """The ids of anchored text without the anchor's own. Should the anchor have merged
        with the text, the ids are kept whole: the mask proof then names the example."""
        n = len(self._anchor_ids)
        return ids[n:] if ids[:n] == self._anchor_ids else ids

    def _probe_prefix_space(self) -> tuple[bool, bool]:
        """(does tokenizing text alone add a prefix space?, does the tokenizer add one after a
        special token too?), asked of the tokenizer itself. SentencePiece-style tokenizers add
        one at the start of a string; some (legacy Llama) after every special token too;
        byte-level BPE tokenizers add none."""
        probe = "Hello world"
        alone, anchored = self._ids([probe, ANCHOR + probe])
        if self._drop_anchor(anchored) == alone:
            return False, False
        tokenizer = self.tokenizer
        marker = tokenizer.eos_token or tokenizer.bos_token or next(iter(self.special_ids), None)
        if marker is None:
            return True, False
        after = tokenizer(marker + probe, add_special_tokens=False).input_ids
        return True, after[1:] == alone

    def _decodes_to(self, shown: str, atom: _Atom) -> bool:
        """Whether an atom's tokens, decoded in place, give back its text. A string's start
        may differ by the prefix space the tokenizer itself puts there (the same at
        inference): added after a special token (legacy Llama), or absorbing a space the
        text began with."""
        if shown == atom.text:
            return True
        if not atom.string_start:
            return False
        return shown == " " + atom.text or " " + shown == atom.text

    def _check(self, ids, atoms, trained_ranges, text, spans, conversation) -> None:
        """Prove the mask: every run of text decodes back from its tokens where they stand,
        and the runs of the tokens trained are exactly the text of the assistant spans."""
        problem = None
        shown_texts = texts_in_place(self.tokenizer, ids, [atom.tokens for atom in atoms])
        for atom, shown in zip(atoms, shown_texts, strict=True):
            if not self._decodes_to(shown, atom):
                problem = (
                    f"the tokens of {atom.text[:60]!r} decode to {shown[:60]!r}: they do not "
                    "decode back to the rendered text (a character the tokenizer cannot write?)"
                )
                break
        if problem is None and len(trained_ranges) != len(spans):
            problem = f"expected {len(spans)} trained spans, found {len(trained_ranges)}"
        if problem is None:
            for (t0, t1), (c0, c1) in zip(trained_ranges, spans, strict=True):
                inside = [a for a in atoms if t0 <= a.tokens[0] and a.tokens[1] <= t1]
                trained = "".join(a.text for a in inside)
                if trained != text[c0:c1]:
                    problem = f"trained tokens hold {trained!r}, expected {text[c0:c1]!r}"
                    break
        if problem:
            raise DataError(
                conversation.source,
                f"loss mask cannot be proven right with template '{self.template.name}': {problem}",
                field="messages",
            )


def texts_in_place(tokenizer, ids: list[int], ranges: list[tuple[int, int]]) -> list[str]:
    """The text each range of `ids` stands for where it is, decoded after a few tokens of
    context (a SentencePiece decoder drops the leading space of whatever it decodes first);
    all in one call to the tokenizer's decoder."""
    windows = []
    for start, end in ranges:
        first = max(0, start - 4)
        windows += [ids[first:end], ids[first:start]]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoded = backend.decode_batch(windows, skip_special_tokens=False)
    else:
        decoded = [
            tokenizer.decode(w, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for w in windows
        ]
    pairs = zip(decoded[::2], decoded[1::2], strict=True)
    return [through[len(before) :] for through, before in pairs]


def _merge_text_runs(atoms: list[_Atom]) -> list[_Atom]:
    """Join neighbouring plain-text atoms between the same two cuts, so text between two
    special tokens is tokenized as one run (as a tokenizer does with a whole prompt), but
    never across the start or end of an assistant turn."""
    merged: list[_Atom] = []
    for atom in atoms:
        prev = merged[-1] if merged else None
        if prev and not prev.special and not atom.special and prev.segment == atom.segment:
            prev.text += atom.text
        else:
            merged.append(_Atom(atom.text, atom.special, atom.trained, atom.segment))
    return merged


def fit_to_length(
    examples: list[Example], max_length: int, truncation: str, report: EncodingReport
) -> list[Example]:
    """Apply the max_length policy; every example cut or dropped is named in the report."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, not {truncation!r}")
    kept = []
    for ex in examples:
        report.max_tokens = max(report.max_tokens, len(ex.input_ids))
        if len(ex.input_ids) > max_length:
            if truncation == "drop":
                report.dropped_too_long.append(ex.source)
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.source)
            report.truncated.append(ex.source)
        if ex.trained_token_count == 0:
            report.dropped_nothing_trained.append(ex.source)
            continue
        kept.append(ex)
        report.examples += 1
        report.tokens += len(ex.input_ids)
        report.trained_tokens += ex.trained_token_count
    return kept
