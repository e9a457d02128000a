"""Show examples token by token with trained tokens marked, to see the mask with your eyes."""

from __future__ import annotations

from .proof import texts_in_place
from .tokenize import IGNORE_INDEX, Example

_TRAINED = "\x1b[30;42m"  # black on green
_PROMPT = "\x1b[2m"  # dim
_ALT = "\x1b[4m"  # underline every other token so token boundaries show
_RESET = "\x1b[0m"


def visible(text: str) -> str:
    return text.replace("\n", "\\n\n").replace("\t", "\\t")


def format_example(tokenizer, example: Example, color: bool) -> str:
    """Colour: trained tokens on green, prompt dimmed, alternate tokens underlined.
    Plain: tokens separated by '|', trained runs wrapped in [[ ]]."""
    pieces = []
    in_trained = False
    texts = token_texts(tokenizer, example.input_ids)
    for k, label in enumerate(example.labels):
        text = visible(texts[k])
        trained = label != IGNORE_INDEX
        if color:
            style = (_TRAINED if trained else _PROMPT) + (_ALT if k % 2 else "")
            pieces.append(f"{style}{text}{_RESET}")
            continue
        if trained and not in_trained:
            pieces.append("[[")
        if not trained and in_trained:
            pieces.append("]]")
        pieces.append(text + "|")
        in_trained = trained
    if in_trained and not color:
        pieces.append("]]")
    return "".join(pieces)


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token where it stands (a SentencePiece token keeps its space)."""
    return texts_in_place(tokenizer, ids, [(k, k + 1) for k in range(len(ids))])


def example_counts(example: Example) -> str:
    return f"tokens: {len(example.input_ids)}, trained tokens: {example.trained_token_count}"
