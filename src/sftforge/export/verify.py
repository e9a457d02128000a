"""An export checked before it is called done, by reading it back the way another program
would: transformers' GGUF loader builds the model and tokenizer from the file alone.

- metadata: architecture, BOS/EOS/end-of-turn ids, the BOS rule, the chat template;
- the template as the file's tokenizer renders it equals the run's, on every test prompt;
- the file's tokenizer gives the run's tokens for every rendered prompt;
- the logits of the file's model agree with the source model's on those prompts, within
  what the type's rounding explains (the mean KL divergence of the next-token distributions)."""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from sftforge.data.messages import Message
from sftforge.encode.encoder import Encoder
from sftforge.encode.slots import template_messages
from sftforge.errors import SftforgeError
from sftforge.export.vocabulary import Vocabulary

# The most the file's next-token distributions may differ from the source model's: the mean
# KL divergence (nats) over every prompt position, by what each type's rounding gives on the
# SmolLM2, Gemma 3 and tiny Qwen3 exports (docs/benchmarks.md) with room to spare.
KL_CEILING = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}
K_QUANT_KL_CEILING = 0.25

# Conversation shapes every export is checked on, besides the run's own held-out prompts.
PROBES: tuple[tuple[Message, ...], ...] = (
    (Message("user", "What is the capital of France?"),),
    (
        Message("system", "You are a terse assistant."),
        Message("user", "Name three primary colours."),
    ),
    (
        Message("user", "Hi! Can you help me plan a trip?"),
        Message("assistant", "Of course. Where would you like to go?"),
        Message("user", "Lisbon, for 3 days in May 2027."),
    ),
)


class ExportCheckFailed(SftforgeError):
    """The written file does not reproduce the run: the message says what differs, and
    `verification` holds what reading it back showed."""

    def __init__(self, message: str, verification: Verification | None = None):
        super().__init__(message)
        self.verification = verification


@dataclass
class Verification:
    """What reading the file back showed."""

    prompts: int
    positions: int
    mean_kl: float  # mean KL(source || file) of the next-token distributions, in nats
    top1_agreement: float  # share of positions with the same most likely next token
    max_logit_diff: float  # largest |logit difference| at the prompts' last positions
    template_equal: bool
    tokens_equal: bool
    metadata: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (
            f"{self.prompts} prompts, {self.positions} positions: mean KL {self.mean_kl:.2g} "
            f"nats, top-1 agreement {self.top1_agreement:.1%}, max |Δlogit| at the last position "
            f"{self.max_logit_diff:.3g}; template {'equal' if self.template_equal else 'DIFFERS'}; "
            f"tokens {'equal' if self.tokens_equal else 'DIFFER'}"
        )


METADATA_KEYS = {  # what `read_metadata` gives: the GGUF key, and our name for it
    "general.architecture": "architecture",
    "general.file_type": "file_type",
    "tokenizer.ggml.model": "tokenizer",
    "tokenizer.ggml.pre": "pre_tokenizer",
    "tokenizer.ggml.bos_token_id": "bos_id",
    "tokenizer.ggml.eos_token_id": "eos_id",
    "tokenizer.ggml.eot_token_id": "eot_id",
    "tokenizer.ggml.eom_token_id": "eom_id",
    "tokenizer.ggml.padding_token_id": "pad_id",
    "tokenizer.ggml.add_bos_token": "add_bos",
    "tokenizer.chat_template": "chat_template",
}


