"""Training runs on a tiny random model: what a run leaves behind, and that it reloads."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from model_families import LLAMA2_CHAT_TEMPLATE
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftforge.cli.main import main
from sftforge.config.loading import load_config
from sftforge.training.loop import train
from sftforge.training.output import save_run
from sftforge.training.update import learning_rate_at

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


def subset(tmp_path, n=12) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:n]))
    return str(path)


def config(tmp_path, model, *overrides):
    return load_config(
        None,
        [
            f"model={model}",
            f"data.train={subset(tmp_path)}",
            f"output_dir={tmp_path / 'out'}",
            "training.max_steps=3",
            "training.batch_size=4",
            "max_length=128",
            "eval.forgetting=false",
            *overrides,
        ],
    )


def test_full_fine_tuning_leaves_model_tokenizer_template_config_and_metrics(
    tmp_path, tiny_model_dir
):
    out = train(
        config(tmp_path, tiny_model_dir, "method=full", "training.precision=fp32")
    ).output_dir
    assert (out / "model.safetensors").is_file()
    assert (out / "sftforge.yaml").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        n for n, p in reloaded.named_parameters() if not torch.equal(p, original.state_dict()[n])
    ]
    assert changed, "training changed no weight"
    assert reloaded.generation_config.eos_token_id in (2, [2])


def rows_at_start(base_dir: str, added: int):
    """The rows a run starts new tokens from: the mean of the base's rows, in the input
    embeddings and in the output head (the same tensor when tied)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    inputs = base.get_input_embeddings().weight.detach()
    outputs = base.get_output_embeddings().weight.detach()
    return base, inputs.mean(0).expand(added, -1), outputs.mean(0).expand(added, -1)


def assert_new_rows_trained_and_old_rows_kept(base_dir: str, out, new_tokens: list[str]):
    from peft import PeftModel

    from sftforge.models.trained import merge_adapter

    tokenizer = AutoTokenizer.from_pretrained(out)
    new_ids = tokenizer.convert_tokens_to_ids(new_tokens)
    base, inputs_start, outputs_start = rows_at_start(base_dir, len(new_ids))
    known = base.get_input_embeddings().weight.shape[0]
    assert min(new_ids) >= known, "the template's tokens were added to the vocabulary"
    old_inputs = base.get_input_embeddings().weight.detach().clone()
    old_outputs = base.get_output_embeddings().weight.detach().clone()

    merge_adapter(out, out.parent / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out.parent / "merged")
    inputs, outputs = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    # Trained away from where the run started them, each row its own way...
    for start, rows in ((inputs_start, inputs[new_ids]), (outputs_start, outputs[new_ids])):
        moved = (rows - start).abs().amax(1)
        assert bool((moved > 1e-3).all()), f"new rows moved only {moved.tolist()}"
    # ... while LoRA left every row of the base vocabulary as it was.
    torch.testing.assert_close(inputs[:known], old_inputs, atol=0, rtol=0)
    torch.testing.assert_close(outputs[:known], old_outputs, atol=0, rtol=0)

    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tuned = PeftModel.from_pretrained(base, out)
    ids = torch.tensor([[1, 2, 3, new_ids[0], 5]])
    torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    return tokenizer, merged, new_ids


def test_saving_a_run_writes_the_stop_tokens_and_leaves_the_live_model_as_it_was(
    tmp_path, tiny_model_factory, smollm2_tokenizer
):
    model = tiny_model_factory()
    before = model.generation_config.to_dict()
    run_config = load_config(None, ["data.train=x"])

    save_run(tmp_path / "run", model, smollm2_tokenizer, (2, 7), 2, run_config, {})

    assert model.generation_config.to_dict() == before
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert (saved["eos_token_id"], saved["pad_token_id"]) == ([2, 7], 2)


def test_lora_trains_the_rows_of_tokens_a_template_adds_under_a_tied_head(tmp_path, tiny_model_dir):
    out = train(config(tmp_path, tiny_model_dir, "template=llama3", "training.lr=1e-2")).output_dir
    tokens = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

    tokenizer, merged, new_ids = assert_new_rows_trained_and_old_rows_kept(
        tiny_model_dir, out, tokens
    )

    assert "<|start_header_id|>" in tokenizer.chat_template
    eos = merged.generation_config.eos_token_id
    assert new_ids[2] in (eos if isinstance(eos, list) else [eos]), "generation stops at eot"


def test_lora_trains_the_rows_of_tokens_a_template_adds_in_an_untied_head_too(
    tmp_path, untied_sentencepiece_model_dir
):
    # The untied head's rows of new tokens must learn too: left at their common start, the
    # model could never tell <|im_start|> from <|im_end|> when it writes them.
    out = train(
        config(tmp_path, untied_sentencepiece_model_dir, "template=chatml", "training.lr=1e-2")
    ).output_dir

    assert_new_rows_trained_and_old_rows_kept(
        untied_sentencepiece_model_dir, out, ["<|im_start|>", "<|im_end|>"]
    )


