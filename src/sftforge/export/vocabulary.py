"""The tokenizer a run trained with, as llama.cpp's GGUF keys describe one: its vocabulary and
merges, the kind of pre-tokenizer, its special tokens, the BOS/EOS rules the run's texts
followed, the chat template the run trained with, and each end-of-turn token marked as an
end of generation.

Read from the tokenizer's own tokenizer.json, so that the tokens llama.cpp gives the model are
the tokens it was trained on: a tokenizer whose splitting llama.cpp cannot reproduce is refused
by name rather than exported to tokenize differently."""

from __future__ import annotations

import json
from dataclasses import dataclass

import gguf

from sftforge.encode.encoder import Encoder
from sftforge.export.architectures import UnsupportedArchitecture

# Byte-level BPE vocabularies: the text-splitting regex of each pre-tokenizer llama.cpp knows
# by name (llama.cpp's `tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class Vocabulary:
    """Everything the GGUF says about tokens, computed once from the run's tokenizer."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    add_space_prefix: bool
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    end_of_turn_ids: tuple[int, ...]  # what ends an assistant turn, besides eos
    add_bos: bool
    chat_template: str

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_merges(self.merges)
        writer.add_add_space_prefix(self.add_space_prefix)
        for add, value in (
            (writer.add_bos_token_id, self.bos_id),
            (writer.add_eos_token_id, self.eos_id),
            (writer.add_unk_token_id, self.unk_id),
            (writer.add_pad_token_id, self.pad_id),
        ):
            if value is not None:
                add(value)
        # llama.cpp stops at eos, eot and eom: every end-of-turn token the run taught.
        writers = (writer.add_eot_token_id, writer.add_eom_token_id)
        for add, value in zip(writers, self.end_of_turn_ids, strict=False):  # at most two
            add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        writer.add_chat_template(self.chat_template)


def vocabulary_of(encoder: Encoder, rows: int) -> Vocabulary:
    """The GGUF vocabulary of the encoder's tokenizer, padded to the embedding's `rows`."""
    tokenizer = encoder.tokenizer
    described = json.loads(tokenizer.backend_tokenizer.to_str())
    model = described["model"]
    if model.get("type") != "BPE":
        raise UnsupportedArchitecture(
            f"cannot export a {model.get('type')} tokenizer to GGUF: only BPE tokenizers "
            "(byte-level, or SentencePiece-style with byte fallback) are exported"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > rows:
        raise UnsupportedArchitecture(
            f"the tokenizer has {len(by_id)} tokens but the model only {rows} embedding rows"
        )
    added = {t["id"]: t for t in described.get("added_tokens", [])}
    byte_level = _is_byte_level(described)
    tokens, types = [], []
    for index in range(rows):
        token = by_id.get(index)
        if token is None:  # rows the embedding has beyond the vocabulary (Qwen pads to 64)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(_token_type(token, added.get(index), model, byte_level))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    end_of_turn = tuple(i for i in encoder.stop_ids if i != tokenizer.eos_token_id)
    if len(end_of_turn) > 2:
        raise UnsupportedArchitecture(
            f"the template ends turns with {len(end_of_turn)} different tokens besides eos; "
            "GGUF can mark two (eot and eom)"
        )
    return Vocabulary(
        model="gpt2" if byte_level else "llama",
        pre=_pre_tokenizer_name(described) if byte_level else "default",
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=None if byte_level else _merge_scores(tokens, merges),
        merges=merges,
        add_space_prefix=_adds_space_prefix(described),
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        unk_id=tokenizer.unk_token_id,
        pad_id=encoder.pad_id,
        end_of_turn_ids=end_of_turn,
        add_bos=encoder.bos_id is not None,
        chat_template=encoder.template.source,
    )


def _components(part: dict | None) -> list[dict]:
    if not part:
        return []
    if part.get("type") == "Sequence":
        inner = part.get("pretokenizers") or part.get("normalizers") or []
        return [c for p in inner for c in _components(p)]
    return [part]


def _is_byte_level(described: dict) -> bool:
    return any(p["type"] == "ByteLevel" for p in _components(described.get("pre_tokenizer")))


def _pre_tokenizer_name(described: dict) -> str:
    """llama.cpp's name for the way this byte-level tokenizer splits text before merging."""
    parts = _components(described.get("pre_tokenizer"))
    kinds = [p["type"] for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    raise UnsupportedArchitecture(
        f"the tokenizer splits text with a pre-tokenizer llama.cpp has no name for ({kinds}); "
        "exporting it would make llama.cpp tokenize differently from training"
    )


def _adds_space_prefix(described: dict) -> bool:
    """SentencePiece's `▁` before the first word: a Metaspace that prepends, or a normalizer
    that does."""
    for part in _components(described.get("pre_tokenizer")):
        if part["type"] == "Metaspace" and part.get("prepend_scheme", "always") != "never":
            return True
    return any(p["type"] == "Prepend" for p in _components(described.get("normalizer")))


def _token_type(token: str, added: dict | None, model: dict, byte_level: bool) -> gguf.TokenType:
    if added is not None:
        if token == model.get("unk_token"):
            return gguf.TokenType.UNKNOWN
        return gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if not byte_level and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores: llama.cpp merges the pair whose result scores highest, so
    a token made by merge k scores -k and BPE's merge order is kept."""
    made_by: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        made_by.setdefault(merge.replace(" ", ""), rank)
    # A longer token no merge makes is one BPE never reaches: last in llama.cpp's order too.
    never = -float(len(merges) + 1)
    return [-float(made_by[t]) if t in made_by else (0.0 if len(t) == 1 else never) for t in tokens]
