import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M, converted once to safetensors (cached across runs)."""
    from sftforge.model import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer_path(smollm2_path) -> str:
    return smollm2_path


@pytest.fixture()
def smollm2_tokenizer(smollm2_tokenizer_path):
    """A fresh tokenizer per test: tests may add special tokens to it."""
    from sftforge.model import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_model_factory():
    """A tiny randomly initialised Llama with SmolLM2's vocabulary size, for fast tests."""

    def make(vocab_size: int = 49152, seed: int = 0):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        return LlamaForCausalLM(config)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model_factory, smollm2_tokenizer_path) -> str:
    """A saved tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    from sftforge.model import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model_factory().save_pretrained(path, safe_serialization=True)
    load_tokenizer(smollm2_tokenizer_path).save_pretrained(path)
    return str(path)
