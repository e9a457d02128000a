"""Config -> the model and its text side: tokenizer, chat template, and the Encoder that
renders and tokenizes with them (and knows the stop ids and the pad id).

`text_side` is the one way a tokenizer gets its template and encoder: training, `inspect`,
`eval`, `compare` and `chat` all go through it, so what they render is what training rendered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sftforge.config.schema import Config
from sftforge.console import say
from sftforge.encode.batches import collate
from sftforge.encode.encoder import Encoder
from sftforge.models.devices import autocast_dtype
from sftforge.models.loading import (
    add_adapter_outputs_in_fp32,
    attach_configured_lora,
    attention_implementation,
    causal_lm,
    compile_decoder_layers,
    fit_new_token_rows,
    load_source_model,
)
from sftforge.models.loss import TokenLoss
from sftforge.models.quantize import load_4bit_model
from sftforge.models.source import (
    ModelSource,
    ModelSourceError,
    default_cache_dir,
    resolve_model_source,
)
from sftforge.models.tokenizer import load_tokenizer, text_side
from sftforge.training.distributed import World, wrap_for_training
from sftforge.training.preflight import check_max_length
from sftforge.training.sharded_model import load_sharded, whole_load_reason
from sftforge.training.update import accumulate_gradients


@dataclass
class Prepared:
    model: torch.nn.Module  # on its device, with LoRA adapters for lora and qlora
    encoder: Encoder
    base_model_path: str


@dataclass
class PreparedText:
    """What a run reads and writes text with, known before any weights load."""

    source: ModelSource
    base_model_path: str
    encoder: Encoder
    new_ids: list[int]  # special tokens the template needs, added to the tokenizer


def prepare(config: Config, device: torch.device) -> Prepared:
    """The base model on `device` (with adapters for LoRA and QLoRA) and its encoder,
    checked against max_length before any data is read."""
    text = prepare_text(config)
    model, base_path = prepare_model(config, device, text)
    return Prepared(model, text.encoder, base_path)


def prepare_text(config: Config) -> PreparedText:
    """The tokenizer with its template (and any tokens the template needs) as an Encoder,
    checked against max_length. Nothing touches a device: data can be encoded (in forked
    workers) before CUDA or NCCL start in this process."""
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    source = resolve_model_source(config.model, cache)
    base_path = source.require_weights("training")
    if source.adapter is not None and config.uses_lora:
        raise ModelSourceError(
            f"model {config.model} is a LoRA run (an adapter on {base_path}): method="
            f"{config.method} would train a new adapter on that base and save it for the base "
            f"alone, without this run's adapter. Fold the adapter in first (`sftforge merge "
            f"{config.model} MERGED`, then model=MERGED), or train with method=full, which "
            "folds it in as it loads"
        )
    tokenizer = load_tokenizer(source.tokenizer, config.trust_remote_code)
    encoder, new_ids = text_side(
        tokenizer,
        config.template,
        config.train_on,
        model_type=source.model_type or _model_type(base_path, config.trust_remote_code),
        reasoning=config.reasoning,
        template_options=config.template_options,
    )
    check_max_length(encoder, config.max_length)  # before reading data that could not fit
    return PreparedText(source, base_path, encoder, new_ids)


def prepare_model(config: Config, device: torch.device, text: PreparedText):
    """(the model on `device`, rows for the template's new tokens, adapters for LoRA and
    QLoRA; the path of the weights it was loaded from)."""
    source, base_path, tokenizer = text.source, text.base_model_path, text.encoder.tokenizer
    loading = {
        "trust_remote_code": config.trust_remote_code,
        "attention": attention_implementation(config.attention),
        "allow_pickle": config.allow_pickle,
    }
    if config.method == "qlora":
        compute_dtype = autocast_dtype(config.training.precision, device) or torch.float32
        model = load_4bit_model(base_path, compute_dtype, device, **loading)
    else:
        # pure_bf16 stores the frozen weights in bf16 (peft keeps the adapters in fp32): half
        # the memory, and no fp32 -> bf16 casts of weights and activations at every layer.
        dtype = torch.bfloat16 if config.training.precision == "pure_bf16" else torch.float32
        vocabulary = len(tokenizer) - len(text.new_ids)  # the run's, for a run's adapter
        model = load_source_model(source, vocabulary, "training", dtype=dtype, **loading)
        if source.adapter is not None:  # full fine-tuning of a LoRA run: its adapter folded in
            model = model.merge_and_unload()
            base_path = str(source.adapter)
        model = model.to(device)
    fit_new_token_rows(model, tokenizer, text.new_ids)
    if config.uses_lora:
        model = attach_configured_lora(model, config.lora, text.new_ids, config.training.seed)
        if config.lora.fp32_sum:
            add_adapter_outputs_in_fp32(model)
    return model, base_path


def store_frozen_matrices_as_computed(model, amp: torch.dtype) -> int:
    """Store the decoder layers' frozen fp32 matrices in the autocast dtype `amp`; returns
    the elements converted.

    Under autocast each matmul casts its fp32 weight to `amp` (rounding to nearest) at every
    use, and a frozen weight's copy is not cached: it is made again in every micro-batch's
    forward and kept alive for the backward. Stored once in `amp`, the weight *is* that copy:
    every matmul computes with the same numbers (the same losses and gradients, bit for
    bit), the fp32 weights and their per-step copies are gone (for SmolLM2-135M's layers,
    106M elements: 424 MB and 212 MB), and so are the casts. Embeddings, norms and anything
    trained stay in fp32, so the residual stream stays fp32 (what `pure_bf16` gives up).
    Every place that runs the model here (training, held-out loss, generation, forgetting)
    runs it under the same autocast; the saved adapter and any merge start from the weights
    on disk. Not for DoRA (it takes the norm of base + adapter weights in their own dtype)."""
    converted = 0
    for param in causal_lm(model).get_decoder().layers.parameters():
        if not param.requires_grad and param.dim() >= 2 and param.dtype == torch.float32:
            param.data = param.data.to(amp)
            converted += param.numel()
    return converted


def prepare_model_for(config: Config, device, text: PreparedText, world: World, amp, offload):
    """(the model, the path of its weights, its loss module already sharded or None). Under
    FSDP the model is built sharded, no rank holding it whole (training/sharded_model.py),
    unless it can only be loaded whole (said why); then it is, as under DDP or alone, and
    wrapped later."""
    if world.is_distributed and config.training.parallelism == "fsdp":
        why = whole_load_reason(config, text)
        if why is None:

            def shard(model):
                loss = training_loss(config, model)
                layers = causal_lm(model).get_decoder().layers
                return wrap_for_training(loss, layers, world, "fsdp", amp, offload)

            model, trainer = load_sharded(config, device, text, shard)
            if config.lora.fp32_sum and config.uses_lora:
                add_adapter_outputs_in_fp32(model)
            return model, text.base_model_path, trainer
        say(f"loading the whole model on every rank, then sharding it: {why}")
    model, base_path = prepare_model(config, device, text)
    fsdp = world.is_distributed and config.training.parallelism == "fsdp"
    if config.method == "lora" and amp is not None and not config.lora.dora and not fsdp:
        store_frozen_matrices_as_computed(model, amp)  # FSDP: one dtype per unit, untested
    return model, base_path, None


def training_loss(config: Config, model) -> TokenLoss:
    """The loss module training steps through (NEFTune and DFT per the config)."""
    t = config.training
    return TokenLoss(model, t.neftune_alpha, probability_weighted=t.loss == "dft")


def _model_type(weights: str, trust_remote_code: bool) -> str | None:
    """The model_type of the config beside `weights` (a hub id's config.json only is read)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(weights, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None


def compile_with_fallback(model, data, encoder, device, amp) -> str | None:
    """Compile the decoder layers and run one small step's forward and backward through
    them (gradients dropped); None, or why compiling failed, having said so."""

    def probe():
        batch = collate(
            [data.examples[i] for i in range(min(2, len(data.examples)))], encoder.pad_id
        )
        accumulate_gradients(TokenLoss(model), [batch], device, amp, pad_id=encoder.pad_id)
        model.zero_grad(set_to_none=True)

    say("compiling the decoder layers (torch.compile; cached for later runs)")
    failure = compile_decoder_layers(model, probe)
    if failure:
        say(f"warning: torch.compile failed, so this run trains without it: {failure}")
    return failure
