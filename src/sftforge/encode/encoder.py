"""Rendered pieces -> input_ids + labels, built in lockstep, exact and checked.

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
- Each piece's ids and labels are appended together: labels are the input ids on trained
  tokens and -100 elsewhere (not shifted: the loss does that). Each example is then checked: every run of text decodes back from its tokens where
  they stand (in context: a SentencePiece decoder drops the leading space of whatever it
  decodes first), and the trained tokens are exactly the runs of the assistant turns, whose
  text is the answer plus its end-of-turn marker, which is one of the stop tokens. A mask
  that cannot be proven is an error.
- The stop tokens (what ends an assistant turn, plus eos) and the pad id are facts of the
  template and the tokenizer: the Encoder works them out once, when it is built, and every
  later stage (generation, saving) reads them from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from sftforge.data.messages import Conversation, DataError, Message, Source
from sftforge.encode.atoms import (
    Atom,
    field_of,
    merge_text_runs,
    refuse_special_text_in_structure,
    remember,
)
from sftforge.encode.proof import decode_all, decode_windows, mask_problem, texts_of, trained_runs
from sftforge.encode.render import Piece, ReasoningMode, TrainOn, render_examples, render_prompt
from sftforge.encode.templates import ChatTemplate, TemplateError
from sftforge.errors import InputError

IGNORE_INDEX = -100
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
        """Tokens whose prediction is trained: labelled tokens after the first, which nothing
        comes before to predict it from (the count the loss divides by)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