def test_a_llama2_style_model_trains_with_its_own_template_and_stops_at_eos(
    tmp_path, untied_sentencepiece_model_dir
):
    # BOS written by the template, eos </s> closing each answer, no pad token, untied head.
    out = train(config(tmp_path, untied_sentencepiece_model_dir, "training.max_steps=2")).output_dir

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(untied_sentencepiece_model_dir))
    assert json.loads((out / "data_report.json").read_text())["examples"] == 12
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id]
    assert all(math.isfinite(row["loss"]) for row in step_rows(out))


def test_skip_policy_trains_on_the_valid_records_and_writes_every_reject(tmp_path, tiny_model_dir):
    data = tmp_path / "mixed.jsonl"
    good = DEMO.read_text().splitlines()[:6]
    # SmolLM2's vocabulary cannot spell U+40000: the mask check rejects that record.
    unrepresentable = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "\U00040000"},
            ]
        }
    )
    lines = [good[0], "{not json", *good[1:], '{"messages": []}', unrepresentable]
    data.write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, tiny_model_dir, f"data.train={data}", "data.on_invalid=skip")
    out = train(cfg).output_dir
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{data}:2", f"{data}:8", f"{data}:9"]
    assert "decode" in rejects[2]["reason"]
    assert json.loads((out / "data_report.json").read_text())["examples"] == 6


def test_skip_policy_writes_the_rejects_of_a_held_out_file_too(tmp_path, tiny_model_dir):
    """A held-out file's records rejected when read (bad JSON) and when encoded (text the
    vocabulary cannot spell) reach rejects.jsonl beside the training data's: none is dropped."""
    held_out = tmp_path / "held_out.jsonl"
    good = DEMO.read_text().splitlines()[6:9]
    unrepresentable = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "\U00040000"},
            ]
        }
    )
    held_out.write_text("\n".join([good[0], "{not json", good[1], unrepresentable, good[2]]) + "\n")
    cfg = config(
        tmp_path, tiny_model_dir, f"eval.held_out={held_out}", "data.on_invalid=skip",
        "training.max_steps=1", "eval.samples=0",
    )  # fmt: skip
    out = train(cfg).output_dir
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{held_out}:2", f"{held_out}:4"]
    assert "decode" in rejects[1]["reason"]


def test_examples_longer_than_max_length_are_dropped_and_reported(tmp_path, tiny_model_dir):
    out = train(config(tmp_path, tiny_model_dir, "max_length=90", "method=full")).output_dir
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped_too_long"], "some demo examples exceed 90 tokens"
    assert report["examples"] + len(report["dropped_too_long"]) == 12


def test_cli_train_takes_flags_and_key_value_overrides(tmp_path, tiny_model_dir, capsys):
    code = main(
        [
            "train",
            "training.max_steps=2",
            "max_length=96",
            "lora.r=4",
            "eval.forgetting=false",
            "--model",
            tiny_model_dir,
            "--data",
            subset(tmp_path),
            "--output",
            str(tmp_path / "cli"),
            "--method",
            "lora",
        ]
    )
    assert code == 0
    out = tmp_path / "cli"
    saved = load_config(out / "sftforge.yaml")
    assert (saved.model, saved.data.train, saved.output_dir) == (
        tiny_model_dir,
        subset(tmp_path),
        str(out),
    )
    assert (saved.training.max_steps, saved.max_length, saved.lora.r) == (2, 96, 4)
    assert [row["step"] for row in step_rows(out)] == [1, 2]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    # max_length=96 dropped the longer demo examples, and the run said so.
    assert json.loads((out / "data_report.json").read_text())["dropped_too_long"]
    assert "max_length 96" in capsys.readouterr().out


