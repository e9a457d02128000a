"""QLoRA: the frozen base held in 4-bit NF4 (bitsandbytes, through transformers'
BitsAndBytesConfig), LoRA adapters trained on top in higher precision.

The adapters apply to the original full-precision base: the saved adapter names it, and
`merge` folds them into that base, not into a 4-bit copy. A GGUF model is dequantized to
safetensors first (models/loading.py); a model already quantized another way is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sftforge.errors import InputError
from sftforge.models.loading import load_model


class QuantizedModelError(InputError):
    pass


def check_not_quantized(path: str) -> None:
    """Refuse a base whose weights are already quantized (GPTQ, AWQ, bitsandbytes...):
    QLoRA quantizes a full-precision base itself, and the adapter must fit that base."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return  # a hub id: transformers reads its config, and quantizes it as asked
    method = (json.loads(config.read_text()).get("quantization_config") or {}).get("quant_method")
    if method:
        raise QuantizedModelError(
            f"model {path} is already quantized ({method}); method=qlora needs a "
            "full-precision base (safetensors in bf16/fp16/fp32, or a .gguf file, which is "
            "dequantized first) to quantize to 4-bit NF4 itself"
        )


def load_4bit_model(
    path: str,
    compute_dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool = False,
    attention: str = "sdpa",
    allow_pickle: bool = False,
):
    """The base with its linear layers in 4-bit NF4 (double quantization: the scales are
    quantized too), computing in `compute_dtype`, placed on `device`; ready for LoRA (peft's
    prepare_model_for_kbit_training: the other weights in fp32, inputs that carry gradients)."""
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    check_not_quantized(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = load_model(
        path,
        trust_remote_code,
        dtype=torch.float32,
        attention=attention,
        allow_pickle=allow_pickle,
        quantization_config=quantization,
        device_map={"": str(device)},
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
