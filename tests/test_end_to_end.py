"""End to end on the real SmolLM2-135M: a few steps, the loss falls, and what was saved
reloads with plain transformers / peft and generates."""

import json
from pathlib import Path

import pytest
import torch
from run_report import assert_report_shows_the_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftforge.config.loading import load_config
from sftforge.data.loading import load_conversations
from sftforge.encode.batches import collate, trained_token_count
from sftforge.encode.encoder import Encoder
from sftforge.encode.templates import resolve_template
from sftforge.models.loss import summed_token_loss
from sftforge.training.loop import train

pytestmark = pytest.mark.slow
DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
QUESTION = "Extract the person as JSON.\n\nBruno Silva, 41, lives in Quito."


@pytest.fixture(scope="module")
def data_file(demo_records_16) -> Path:
    return demo_records_16


@pytest.fixture(scope="module")
def general_text(tmp_path_factory) -> tuple[Path, Path]:
    """A quarter of the bundled forgetting corpus and general prompts (6 paragraphs, 8
    prompts): the meter runs the same code on them (the test: 85 s -> 53 s here)."""
    assets = DEMO.parent
    folder = tmp_path_factory.mktemp("general")
    paragraphs = (assets / "reference_corpus.txt").read_text().split("\n\n")
    (folder / "corpus.txt").write_text("\n\n".join(paragraphs[:6]))
    prompts = (assets / "general_prompts.jsonl").read_text().splitlines(keepends=True)
    (folder / "prompts.jsonl").write_text("".join(prompts[:8]))
    return folder / "corpus.txt", folder / "prompts.jsonl"


def mean_loss(model, tokenizer, data_file) -> float:
    """Mean loss over the trained tokens of the data, under the saved chat template."""
    encoder = Encoder(tokenizer, resolve_template("auto", tokenizer))
    examples = [encoder.encode(c) for c in load_conversations(data_file).conversations]
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        return float(summed_token_loss(model, batch.input_ids, batch.labels)) / trained_token_count(
            batch.labels
        )


def greedy_reply(model, tokenizer, question: str) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    out = model.generate(ids, max_new_tokens=30, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_packed_lora_run_learns_and_reports_it_and_the_adapter_reloads_with_peft(
    tmp_path, smollm2_path, data_file, general_text
):
    from peft import PeftModel

    config = load_config(
        None,
        [
            f"data.train={data_file}",
            f"output_dir={tmp_path / 'lora'}",
            "method=lora",
            "training.lr=1e-3",
            "training.max_steps=6",
            "training.batch_size=8",
            "training.warmup_ratio=0",
            "training.packing=true",
            "max_length=256",
            "eval.held_out=4",
            "eval.scorer={kind: json}",
            "eval.max_new_tokens=40",
            "eval.samples=4",
            f"eval.corpus={general_text[0]}",
            f"eval.general_prompts={general_text[1]}",
        ],
    )
    out = train(config).output_dir
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path)
    before = mean_loss(base, tokenizer, data_file)
    tuned = PeftModel.from_pretrained(base, out)
    after = mean_loss(tuned, tokenizer, data_file)
    assert after < 0.7 * before, (before, after)

    reply = greedy_reply(tuned, tokenizer, QUESTION)
    assert reply.startswith('{"person": '), reply
    # Plain peft stops at the end of the turn (SmolLM2's eos is <|im_end|>), and the adapter
    # holds the LoRA weights alone.
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    new = tuned.generate(**inputs, max_new_tokens=80, do_sample=False)[0]
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (out / "adapter_model.safetensors").stat().st_size < 25_000_000
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6
    # 12 training examples of 78-105 tokens, 8 a step, packed into rows of 256: two or three
    # examples share a row.
    assert all(m["rows"] <= 4 for m in metrics), [m["rows"] for m in metrics]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"]["count"] == 4
    assert summary["accuracy"]["after"] > summary["accuracy"]["before"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert 0.8 < summary["forgetting"]["corpus_ratio"] < 1.5
    assert_report_shows_the_run(out)


def test_full_fine_tune_saves_a_model_that_plain_transformers_loads(smollm2_full_run, data_file):
    out = smollm2_full_run  # 2 steps with gradient checkpointing (conftest.py)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert mean_loss(model, tokenizer, data_file) < first
    reply = greedy_reply(model, tokenizer, QUESTION)
    assert reply.strip()
