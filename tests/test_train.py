"""Training runs on a tiny random model: what a run leaves behind, and that it reloads."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftforge.cli import main
from sftforge.config import load_config
from sftforge.train import learning_rate_at, train

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
            *overrides,
        ],
    )


def test_full_fine_tuning_leaves_model_tokenizer_template_config_and_metrics(
    tmp_path, tiny_model_dir
):
    out = train(config(tmp_path, tiny_model_dir, "method=full", "training.precision=fp32"))
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


def test_lora_with_a_template_that_adds_tokens_trains_and_saves_their_rows(
    tmp_path, tiny_model_dir
):
    from peft import PeftModel

    from sftforge.export import merge_adapter

    out = train(config(tmp_path, tiny_model_dir, "template=llama3", "training.lr=1e-2"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    new_ids = tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"])
    assert min(new_ids) >= 49152, "llama3 tokens were added to the vocabulary"
    assert "<|start_header_id|>" in tokenizer.chat_template

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    rows_before = base.get_input_embeddings().weight[new_ids].clone()
    tuned = PeftModel.from_pretrained(base, out)
    merged_dir = tmp_path / "merged"
    merge_adapter(out, merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    rows_after = merged.get_input_embeddings().weight[new_ids]
    assert not torch.allclose(rows_before, rows_after), "new token rows were not trained"

    ids = torch.tensor([[1, 2, 3, new_ids[0], 5]])
    torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-4, rtol=1e-4)
    eos = merged.generation_config.eos_token_id
    assert new_ids[1] in (eos if isinstance(eos, list) else [eos]), "generation stops at <|eot_id|>"


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
    out = train(cfg)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rejects] == [f"{data}:2", f"{data}:8", f"{data}:9"]
    assert "decode" in rejects[2]["reason"]
    assert json.loads((out / "data_report.json").read_text())["examples"] == 6


def test_examples_longer_than_max_length_are_dropped_and_reported(tmp_path, tiny_model_dir):
    out = train(config(tmp_path, tiny_model_dir, "max_length=90", "method=full"))
    report = json.loads((out / "data_report.json").read_text())
    assert report["dropped_too_long"], "some demo examples exceed 90 tokens"
    assert report["examples"] + len(report["dropped_too_long"]) == 12


def test_cli_train_with_flags_and_overrides(tmp_path, tiny_model_dir, capsys):
    code = main(
        [
            "train",
            "training.max_steps=2",
            "max_length=128",
            "--model",
            tiny_model_dir,
            "--data",
            subset(tmp_path),
            "--output",
            str(tmp_path / "cli"),
        ]
    )
    assert code == 0
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file()


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


def test_packed_budgeted_checkpointed_pure_bf16_lora_run_trains_and_reports_mfu(
    tmp_path, tiny_model_dir
):
    out = train(
        config(
            tmp_path,
            tiny_model_dir,
            "training.precision=pure_bf16",
            "training.packing=true",
            "training.micro_batch_tokens=256",
            "training.grad_accum=2",
            "training.peak_tflops=1.0",
            "training.gradient_checkpointing=true",
        )
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] > 0 and m["tflops"] > 0 and m["mfu"] > 0 for m in metrics)
    # 8 examples of ~90 tokens packed into rows of 128 need several micro-batches of 256.
    assert all(m["micro_batches"] >= 2 for m in metrics)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def full_fp32_losses(tmp_path, model, *overrides) -> list[float]:
    # Each call starts afresh in the same output_dir.
    settings = ("method=full", "training.precision=fp32", "overwrite_output_dir=true")
    out = train(config(tmp_path, model, *settings, *overrides))
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_layout_and_checkpointing_do_not_change_the_losses(tmp_path, tiny_model_dir):
    # A step's examples do not depend on how they are cut into micro-batches or packed.
    def losses(*overrides):
        return full_fp32_losses(tmp_path, tiny_model_dir, "training.max_steps=2", *overrides)

    plain = losses()
    assert losses("training.packing=true") == pytest.approx(plain, abs=1e-5)
    assert losses("training.micro_batch_tokens=100") == pytest.approx(plain, abs=1e-5)
    assert losses("training.gradient_checkpointing=true") == pytest.approx(plain, abs=1e-5)


@pytest.mark.slow
def test_compiled_decoder_layers_train_to_the_same_losses(tmp_path, tiny_model_dir):
    compiled = full_fp32_losses(tmp_path, tiny_model_dir, "training.compile=true")
    assert compiled == pytest.approx(full_fp32_losses(tmp_path, tiny_model_dir), abs=1e-4)
