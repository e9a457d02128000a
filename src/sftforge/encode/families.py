"""Which family a tokenizer belongs to, for `template: auto` and `template: mistral`, from
what its vocabulary already holds: the family's own turn tokens, and for Mistral the control
tokens and prefix spaces that tell its tokenizer versions apart. And the other spellings of
a special token (`<|User|>` for DeepSeek's `<｜User｜>`), so a template never adds a token the
vocabulary already holds under another spelling."""

from __future__ import annotations

import unicodedata

# The built-in whose turn tokens a vocabulary holds, tried in this order.
TURN_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3.1": ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>", "<|eom_id|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "deepseek": ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
}

# The family's built-in from the model's type, when the vocabulary holds no turn tokens.
FAMILY_OF_MODEL_TYPE = {"llama": "llama2", "mistral": "mistral", "mixtral": "mistral"}

# The Mistral tokenizer version a tokenizer read from Mistral's own files carries in its
# settings (models/mistral_files.py).
MISTRAL_VERSION_KEY = "mistral_version"

MISTRAL_VERSIONS = (
    "mistral-v1",
    "mistral-v3",
    "mistral-v3-tekken",
    "mistral-v7",
    "mistral-v7-tekken",
)


def family_template(tokenizer, model_type: str | None) -> tuple[str, str]:
    """(built-in template, why) for a tokenizer without a template of its own: the family
    whose turn tokens its vocabulary holds (Mistral's [INST] included), else the family of
    `model_type`, else ChatML."""
    if MISTRAL_VERSION_KEY in tokenizer.init_kwargs:
        return mistral_version(tokenizer)
    vocab = tokenizer.get_vocab()
    for name, tokens in TURN_TOKENS.items():
        if all(token in vocab for token in tokens):
            return name, f"the tokenizer has no template; its vocabulary holds {', '.join(tokens)}"
    if "[INST]" in vocab and "[/INST]" in vocab:
        return mistral_version(tokenizer)
    if model_type in FAMILY_OF_MODEL_TYPE:
        name = FAMILY_OF_MODEL_TYPE[model_type]
        if name == "mistral":
            return mistral_version(tokenizer)
        return name, f"the tokenizer has no template; the model is a {model_type}"
    return "chatml", "the tokenizer has no template, nor its vocabulary turn tokens: ChatML"


def mistral_version(tokenizer) -> tuple[str, str]:
    """(the Mistral built-in for this tokenizer's version, why), as mistral-common tells its
    versions apart: the version a tokenizer read from Mistral's files carries; else no [INST]
    control token is v1, [SYSTEM_PROMPT] v7, and otherwise v2/v3. A vocabulary that gives
    text no SentencePiece prefix space is tekken."""
    vocab = tokenizer.get_vocab()
    version = tokenizer.init_kwargs.get(MISTRAL_VERSION_KEY)
    if version is None:
        version = 1 if "[INST]" not in vocab else 7 if "[SYSTEM_PROMPT]" in vocab else 3
    if version == 1:
        return "mistral-v1", "Mistral tokenizer v1: [INST] is plain text"
    tekken = not _sentencepiece_like(tokenizer)
    kind = "tekken" if tekken else "SentencePiece"
    if version >= 7:
        name = "mistral-v7-tekken" if tekken else "mistral-v7"
        return name, f"Mistral tokenizer v7 ({kind}): [SYSTEM_PROMPT] and [INST] tokens"
    name = "mistral-v3-tekken" if tekken else "mistral-v3"
    return name, f"Mistral tokenizer v2/v3 ({kind}): [INST] tokens"


def _sentencepiece_like(tokenizer) -> bool:
    """Whether the tokenizer writes words with SentencePiece's "▁" (Mistral's .model files)
    rather than as bytes (tekken)."""
    ids = tokenizer("the", add_special_tokens=False).input_ids
    return any("▁" in token for token in tokenizer.convert_ids_to_tokens(ids))


def spelling_key(token: str) -> str:
    """A special token with its spelling taken away: full-width characters as ASCII (NFKC),
    SentencePiece's "▁" and "_" as spaces. `<｜end▁of▁sentence｜>` and `<|end_of_sentence|>`
    share one."""
    return unicodedata.normalize("NFKC", token).replace("▁", " ").replace("_", " ")


def other_spellings(tokens, vocab) -> dict[str, str]:
    """{token a template writes: the vocabulary's other spelling of it} for each of `tokens`
    the vocabulary lacks as written but holds spelt another way."""
    wanted = {spelling_key(t): t for t in tokens if t not in vocab}
    if not wanted:
        return {}
    found = {}
    for held in vocab:
        token = wanted.get(spelling_key(held))
        if token is not None and held != token:
            found[token] = held
    return found
