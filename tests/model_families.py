"""Stand-ins for model families other than SmolLM2's, built locally in well under a second.

SmolLM2 is a forgiving case: a byte-level BPE tokenizer that adds no BOS, whose eos is its
end-of-turn token and its pad, and a head tied to the embeddings. The fixtures here bring
what it lacks:

- a SentencePiece-style tokenizer as transformers 5 builds it for Llama 2 and Mistral: BPE
  with byte fallback, a `▁` prefix space before the start of a string (and, in its legacy
  form, after every special token), `<unk>`/`<s>`/`</s>`, a BOS added to every encoded
  string, and Llama-2-chat's own chat template (which trims messages and ends assistant
  turns with eos);
- a Gemma-like tokenizer: a BOS added to every string, eos `<eos>` that is not the
  end-of-turn token, the family's own turn tokens `<start_of_turn>`/`<end_of_turn>` in its
  vocabulary, no chat template (a base model), and optionally a 262k-row vocabulary;
- tiny Llama models with a tied or an untied output head, a tiny Gemma 3 and a tiny Qwen3.

The tokenizer is trained on the bundled demo data and reference corpus, so its vocabulary
covers common words and falls back to bytes for the rest (emoji, CJK, most punctuation).
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "src" / "sftforge" / "assets"

# Llama-2-chat's template as its tokenizer_config.json ships it (meta-llama/Llama-2-7b-chat-hf):
# BOS before every [INST], the system prompt folded into the first user turn, every message
# stripped, assistant turns closed by eos.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

SPECIAL = ("<unk>", "<s>", "</s>")


def training_text() -> list[str]:
    lines = []
    for name in ("demo_train.jsonl", "demo_eval.jsonl"):
        for line in (ASSETS / name).read_text("utf-8").splitlines():
            record = json.loads(line)
            lines.extend(m["content"] for m in record.get("messages", []))
    lines.extend((ASSETS / "reference_corpus.txt").read_text("utf-8").splitlines())
    # Chat markup the templates write, so it is not all bytes; no newline is ever learnt.
    lines += ["[INST] [/INST] <<SYS>> <</SYS>> ### Instruction: ### Response: USER: ASSISTANT:"]
    return [line for text in lines for line in text.splitlines() if line.strip()]


def build_sentencepiece_tokenizer(
    directory: Path, vocab_size: int = 3000, legacy: bool = False
) -> Path:
    """A Llama-2-style tokenizer saved under `directory` (tokenizer.json and config).

    `legacy=True` is what a tokenizer_config.json with `"legacy": true` (Mistral 7B v0.1, for
    one) gets in transformers 5: a `▁` prefix space after every special token too, as
    sentencepiece itself gives each string it encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False
    )
    learner.train_from_iterator(training_text(), trainer)
    learnt = json.loads(learner.to_str())["model"]
    # Llama's layout: <unk> <s> </s>, then the 256 byte-fallback tokens, then the pieces.
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learnt["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=legacy)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


GEMMA_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")


def build_gemma_like_tokenizer(directory: Path, filler: int = 0) -> Path:
    """A Gemma-base-like tokenizer under `directory`: BOS `<bos>` added to every string, eos
    `<eos>`, pad `<pad>`, the turn tokens already in the vocabulary, no chat template;
    `filler` unused tokens make the vocabulary as large as Gemma's (262,144 rows)."""
    from transformers import LlamaTokenizer

    source = LlamaTokenizerPieces.get()
    vocab = {token: i for i, token in enumerate(GEMMA_SPECIAL)}
    for token in source["vocab"]:
        if token not in ("<unk>", "<s>", "</s>"):
            vocab.setdefault(token, len(vocab))
    for k in range(filler):
        vocab[f"<unused{k}>"] = len(vocab)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=source["merges"],
        add_bos_token=True,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.save_pretrained(directory)
    return directory


class LlamaTokenizerPieces:
    """The learnt vocabulary and merges of the SentencePiece-style tokenizer, learnt once."""

    _cached: dict | None = None

    @classmethod
    def get(cls) -> dict:
        if cls._cached is None:
            import tempfile

            from tokenizers import Tokenizer

            with tempfile.TemporaryDirectory() as folder:
                built = build_sentencepiece_tokenizer(Path(folder))
                model = json.loads(Tokenizer.from_file(str(built / "tokenizer.json")).to_str())
            merges = model["model"]["merges"]
            cls._cached = {
                "vocab": model["model"]["vocab"],
                "merges": [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges],
            }
        return cls._cached


def tiny_llama(
    vocab_size: int, tie: bool = True, seed: int = 0, hidden_size: int = 32, **special_ids
):
    """A tiny random Llama: hidden 32 (or `hidden_size`; its MLP twice that), 2 layers, 4
    heads (2 kv heads); `special_ids` sets bos_token_id / eos_token_id / pad_token_id on its
    config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
        **special_ids,
    )
    return LlamaForCausalLM(config)


def tiny_gemma3(vocab_size: int, seed: int = 0):
    """A tiny Gemma 3: its embeddings are scaled by sqrt(hidden) inside the embedding layer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=16,
        final_logit_softcapping=None,
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(config)


def save_model_with_tokenizer(model, tokenizer, directory: Path) -> str:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_qwen3(vocab_size: int, seed: int = 0):
    """A tiny random Qwen3 (q/k norms, tied head). Its head_dim is 128, the size transformers'
    GGUF loader assumes for Qwen3, which reads no head size from the file. Weights drawn
    wider than the default so its next-token distributions are not near-uniform."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    return Qwen3ForCausalLM(config)


def build_small_chatml_tokenizer(directory: Path, smollm2_tokenizer, size: int = 1024) -> Path:
    """SmolLM2's tokenizer cut to its first `size` tokens: the same special tokens, byte-level
    splitting and chat template, with the merges whose pieces it keeps. For tests of a file's
    layout, where reading a 49,152-token vocabulary back would be most of the time."""
    smollm2_tokenizer.save_pretrained(directory)
    path = directory / "tokenizer.json"
    tokenizer = json.loads(path.read_text("utf-8"))
    model = tokenizer["model"]
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < size}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    kept = model["vocab"]
    model["merges"] = [[a, b] for a, b in merges if a in kept and b in kept and a + b in kept]
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), "utf-8")
    return directory
