import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from model_families import (  # noqa: E402
    build_sentencepiece_tokenizer,
    save_model_with_tokenizer,
    tiny_llama,
)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M, converted once to safetensors (cached across runs)."""
    from sftforge.models.source import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer_path(smollm2_path) -> str:
    return smollm2_path


@pytest.fixture(scope="session")
def shared_smollm2_tokenizer(smollm2_tokenizer_path):
    """SmolLM2's tokenizer, loaded once: for tests that only read it."""
    from sftforge.models.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_path)


@pytest.fixture()
def smollm2_tokenizer(shared_smollm2_tokenizer):
    """A copy of SmolLM2's tokenizer per test: tests may add special tokens to it."""
    return copy.deepcopy(shared_smollm2_tokenizer)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer_path(tmp_path_factory) -> str:
    """A Llama-2-style SentencePiece tokenizer (see model_families.py)."""
    return str(build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sentencepiece")))


@pytest.fixture(scope="session")
def shared_sentencepiece_tokenizer(sentencepiece_tokenizer_path):
    from sftforge.models.tokenizer import load_tokenizer

    return load_tokenizer(sentencepiece_tokenizer_path)


@pytest.fixture()
def sentencepiece_tokenizer(shared_sentencepiece_tokenizer):
    return copy.deepcopy(shared_sentencepiece_tokenizer)


@pytest.fixture(scope="session")
def shared_legacy_sentencepiece_tokenizer(tmp_path_factory):
    """The same tokenizer with `legacy: true`: a prefix space after special tokens too."""
    from sftforge.models.tokenizer import load_tokenizer

    path = build_sentencepiece_tokenizer(tmp_path_factory.mktemp("legacy"), legacy=True)
    return load_tokenizer(str(path))


@pytest.fixture(scope="session")
def demo_records_40(tmp_path_factory) -> Path:
    """The first 40 records of the bundled demo data, as a file of their own."""
    demo = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
    path = tmp_path_factory.mktemp("demo40") / "data.jsonl"
    path.write_text("".join(demo.read_text().splitlines(keepends=True)[:40]))
    return path


@pytest.fixture(scope="session")
def tiny_model_factory():
    """make(vocab_size=49152, seed=0, tie=True): a tiny randomly initialised Llama."""

    def make(vocab_size: int = 49152, seed: int = 0, tie: bool = True):
        return tiny_llama(vocab_size, tie=tie, seed=seed)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_smollm2_tokenizer) -> str:
    """A saved tiny random Llama with the real SmolLM2 tokenizer and chat template."""
    path = tmp_path_factory.mktemp("tiny-llama")
    return save_model_with_tokenizer(tiny_llama(49152), shared_smollm2_tokenizer, path)


@pytest.fixture(scope="session")
def untied_sentencepiece_model_dir(tmp_path_factory, shared_sentencepiece_tokenizer) -> str:
    """A tiny random Llama with an untied output head and the SentencePiece tokenizer: BOS
    <s> added, eos </s>, no pad token, Llama-2-chat's template."""
    tokenizer = shared_sentencepiece_tokenizer
    model = tiny_llama(
        len(tokenizer),
        tie=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama-untied-sentencepiece")
    return save_model_with_tokenizer(model, tokenizer, path)


@pytest.fixture(autouse=True)
def said(request):
    """What the library says (sftforge.console.say, warn) printed, as the command line prints
    it, so that a test can read it with capsys; a test marked `quiet` runs as a Python caller
    who did not ask (verbose=False)."""
    from sftforge.console import speaking

    with speaking(request.node.get_closest_marker("quiet") is None):
        yield