def test_cli_reports_a_bad_record_with_its_line_and_exits_2(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code = main(
        ["train", "--model", tiny_model_dir, "--data", str(data), "--output", str(tmp_path)]
    )
    assert code == 2
    assert f"{data}:1" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    lrs = [learning_rate_at(s, 100, 10, 1.0, schedule) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] <= lrs[50] <= lrs[10]
    if schedule != "constant":
        assert lrs[-1] < 0.05


def step_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses_and_gradient_norms(rows: list[dict]) -> list[float]:
    """Each step's loss and gradient norm (before clipping), in one flat list."""
    return [value for row in rows for value in (row["loss"], row["grad_norm"])]


def test_packed_budgeted_checkpointed_pure_bf16_lora_run_trains_and_reports_mfu(
    tmp_path, tiny_model_dir
):
    out = train(
        config(
            tmp_path,
            tiny_model_dir,
            "training.precision=pure_bf16",
            "training.packing=true",
            "max_length=256",
            "training.micro_batch_tokens=256",
            "training.grad_accum=2",
            "training.peak_tflops=1.0",
            "training.gradient_checkpointing=true",
        )
    ).output_dir
    metrics = step_rows(out)
    assert all(m["loss"] > 0 and m["tflops"] > 0 and m["mfu"] > 0 for m in metrics)
    # Steps of 8, 4 (the epoch's last 4 of 12) and 8 examples of 78-105 tokens, packed two
    # to a row of 256; a budget of 256 tokens takes one such row per micro-batch.
    assert [m["rows"] for m in metrics] == [4, 2, 4]
    assert [m["micro_batches"] for m in metrics] == [4, 2, 4]
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def run_rows(tmp_path, model, *overrides) -> list[dict]:
    # Each call starts afresh in the same output_dir.
    return train(config(tmp_path, model, "overwrite_output_dir=true", *overrides)).metrics


def test_layout_and_checkpointing_change_neither_losses_nor_gradients(
    tmp_path, tiny_model_dir, monkeypatch
):
    # A step's examples do not depend on how they are cut into micro-batches or packed, and
    # the gradient norm before clipping shows any error in the gradients' scale.
    from transformers.models.llama.modeling_llama import LlamaMLP

    # A count of the decoder layers' MLP forwards, for each run. (The MLP, inside the part a
    # checkpoint recomputes: transformers checkpoints the layer's own forward, so wrapping
    # that would turn checkpointing off.)
    mlp_forwards = []
    mlp_forward = LlamaMLP.forward

    def counted_forward(self, *args, **kwargs):
        mlp_forwards[-1] += 1
        return mlp_forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted_forward)

    def rows(*overrides):
        settings = ("method=full", "training.precision=fp32", "max_length=512")
        mlp_forwards.append(0)
        return run_rows(tmp_path, tiny_model_dir, *settings, "training.max_steps=2", *overrides)

    plain = rows()
    packed = rows("training.packing=true")
    shared = rows("training.packing=true", "training.share_prefixes=true")
    budgeted = rows("training.micro_batch_tokens=100")
    checkpointed = rows("training.gradient_checkpointing=true")

    # Checkpointing is on in the run: each decoder layer (2) runs once more in the backward
    # of every micro-batch, and nowhere else (evaluation has no backward).
    micro_batches = sum(r["micro_batches"] for r in checkpointed)
    assert mlp_forwards[4] - mlp_forwards[0] == 2 * micro_batches

    assert [r["rows"] for r in plain] == [4, 4]
    assert [r["rows"] for r in packed] == [1, 1], "the four examples of a step share a row"
    # SmolLM2's template writes its default system prompt first: written once a row.
    assert shared[-1]["tokens"] < packed[-1]["tokens"]
    assert [r["micro_batches"] for r in budgeted] == [4, 4]
    reference = losses_and_gradient_norms(plain)
    for other in (packed, shared, budgeted, checkpointed):
        assert losses_and_gradient_norms(other) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("pure_bf16", 1e-2)])
def test_packing_with_lora_checkpointing_and_budgets_gives_the_unpacked_steps(
    tmp_path, tiny_model_dir, precision, tolerance
):
    settings = (
        f"training.precision={precision}",
        "training.gradient_checkpointing=true",
        "training.micro_batch_tokens=512",
        "max_length=512",
        "training.max_steps=2",
    )
    unpacked = run_rows(tmp_path, tiny_model_dir, *settings)
    packed = run_rows(tmp_path, tiny_model_dir, *settings, "training.packing=true")

    assert [r["rows"] for r in packed] == [1, 1] and [r["rows"] for r in unpacked] == [4, 4]
    expected = losses_and_gradient_norms(unpacked)
    assert losses_and_gradient_norms(packed) == pytest.approx(expected, rel=tolerance)


@pytest.mark.slow
def test_compiled_decoder_layers_train_to_the_same_losses_and_gradients(
    tmp_path, tiny_model_dir, caplog
):
    from torch._dynamo.utils import counters

    settings = ("method=full", "training.precision=fp32")
    counters.clear()
    with caplog.at_level(logging.INFO, logger="sftforge"):
        compiled = run_rows(tmp_path, tiny_model_dir, *settings, "training.compile=true")
    # Compiled, not the eager fallback (which trains to the same losses): no fallback said,
    # and the layers' frames went through the compiler to the end.
    assert "compiling the decoder layers" in caplog.text
    assert "torch.compile failed" not in caplog.text
    assert counters["frames"]["ok"] > 0
    eager = run_rows(tmp_path, tiny_model_dir, *settings)
    assert losses_and_gradient_norms(compiled) == pytest.approx(
        losses_and_gradient_norms(eager), rel=1e-4
    )
