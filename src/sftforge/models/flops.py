"""Model FLOPs of a training step, for model FLOPs utilisation (MFU).

Counted as the matmuls the step must do, not what an implementation happens to do
(recomputation under gradient checkpointing is not counted, as is the convention):
- forward: 2 x (decoder matmul weights) per token, plus attention scores and values
  (2 x 2 x head dims x the causal context of each token), plus the head only at trained
  positions (2 x hidden x vocab each);
- backward: twice the forward when the weights are trained (gradients of inputs and of
  weights); once the forward for LoRA, whose frozen weights need only input gradients
  (the adapters' own FLOPs are under 1% and left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftforge.models.loading import causal_lm


@dataclass(frozen=True)
class FlopModel:
    matmul_params: int  # decoder weights used in matmuls, per token (embeddings excluded)
    attention_width: int  # layers x query heads x head dim
    head_params: int  # hidden x vocab
    backward_factor: float  # 2.0 full fine-tuning, 1.0 LoRA

    def step_flops(self, tokens: int, attended_pairs: int, trained_tokens: int) -> float:
        """`attended_pairs`: the query-key pairs (a causal example of n tokens has
        n(n+1)/2); QK^T and AV are 2 FLOPs each per pair and head dim."""
        forward = (
            2 * self.matmul_params * tokens
            + 4 * self.attention_width * attended_pairs
            + 2 * self.head_params * trained_tokens
        )
        return forward * (1 + self.backward_factor)


def flop_model(model: torch.nn.Module, method: str) -> FlopModel:
    """Read the sizes off the model: its linear layers inside the decoder, and its config."""
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    matmul = 0
    for name, module in decoder.named_modules():
        # peft's adapter matrices live under lora_A / lora_B; count the base layers only.
        # A matmul's size is in x out features, whatever the weight's storage (bitsandbytes'
        # 4-bit weight is a packed uint8 tensor of half as many elements).
        if isinstance(module, torch.nn.Linear) and ".lora_" not in name:
            matmul += module.in_features * module.out_features
    config = lm.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopModel(
        matmul_params=matmul,
        attention_width=config.num_hidden_layers * heads * head_dim,
        head_params=config.hidden_size * config.vocab_size,
        backward_factor=1.0 if method in ("lora", "qlora") else 2.0,
    )