# One-turn conversations rendered once to learn the template's end-of-turn token; the second
# for a template that wants a system message.
_PROBES = (
    Conversation(Source("probe"), (Message("user", "Hi"), Message("assistant", "Hello"))),
    Conversation(
        Source("probe"),
        (Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello")),
    ),
)


class Encoder:
    """Turns Conversations into Examples with one tokenizer and one chat template, and knows
    the stop ids and the pad id they imply."""

    def __init__(
        self,
        tokenizer,
        template: ChatTemplate,
        train_on: TrainOn = "all_assistant_turns",
        reasoning: ReasoningMode = "train",
        template_options: dict | None = None,
        reference=None,  # encode/reference.py's ReferenceProof: each example checked by it
    ):
        for name, value, allowed in (
            ("train_on", train_on, get_args(TrainOn)),
            ("reasoning", reasoning, get_args(ReasoningMode)),
        ):
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.reasoning = reasoning
        self.template_options = dict(template_options or {})
        self.reference = reference
        self.special_ids: dict[str, int] = dict(tokenizer.get_added_vocab())
        for tok in (tokenizer.eos_token, tokenizer.bos_token):
            if tok and tok not in self.special_ids:
                self.special_ids[tok] = tokenizer.convert_tokens_to_ids(tok)
        self._end_markers = set(self.special_ids)  # what may end an assistant turn's text
        by_length = sorted(self.special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(re.escape(t) for t in by_length) or "(?!)")
        self._splits: dict[str, list[tuple[str, bool]]] = {}  # template text -> its split
        self._template_ids: dict[str, list[int]] = {}  # template text as tokenized -> ids
        self._anchor_ids = self._ids([ANCHOR])[0]
        self._prefix_at_start, self._prefix_after_special = self._probe_prefix_space()
        eos = tokenizer.eos_token_id
        # What ends an assistant turn: the template's end-of-turn token, and eos.
        self.stop_ids: tuple[int, ...] = tuple(
            sorted(self._end_of_turn_ids() | ({eos} if eos is not None else set()))
        )
        pad = tokenizer.pad_token_id
        fallback = eos if eos is not None else (self.stop_ids[0] if self.stop_ids else 0)
        self.pad_id: int = pad if pad is not None else fallback
        # Every text starts with exactly one BOS where the model expects one.
        self.bos_id: int | None = tokenizer.bos_token_id if template.expects_bos else None

    # ---- public -------------------------------------------------------------------------

    def encode(self, conversation: Conversation) -> Example:
        """Tokens and labels for a conversation that makes one example; raises DataError
        naming its source (also where its template makes it several: `encode_examples`)."""
        examples = self.encode_examples(conversation)
        if len(examples) != 1:
            reason = f"makes {len(examples)} examples (its template rewrites history)"
            raise DataError(conversation.source, reason + "; use encode_examples", "messages")
        return examples[0]

    def encode_examples(self, conversation: Conversation) -> list[Example]:
        """The examples of one conversation (several where its template rewrites history:
        render.render_examples); raises DataError naming its source."""
        (result,) = self.encode_many([conversation])
        if isinstance(result, DataError):
            raise result
        return result

    def encode_many(self, conversations: list[Conversation]) -> list[list[Example] | DataError]:
        """`encode_examples` for each conversation, the DataError in place of the examples
        it cannot become. The same results, faster: one call to the tokenizer and one to its
        decoder for all of them (each call costs about a millisecond beyond its work, more
        than a conversation's own tokenizing and decoding)."""
        results: list[list[Example] | DataError] = [[] for _ in conversations]
        staged, texts, from_template = [], [], []
        for k, conversation in enumerate(conversations):
            try:
                if conversation.is_raw_text:
                    results[k] = [self._encode_raw_text(conversation)]
                    continue
                refuse_special_text_in_structure(conversation, self._special_pattern)
                renders = render_examples(
                    conversation,
                    self.template,
                    self._end_markers,
                    self.train_on,
                    self.reasoning,
                    self.template_options,
                )
            except TemplateError as e:
                results[k] = DataError(conversation.source, str(e), field=field_of(conversation))
                continue
            except DataError as e:
                results[k] = e
                continue
            for rendered in renders:
                atoms = self._atoms(rendered.pieces)
                anchored, plain_texts = self._plain_texts(atoms)
                staged.append((k, rendered, atoms, anchored, len(texts), len(plain_texts)))
                texts += plain_texts
                from_template += [a.from_template for a in atoms if not a.special]
        encoded = self._ids_remembering_template(texts, from_template)
        assembled, windows = [], []
        for k, rendered, atoms, anchored, at, count in staged:
            ids, labels = self._assemble(atoms, anchored, encoded[at : at + count])
            assembled.append((k, rendered, atoms, ids, labels, len(windows), count))
            windows += decode_windows(ids, [atom.tokens for atom in atoms if not atom.special])
        decoded = decode_all(self.tokenizer, windows)
        for k, rendered, atoms, ids, labels, at, plain in assembled:
            shown = texts_of(decoded[at : at + 2 * plain])
            if isinstance(results[k], DataError):
                continue  # an earlier example of the same conversation failed its proof
            problem = self._check(ids, labels, atoms, rendered, shown)
            source = conversations[k].source
            if problem:
                results[k] = DataError(
                    source,
                    f"loss mask cannot be proven right with template '{self.template.name}': "
                    f"{problem}",
                    field=field_of(conversations[k]),
                )
            else:
                results[k].append(Example(ids, labels, str(source)))
        for k, conversation in [] if self.reference is None else enumerate(conversations):
            problem = self.reference.problem(self, conversation, results[k])
            if problem:  # the family's reference writes it otherwise (encode/reference.py)
                results[k] = DataError(conversation.source, problem, field_of(conversation))
        return results

    def encode_prompt(
        self,
        messages: list[Message] | tuple[Message, ...],
        tools: tuple[dict, ...] = (),
        options: dict | None = None,
    ) -> list[int]:
        """The ids a model is given at inference: history plus generation prompt, with the
        tools offered and the template's options (the config's, then `options`)."""
        options = {**self.template_options, **(options or {})}
        rendered = render_prompt(messages, self.template, self._end_markers, tools, options)
        ids, _ = self._tokenize(self._atoms(rendered.pieces))
        if problem := self._bos_problem(ids):
            raise TemplateError(f"chat template '{self.template.name}': {problem}")
        return ids

    def text_ids(self, text: str) -> list[int]:
        """Plain text (no template) as the model reads it: BOS first where it expects one,
        special-token text kept as characters."""
        ids = self._ids([text])[0]
        return [self.bos_id, *ids] if self.bos_id is not None else ids

    # ---- internals ----------------------------------------------------------------------

    def _encode_raw_text(self, conversation: Conversation) -> Example:
        ids = self.text_ids(conversation.text)
        eos = self.tokenizer.eos_token_id
        if eos is not None:
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

    def _end_of_turn_ids(self) -> set[int]:
        """The token that closes an assistant turn in this template, from a probe."""
        for probe in _PROBES:
            try:
                (rendered,) = render_examples(probe, self.template, self._end_markers)
            except TemplateError:
                continue  # e.g. a template that requires a system message: try the next
            ids, labels = self._tokenize(self._atoms(rendered.pieces))
            return {ids[end - 1] for _, end in trained_runs(labels, IGNORE_INDEX)}
        return set()

    def _atoms(self, pieces: list[Piece]) -> list[Atom]:
        """Message text as it is; template text split at the special tokens it wrote; then
        neighbouring plain text between the same two cuts joined into one run."""
        atoms: list[Atom] = []
        for piece in pieces:
            if piece.is_content:
                atoms.append(Atom(piece.text, False, piece.trained, piece.segment, False))
            else:
                atoms.extend(self._split_special(piece.text, piece.trained, piece.segment))
        return merge_text_runs(atoms)

    def _split_special(self, text: str, trained: bool, segment: int) -> list[Atom]:
        """Template text: special tokens the template wrote become their ids. (The same few
        template texts come back in every conversation: their split is remembered.)"""
        split = self._splits.get(text)
        if split is None:
            split, pos = [], 0
            for m in self._special_pattern.finditer(text):
                if m.start() > pos:
                    split.append((text[pos : m.start()], False))
                split.append((m.group(0), True))
                pos = m.end()
            if pos < len(text):
                split.append((text[pos:], False))
            remember(self._splits, text, split)
        return [Atom(part, special, trained, segment, True) for part, special in split]

    def _tokenize(self, atoms: list[Atom]) -> tuple[list[int], list[int]]:
        """Ids and labels of the atoms, appended together; each atom learns its tokens."""
        anchored, texts = self._plain_texts(atoms)
        return self._assemble(atoms, anchored, self._ids(texts) if texts else [])

    def _plain_texts(self, atoms: list[Atom]) -> tuple[set[int], list[str]]:
        """(the plain atoms tokenized behind the anchor, the texts to tokenize: one per plain
        atom, in order)."""
        plain = [k for k, a in enumerate(atoms) if not a.special]
        anchored = {k for k in plain if self._continues_text(atoms, k)}
        return anchored, [ANCHOR + atoms[k].text if k in anchored else atoms[k].text for k in plain]

    def _assemble(self, atoms: list[Atom], anchored: set[int], encoded: list[list[int]]):
        """Ids and labels from the plain atoms' `encoded` texts (`_plain_texts`)."""
        plain_ids = iter(encoded)
        ids: list[int] = []
        labels: list[int] = []
        at = 0
        for k, atom in enumerate(atoms):
            if atom.special:
                tokens = [self.special_ids[atom.text]]
            else:
                tokens = next(plain_ids)
                if k in anchored:
                    tokens = self._drop_anchor(tokens)
                atom.string_start = self._prefix_at_start and k not in anchored
            end = at + len(tokens)
            atom.tokens = (at, end)
            at = end
            ids += tokens
            labels += tokens if atom.trained else [IGNORE_INDEX] * len(tokens)
        return ids, labels

    def _ids_remembering_template(
        self, texts: list[str], from_template: list[bool]
    ) -> list[list[int]]:
        """`_ids(texts)`, where the ids of a template's own text (`from_template`: the same
        text in conversation after conversation, a default system prompt maybe) are
        tokenized once and then remembered. A text's ids depend on nothing but the text."""
        remembered = self._template_ids
        result = [
            remembered.get(t) if f else None for t, f in zip(texts, from_template, strict=True)
        ]
        todo = [k for k, ids in enumerate(result) if ids is None]
        for k, ids in zip(todo, self._ids([texts[k] for k in todo]) if todo else [], strict=True):
            result[k] = ids
            if from_template[k]:
                remember(remembered, texts[k], ids)
        return result

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Plain text to ids: no special tokens added, none recognised in the text. A fast
        tokenizer's backend is asked directly, as transformers itself does (a fraction of
        the time: its wrapper builds a dict per text), when it neither truncates nor pads."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return self.tokenizer(
                texts, add_special_tokens=False, split_special_tokens=True
            ).input_ids
        recognised = backend.encode_special_tokens
        backend.encode_special_tokens = True  # special-token text is text, as above
        try:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = recognised

    def _continues_text(self, atoms: list[Atom], k: int) -> bool:
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

    def _check(self, ids, labels, atoms, rendered, shown_texts) -> str | None:
        """Prove the mask (proof.mask_problem), and that the text starts with exactly one
        BOS where the model expects one; or say why it cannot be proven."""
        if problem := self._bos_problem(ids):
            return problem
        stops = self.stop_ids if self.train_on != "all_tokens" else None
        return mask_problem(
            ids, labels, atoms, rendered, shown_texts, IGNORE_INDEX, stops, self.tokenizer
        )

    def _bos_problem(self, ids: list[int]) -> str | None:
        if self.bos_id is None or (ids[:1] == [self.bos_id] and ids[1:2] != [self.bos_id]):
            return None
        count = next((k for k, t in enumerate(ids) if t != self.bos_id), len(ids))
        bos = self.tokenizer.bos_token
        return (
            f"the text starts with {count} BOS tokens ({bos!r}), not exactly one: the model "
            "expects one BOS first; use a template that writes it once, or none (sftforge "
            "then writes it)"
        )
