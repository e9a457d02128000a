"""The tokenizer side of a model: loading its tokenizer, the special tokens its chat template
needs, and the Encoder that renders and tokenizes with that template."""

from __future__ import annotations

from pathlib import Path

from sftforge.console import say
from sftforge.encode.encoder import Encoder
from sftforge.encode.families import other_spellings
from sftforge.encode.render import ReasoningMode, TrainOn
from sftforge.encode.templates import ChatTemplate, TemplateError, resolve_template
from sftforge.models.loading import fit_new_token_rows
from sftforge.models.mistral_files import (
    load_mistral_tokenizer,
    mistral_common_proof,
    mistral_tokenizer_file,
)
from sftforge.models.source import (
    ModelNotFoundError,
    ModelSourceError,
    not_found_message,
    unreadable_tokenizer_model,
)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer in `path` (a folder or hub id), with its chat template. It loads from
    JSON (tokenizer.json, tokenizer_config.json), from a SentencePiece tokenizer.model
    (protobuf, read with the sentencepiece package) or a tiktoken file, and from Mistral's
    own files where a folder holds only those (models/mistral_files.py): nothing is
    unpickled."""
    from transformers import AutoTokenizer

    mistral_file = mistral_tokenizer_file(Path(path))
    if mistral_file is not None:
        return load_mistral_tokenizer(mistral_file)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if Path(path).exists():
            raise
        # A hub id that could not be fetched: no such repository, or no network.
        raise ModelNotFoundError(not_found_message(path, f" ({error})")) from error
    except (ValueError, ImportError) as error:
        folder = Path(path)
        if (folder / "tokenizer.json").is_file() or not (folder / "tokenizer.model").is_file():
            raise
        raise ModelSourceError(unreadable_tokenizer_model(folder, error)) from error


def add_missing_special_tokens(tokenizer, model, tokens: tuple[str, ...]) -> list[int]:
    """Give every special token a template writes its own id; return the ids that are new.

    Their rows start at the mean of the existing rows, in the input embeddings and in an
    untied output head: a neutral start, the same on every run (transformers' mean_resizing
    draws them at random around that mean). They must be trained, which `attach_lora`
    arranges even under LoRA."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        return []
    spelt_otherwise = other_spellings(missing, vocab)
    if spelt_otherwise:
        pairs = ", ".join(f"{t!r} (the vocabulary has {h!r})" for t, h in spelt_otherwise.items())
        raise TemplateError(
            f"the chat template writes {pairs}: the same token spelt another way. Adding it "
            "would give the model a new, untrained token where it knows its own; use the "
            "model's template or a built-in that spells it as the vocabulary does"
        )
    tokenizer.add_special_tokens({"additional_special_tokens": missing})
    new_ids = tokenizer.convert_tokens_to_ids(missing)
    if model is not None:
        fit_new_token_rows(model, tokenizer, new_ids)
    return new_ids


def text_side(
    tokenizer,
    template: str | ChatTemplate,
    train_on: TrainOn = "all_assistant_turns",
    model=None,
    model_type: str | None = None,
    reasoning: ReasoningMode = "train",
    template_options: dict | None = None,
) -> tuple[Encoder, list[int]]:
    """The encoder for `tokenizer` with the chat template `template` ("auto", a built-in name,
    a Jinja file, or another model's ChatTemplate), and the ids of special tokens added for it: those the template writes
    and the tokenizer lacks (`model`'s embeddings are resized to match, when given). The
    template is set on the tokenizer, so that a saved tokenizer renders as in training.
    `model_type` (else `model`'s) lets "auto" choose the family's template; `reasoning` and
    `template_options` are the encoder's (render.render_examples)."""
    if model_type is None and model is not None:
        model_type = getattr(model.config, "model_type", None)
    chosen = resolve_template(template, tokenizer, model_type)
    if chosen.reason:
        say(f"chat template: {chosen.name} ({chosen.reason})")
    new_ids = add_missing_special_tokens(tokenizer, model, chosen.extra_tokens)
    if new_ids:
        say(f"added {len(new_ids)} special tokens the template needs: {chosen.extra_tokens}")
    tokenizer.chat_template = chosen.source
    proof = mistral_common_proof(tokenizer, chosen.name)
    if proof is not None:
        say(f"each example is checked token for token against {proof.reference.name}")
    encoder = Encoder(tokenizer, chosen, train_on, reasoning, template_options, proof)
    return encoder, new_ids
