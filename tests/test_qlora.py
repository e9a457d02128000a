"""QLoRA end to end on SmolLM2: the base in 4-bit NF4 (bitsandbytes, on this CPU), LoRA on
top; the adapter applies to the full-precision base with plain peft, and merges into it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftforge.cli.main import main
from sftforge.config.loading import ConfigError, load_config

pytestmark = pytest.mark.slow

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora") / "run"
    args = [f"data.train={DEMO}", f"output_dir={out}", "method=qlora", "training.max_steps=4"]
    args += ["training.lr=1e-3", "max_length=128", "eval.forgetting=false", "eval.samples=0"]
    assert main(["train", *args]) == 0
    return out


def token_log_probs(model, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """Log-probability of each next token, over the real tokens (no padding)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)[ids[:, 1:] != pad]


def demo_batch(tokenizer) -> torch.Tensor:
    pad = tokenizer.pad_token_id
    records = [json.loads(line) for line in DEMO.read_text().splitlines()[:4]]
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    ids = [tokenizer(t, add_special_tokens=False).input_ids[:128] for t in texts]
    return torch.tensor([x + [pad] * (128 - len(x)) for x in ids])


def test_the_qlora_adapter_applies_to_the_full_precision_base_within_4_bit_error(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftforge.models.quantize import load_4bit_model

    adapter = json.loads((qlora_run / "adapter_config.json").read_text())
    base_path = adapter["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(qlora_run)
    ids, pad = demo_batch(tokenizer), tokenizer.pad_token_id

    full = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    four_bit = load_4bit_model(base_path, torch.float32, torch.device("cpu"))
    base_full, base_four_bit = token_log_probs(full, ids, pad), token_log_probs(four_bit, ids, pad)
    tuned_full = token_log_probs(PeftModel.from_pretrained(full, qlora_run).eval(), ids, pad)
    tuned_four_bit = token_log_probs(
        PeftModel.from_pretrained(four_bit, qlora_run).eval(), ids, pad
    )

    # It learnt, on either base; and the full-precision base with the adapter differs from
    # the 4-bit one it was trained on by no more than the two bases differ without it.
    assert tuned_four_bit.mean() > base_four_bit.mean() + 0.3
    assert tuned_full.mean() > base_full.mean() + 0.3
    quantization_error = (base_full - base_four_bit).abs().mean()
    assert (tuned_full - tuned_four_bit).abs().mean() < 1.5 * quantization_error
    assert (qlora_run / "adapter_model.safetensors").stat().st_size < 25_000_000


def test_merge_folds_a_qlora_adapter_into_the_full_precision_base(qlora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["merge", str(qlora_run), str(tmp_path / "merged")]) == 0

    printed = capsys.readouterr().out
    assert "merged into the full-precision base itself" in printed
    base_path = json.loads((qlora_run / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    full = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(full, qlora_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(qlora_run)
    ids, pad = demo_batch(tokenizer), tokenizer.pad_token_id
    torch.testing.assert_close(
        token_log_probs(merged, ids, pad), token_log_probs(tuned, ids, pad), atol=1e-4, rtol=1e-4
    )


def test_an_already_quantized_base_is_refused_by_name(tmp_path):
    from sftforge.models.quantize import QuantizedModelError, check_not_quantized

    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(QuantizedModelError, match="already quantized \\(gptq\\).*4-bit NF4"):
        check_not_quantized(str(tmp_path))


def test_pure_bf16_with_qlora_says_why_not():
    with pytest.raises(ConfigError, match="qlora already holds the frozen base in 4-bit"):
        load_config(None, ["data.train=x", "method=qlora", "training.precision=pure_bf16"])