def verify_export(
    path: Path,
    model: torch.nn.Module,
    encoder: Encoder,
    vocabulary: Vocabulary,
    quant: str,
    prompts: list[tuple[Message, ...]],
) -> Verification:
    """Read `path` back and compare it with the model and encoder it was written from."""
    metadata = read_metadata(path)
    problems = _metadata_problems(metadata, vocabulary)
    read_tokenizer, read_model = _read_back(path)
    template = encoder.template
    all_prompts = list(PROBES) + list(prompts)
    template_equal = tokens_equal = True
    agree = positions = 0
    max_diff = kl_sum = 0.0
    for messages in all_prompts:
        dicts = template_messages(tuple(messages))
        ours = template.render(dicts, add_generation_prompt=True)
        theirs = read_tokenizer.apply_chat_template(
            dicts, tokenize=False, add_generation_prompt=True
        )
        if theirs != ours and template_equal:
            template_equal = False
            problems.append(
                f"the file's template renders {theirs!r} where the run's renders {ours!r}"
            )
        run_ids = encoder.tokenizer(ours, add_special_tokens=False)["input_ids"]
        read_ids = read_tokenizer(ours, add_special_tokens=False)["input_ids"]
        if run_ids != read_ids and tokens_equal:
            tokens_equal = False
            problems.append(
                f"the file's tokenizer splits {ours!r} differently: {read_ids} != {run_ids}"
            )
        ids = torch.tensor([encoder.encode_prompt(messages)])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0].float()
            got = read_model(input_ids=ids).logits[0].float()
        agree += int((expected.argmax(-1) == got.argmax(-1)).sum())
        kl_sum += float(
            torch.nn.functional.kl_div(
                got.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="sum"
            )
        )
        positions += ids.shape[1]
        max_diff = max(max_diff, float((expected[-1] - got[-1]).abs().max()))
    mean_kl = kl_sum / positions
    ceiling = KL_CEILING.get(quant, K_QUANT_KL_CEILING)
    if mean_kl > ceiling:
        problems.append(
            f"the file's next-token distributions differ from the source model's by a mean KL "
            f"of {mean_kl:.3g} nats; {quant}'s rounding explains up to {ceiling:g}"
        )
    return Verification(
        prompts=len(all_prompts),
        positions=positions,
        mean_kl=mean_kl,
        top1_agreement=agree / positions,
        max_logit_diff=max_diff,
        template_equal=template_equal,
        tokens_equal=tokens_equal,
        metadata=metadata,
        problems=problems,
    )


def _read_back(path: Path):
    """The tokenizer and model transformers builds from the file, as `from_pretrained(...,
    gguf_file=...)` does, with the config read once and handed to both: each read of it parses
    the whole file with gguf's GGUFReader (23 s for Gemma 3's 262k-token vocabulary), and the
    tokenizer and the model would each read it again."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    # From a folder holding the file alone: beside a run's adapter_config.json, transformers
    # would look for the file in the adapter's base model folder instead.
    with tempfile.TemporaryDirectory(prefix="sftforge-read-back-") as alone:
        (Path(alone) / path.name).symlink_to(path.resolve())
        with contextlib.redirect_stdout(io.StringIO()):
            config = AutoConfig.from_pretrained(alone, gguf_file=path.name)
            # The class AutoTokenizer picks for this config: the generic backend where none is
            # registered for the model type (llama), else the registered one (Qwen3, Gemma 3);
            # AutoTokenizer itself (a third read) where it decides more (mistral-common's).
            registered = TOKENIZER_MAPPING_NAMES.get(config.model_type)
            if registered is None:
                tokenizer = TokenizersBackend.from_pretrained(alone, gguf_file=path.name)
            elif registered == "MistralCommonBackend":
                tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=path.name)
            else:
                tokenizer = AutoTokenizer.from_pretrained(
                    alone, gguf_file=path.name, tokenizer_type=config.model_type
                )
            model = AutoModelForCausalLM.from_pretrained(
                alone, gguf_file=path.name, config=config, dtype=torch.float32
            ).eval()
    return tokenizer, model


def read_metadata(path: Path) -> dict:
    """The keys a runtime acts on, as the file states them: read by transformers' GGUF
    metadata reader, which skips over the vocabulary (gguf's GGUFReader parses each of its
    strings into an array view: 37 s for Gemma 3's 262k tokens, against under a second)."""
    try:
        from transformers.integrations.gguf import read_gguf_metadata
    except ImportError:  # an older transformers 5
        return _read_metadata_with_gguf(path)
    metadata, _ = read_gguf_metadata(str(path))
    found = {name: metadata[key] for key, name in METADATA_KEYS.items() if key in metadata}
    found["tokens"] = metadata["tokenizer.ggml.tokens"]  # a string array not kept: its count
    return found


def _read_metadata_with_gguf(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    found = {}
    for key, name in METADATA_KEYS.items():
        if key in reader.fields:
            found[name] = reader.fields[key].contents()
    found["tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return found


def _metadata_problems(found: dict, vocabulary: Vocabulary) -> list[str]:
    expected = {
        "bos_id": vocabulary.bos_id,
        "eos_id": vocabulary.eos_id,
        "eot_id": vocabulary.end_of_turn_ids[0] if vocabulary.end_of_turn_ids else None,
        "add_bos": vocabulary.add_bos,
        "chat_template": vocabulary.chat_template,
        "tokens": len(vocabulary.tokens),
    }
    return [
        f"the file states {name} = {found.get(name)!r}, the run {value!r}"
        for name, value in expected.items()
        if found.get(name) != value
    ]
