"""What llama.cpp needs to know of each architecture we export: its GGUF name, its
hyperparameters under llama.cpp's keys, and how its weights differ from transformers' layout
(Llama's rotary halves are interleaved; Gemma stores its norm weights as 1 + w)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from sftforge.errors import InputError


class UnsupportedArchitecture(InputError):
    """The model's architecture has no GGUF export here."""


@dataclass(frozen=True)
class Architecture:
    name: str  # transformers' model_type family name, and the GGUF general.architecture
    gguf_arch: gguf.MODEL_ARCH
    write_hyperparameters: Callable[[gguf.GGUFWriter, object], None]
    # (GGUF tensor name, weights as numpy, config) -> weights as llama.cpp lays them out
    to_gguf_layout: Callable[[str, np.ndarray, object], np.ndarray]


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if layer_type in rope:  # per layer type (Gemma 3)
        rope = rope[layer_type]
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UnsupportedArchitecture("the model's config has no rope_theta")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _common(writer: gguf.GGUFWriter, config) -> None:
    """What every exported architecture states alike (plain rotary embeddings only)."""
    _rope_scaling_refused(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _head_size(writer: gguf.GGUFWriter, config) -> None:
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))


def _rope_scaling_refused(config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    kinds = {r.get("rope_type", "default") for r in rope.values() if isinstance(r, dict)}
    kinds.add(rope.get("rope_type", "default") if "rope_type" in rope else "default")
    if kinds - {"default"}:
        raise UnsupportedArchitecture(
            f"rope scaling {sorted(kinds - {'default'})} is not exported yet; "
            "only models with plain rotary embeddings are"
        )


def _llama_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    _common(writer, config)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        _head_size(writer, config)


def _qwen_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    _common(writer, config)
    writer.add_rope_freq_base(_rope_theta(config))
    _head_size(writer, config)


def _gemma3_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    _common(writer, config)
    _head_size(writer, config)
    writer.add_rope_freq_base(_rope_theta(config, "full_attention"))
    writer.add_sliding_window(config.sliding_window)
    layer_types = getattr(config, "layer_types", None) or []
    local_theta = _rope_theta(config, "sliding_attention")
    if local_theta != 10000.0:  # llama.cpp's Gemma 3 uses 10000 for its sliding layers
        raise UnsupportedArchitecture(
            f"Gemma 3 with a sliding-window rope_theta of {local_theta} (llama.cpp assumes 10000)"
        )
    pattern = [t == "sliding_attention" for t in layer_types]
    expected = [(k + 1) % 6 != 0 for k in range(len(layer_types))]
    if pattern and pattern != expected:  # llama.cpp's Gemma 3: every 6th layer is global
        raise UnsupportedArchitecture(
            "Gemma 3 whose global-attention layers are not every sixth (llama.cpp assumes so)"
        )
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            raise UnsupportedArchitecture(f"Gemma 3 with {name} set is not exported yet")


def _interleave_rotary_halves(weights: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' q/k rows hold each head's rotary pairs as two halves; llama.cpp's llama
    architecture wants them interleaved (transformers' GGUF loader undoes this)."""
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def _llama_layout(name: str, weights: np.ndarray, config) -> np.ndarray:
    if name.endswith("attn_q.weight"):
        return _interleave_rotary_halves(weights, config.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return _interleave_rotary_halves(weights, config.num_key_value_heads)
    return weights


def _gemma_layout(name: str, weights: np.ndarray, config) -> np.ndarray:
    # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w.
    return weights + 1 if name.endswith("norm.weight") else weights


def _as_is(name: str, weights: np.ndarray, config) -> np.ndarray:
    return weights


ARCHITECTURES = {
    "llama": Architecture("llama", gguf.MODEL_ARCH.LLAMA, _llama_hyperparameters, _llama_layout),
    "qwen2": Architecture("qwen2", gguf.MODEL_ARCH.QWEN2, _qwen_hyperparameters, _as_is),
    "qwen3": Architecture("qwen3", gguf.MODEL_ARCH.QWEN3, _qwen_hyperparameters, _as_is),
    "gemma3": Architecture(
        "gemma3", gguf.MODEL_ARCH.GEMMA3, _gemma3_hyperparameters, _gemma_layout
    ),
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}


def architecture_of(config) -> Architecture:
    """The export recipe for a transformers config, or an error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise UnsupportedArchitecture(
            f"cannot export a {model_type!r} model to GGUF: supported architectures are "
            f"{', '.join(sorted(_MODEL_TYPES))}"
        )
    return ARCHITECTURES[_MODEL_TYPES[model_type]]
