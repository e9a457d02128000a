"""The family's own reference, to check sftforge's tokens against: what the family publishes
as the way to write a conversation, encoded to ids. Two kinds: a Jinja chat template (the
family's published one, from its tokenizer_config.json) rendered by transformers'
`apply_chat_template` and tokenized as transformers does; or mistral-common, Mistral's own
encoder, for a Mistral tokenizer file (tekken.json, tokenizer.model.vN).

A reference gives ids, not masks; its mask is found the way the families define an
assistant turn: the tokens from where the reference's generation prompt for the messages
before the turn ends, through the turn's last token that is not whitespace (its end-of-turn
marker), wherever that prompt and the turn are prefixes of the whole sequence.

`compare` lines up sftforge's examples of a conversation with the reference's and names the
first token where they differ; `inspect --reference` shows it (encode/inspection.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sftforge.data.messages import Conversation
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.encode.slots import template_messages


class JinjaReference:
    """A published Jinja chat template, rendered by transformers on `tokenizer`, with
    `options` as its variables (`date_string`, `enable_thinking`)."""

    def __init__(self, source: str, tokenizer, name: str = "jinja", options: dict | None = None):
        self.source, self.tokenizer, self.name = source, tokenizer, name
        self.options = options or {}

    def ids(self, messages: list[dict], tools: list[dict] | None, prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.source,
            tokenize=False,
            add_generation_prompt=prompt,
            **self.options,
        )
        return self.tokenizer(text, add_special_tokens=False).input_ids


class MistralCommonReference:
    """mistral-common's encoder for a Mistral tokenizer file: ids as Mistral's own code
    writes them (a conversation ending with an assistant turn in its fine-tuning mode, a
    prompt in its serving mode)."""

    def __init__(self, path: Path | str):
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.name = f"mistral-common ({Path(path).name})"
        self._training = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
        self._serving = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)

    def ids(self, messages: list[dict], tools: list[dict] | None, prompt: bool) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest.from_openai(messages, tools=tools)
        encoder = self._serving if prompt else self._training
        return encoder.encode_chat_completion(request).tokens


def reference_for(choice: str, tokenizer):
    """The reference `choice` names: a Jinja file, or a Mistral tokenizer file (tekken.json,
    tokenizer.model.vN) for mistral-common."""
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(
            f"reference {choice!r}: no such file (a Jinja template, or a "
            "Mistral tokenizer file for mistral-common)"
        )
    if path.suffix == ".jinja":
        return JinjaReference(path.read_text("utf-8"), tokenizer, path.name)
    return MistralCommonReference(path)


@dataclass
class ReferenceExample:
    input_ids: list[int]
    labels: list[int]
    messages: int  # how many of the conversation's messages it holds


def reference_example(reference, tokenizer, messages: list[dict], tools=None) -> ReferenceExample:
    """The reference's ids for `messages` (ending with an assistant turn), and its mask;
    `tokenizer` (the same vocabulary) tells whitespace tokens after a turn's marker."""
    ids = reference.ids(messages, tools, prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = reference.ids(messages[:turn], tools, prompt=True)
        through = reference.ids(messages[: turn + 1], tools, prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            continue  # written otherwise once later turns follow: not trained here
        end = len(through)
        while end > len(before) and not tokenizer.decode(through[end - 1 : end]).strip():
            end -= 1
        labels[len(before) : end] = ids[len(before) : end]
    return ReferenceExample(ids, labels, len(messages))


@dataclass
class ExampleComparison:
    ours: Example
    theirs: ReferenceExample
    first_difference: int | None  # the first token whose id or trained flag differs

    @property
    def equal(self) -> bool:
        return self.first_difference is None


def compare(encoder, reference, conversation: Conversation) -> list[ExampleComparison]:
    """Each of sftforge's examples of `conversation` beside the reference's for the same
    messages (the conversation cut after the assistant turn whose reference agrees with it
    longest), and the first token where ids or mask differ."""
    examples = encoder.encode_examples(conversation)
    return compare_examples(reference, encoder.tokenizer, conversation, examples)


def compare_examples(reference, tokenizer, conversation, examples) -> list[ExampleComparison]:
    """`compare` for examples already made."""
    messages = template_messages(conversation.messages)
    tools = list(conversation.tools) or None
    cuts = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
    prefixes = _Prefixes(reference)
    candidates = [reference_example(prefixes, tokenizer, messages[:k], tools) for k in cuts]
    if not candidates:
        return []
    comparisons = []
    for ours in examples:
        theirs = max(
            candidates,
            key=lambda c: (_agreeing(ours, c), -abs(len(c.input_ids) - len(ours.input_ids))),
        )
        comparisons.append(ExampleComparison(ours, theirs, _first_difference(ours, theirs)))
    return comparisons


class _Prefixes:
    """The reference's ids for prefixes of one conversation, each prefix encoded once (a
    conversation's candidates share them)."""

    def __init__(self, reference):
        self.reference, self.name, self._ids = reference, reference.name, {}

    def ids(self, messages: list[dict], tools, prompt: bool) -> list[int]:
        key = (len(messages), prompt)
        if key not in self._ids:
            self._ids[key] = self.reference.ids(messages, tools, prompt)
        return self._ids[key]


def _first_difference(ours: Example, theirs: ReferenceExample) -> int | None:
    agreeing = _agreeing(ours, theirs)
    same_length = len(ours.input_ids) == len(theirs.input_ids)
    return None if agreeing == len(ours.input_ids) and same_length else agreeing


def _agreeing(ours: Example, theirs: ReferenceExample) -> int:
    """How many tokens from the start agree in id and in being trained."""
    pairs = zip(ours.input_ids, ours.labels, theirs.input_ids, theirs.labels, strict=False)
    for k, (our_id, our_label, their_id, their_label) in enumerate(pairs):
        trained_alike = (our_label == IGNORE_INDEX) == (their_label == IGNORE_INDEX)
        if our_id != their_id or not trained_alike:
            return k
    return min(len(ours.input_ids), len(theirs.input_ids))


def side_by_side(tokenizer, comparison: ExampleComparison, context: int = 6) -> str:
    """Two lines, sftforge's tokens and the reference's, from a few tokens before the first
    difference, the first differing token in >> <<, trained tokens in [[ ]]."""
    if comparison.first_difference is None:
        return "reference: the same ids and the same mask"
    at = comparison.first_difference
    ours, theirs = _rows(tokenizer, comparison, context)
    return f"reference differs at token {at}:\n  sftforge  {ours}\n  reference {theirs}"


def _rows(tokenizer, comparison: ExampleComparison, context: int) -> tuple[str, str]:
    at = comparison.first_difference
    start = max(0, at - context)
    rows = []
    for example in (comparison.ours, comparison.theirs):
        ids, labels = example.input_ids, example.labels
        shown = []
        for k in range(start, min(len(ids), at + context)):
            text = repr(tokenizer.convert_ids_to_tokens(ids[k]))[1:-1]
            text = f"[[{text}]]" if labels[k] != IGNORE_INDEX else text
            shown.append(f">>{text}<<" if k == at else text)
        end = "" if len(ids) > at else " (ends here)"
        rows.append(f"@{start}: {'|'.join(shown)}{end}")
    return rows[0], rows[1]


class ReferenceProof:
    """Part of each example's proof where the family's reference is at hand (a tokenizer
    read from Mistral's own files, checked by mistral-common): an example whose ids or mask
    differ from the reference's is refused, naming the first token that differs."""

    def __init__(self, reference):
        self.reference = reference

    def problem(self, encoder, conversation: Conversation, examples) -> str | None:
        """Why `examples` (or the DataError in their place) differ from the reference's."""
        if conversation.is_raw_text or not isinstance(examples, list):
            return None
        tokenizer = encoder.tokenizer
        for compared in compare_examples(self.reference, tokenizer, conversation, examples):
            if not compared.equal:
                ours, theirs = _rows(tokenizer, compared, context=4)
                return (
                    f"differs from its family's reference, {self.reference.name}, at token "
                    f"{compared.first_difference} (in >> <<): sftforge {ours}; the reference "
                    f"{theirs}: the record is refused, its tokens are not those the family's own "
                    "encoder writes"
                )
        return None
