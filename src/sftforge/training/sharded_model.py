"""Under FSDP, a model no rank ever holds whole.

Loading: the model is built on the meta device (shapes, no memory), given its adapters,
sharded by FSDP2 (`fully_shard`), and only then given memory: each rank's rows of each
weight (FSDP2 shards every weight along its first dimension) are read straight from the
safetensors files. A rank's memory for the weights is its shards and one slice at a time.

What cannot be read that way is loaded whole on each rank and sharded after, as before,
with a line saying why (`whole_load_reason`): weights that are not safetensors, a LoRA run
folded into a full fine-tune, LoRA's trainable rows for tokens the template added (peft
starts them from the whole embedding), torch.compile (its probe step runs before sharding).

Finishing: the trained weights are written one weight at a time (each gathered whole on
every rank in turn and appended by rank 0 to a safetensors file of at most SHARD_BYTES,
with transformers' index beside them when there are several); a LoRA run's adapters, which
are small, are gathered together.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from sftforge.models.loading import (
    attach_configured_lora,
    attention_implementation,
    causal_lm,
    mean_row,
)
from sftforge.models.streamed_safetensors import StreamedSafetensors
from sftforge.training.distributed import World, local_part

SHARD_BYTES = 5 * 1024**3  # per weights file, as transformers' save_pretrained does by default
INDEX = "model.safetensors.index.json"


def whole_load_reason(config, text) -> str | None:
    """Why this FSDP run loads the whole model on each rank before sharding it, or None."""
    source = text.source
    if source.adapter is not None:
        return "a LoRA run's adapter is folded into its base as it loads"
    if not _weight_files(text.base_model_path):
        return "its weights are not in safetensors files"
    if config.uses_lora and text.new_ids:
        return "LoRA's rows for the tokens the template added start from the whole embedding"
    if config.training.compile:
        return "training.compile probes a step before the model is sharded"
    return None


def load_sharded(config, device: torch.device, text, shard: Callable) -> tuple:
    """(the model, its loss module sharded by `shard(model)`), every weight this rank's
    shards only, read from the base's safetensors files; adapters started as one process
    starts them (`seed_adapters`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    base = text.base_model_path
    files = SafetensorsRows(base)
    trust = config.trust_remote_code
    model_config = AutoConfig.from_pretrained(base, trust_remote_code=trust)
    dtype = torch.bfloat16 if config.training.precision == "pure_bf16" else torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            model_config,
            dtype=dtype,
            attn_implementation=attention_implementation(config.attention),
            trust_remote_code=trust,
        )
    if (Path(base) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(base)
    buffers = _computed_buffers(model, device)
    tokenizer = text.encoder.tokenizer
    if text.new_ids and model.get_input_embeddings().weight.shape[0] <= max(text.new_ids):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vocabulary_weights = _vocabulary_weight_names(model)
    adapters = {}
    if config.uses_lora:
        model = attach_configured_lora(model, config.lora, [], config.training.seed)
        adapters = {
            name: p.detach().clone()
            for name, p in causal_lm(model).named_parameters()
            if not p.is_meta
        }
        for module in causal_lm(model).modules():  # back to shapes only, until sharded
            if any(not p.is_meta for p in module.parameters(recurse=False)):
                module.to("meta")
    trainer = shard(model)
    trainer.to_empty(device=device)
    lm = causal_lm(model)
    lm.tie_weights()  # to_empty gives each module a weight of its own: a tied head, too
    new_rows = set(text.new_ids)
    known = len(tokenizer) - len(new_rows)
    with torch.no_grad():
        for name, buffer in lm.named_buffers():  # a buffer the file holds comes from it
            if name in files.where:
                files.copy_rows(name, 0, buffer, set(), 0)
            else:
                buffer.copy_(buffers[name])
        for name, param in lm.named_parameters():
            start, end = _rows_of_this_rank(name, param)
            if name in adapters:
                local_part(param).copy_(adapters[name][start:end])
            else:
                vocabulary_rows = _file_name(name) in vocabulary_weights
                rows_added = new_rows if vocabulary_rows else set()
                files.copy_rows(_file_name(name), start, local_part(param), rows_added, known)
    return model, trainer


class SafetensorsRows:
    """Rows of the weights in a model folder's safetensors files, copied into a rank's shard
    a chunk at a time, without reading the rest of the weight. Each weight's file is opened
    (memory-mapped) only while its rows are copied: the pages read leave with it."""

    CHUNK_BYTES = 64 * 1024**2

    def __init__(self, folder: str):
        self.where = _weight_files(folder)

    def copy_rows(self, name: str, start: int, into: torch.Tensor, new_rows, known: int):
        """Rows start.. of weight `name` into `into` (as many as it has), cast to its dtype.
        Rows of tokens the template added (`new_rows`, of an embedding or output head) start
        at the mean of the `known` older rows, as `start_rows_at_the_mean` starts them in one
        process."""
        if name not in self.where:
            raise ShardedLoadError(
                f"{name}: no weight of that name in the safetensors files; the model built "
                "from config.json names its weights otherwise. Use training.parallelism=ddp"
            )
        end = start + (into.shape[0] if into.dim() else 1)
        with safe_open(self.where[name], framework="pt", device="cpu") as opened:
            weight = opened.get_slice(name)
            shape = weight.get_shape()
            if not shape:  # a scalar: nothing to shard
                into.copy_(opened.get_tensor(name))
                return
            stored = min(end, shape[0])
            if any(row not in new_rows for row in range(stored, end)):
                raise ShardedLoadError(
                    f"{name}: the model has {end} rows where its file has {shape[0]}, and "
                    "the rows past them are not tokens the template added"
                )
            row_bytes = max(1, into[0].numel() * into.element_size()) if into.shape[0] else 1
            chunk = max(1, self.CHUNK_BYTES // row_bytes)
            for first in range(start, stored, chunk):
                last = min(first + chunk, stored)
                into[first - start : last - start].copy_(weight[first:last])
            mine = [row - start for row in range(start, end) if row in new_rows]
            if mine:
                into[mine] = mean_row(lambda rows: weight[rows].to(into.dtype), known, into.dtype)


class ShardedLoadError(RuntimeError):
    pass


def _weight_files(folder: str) -> dict[str, str]:
    """{weight name: the safetensors file holding it} of a model folder, {} when it has none."""
    path = Path(folder)
    index = path / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        return {name: str(path / file) for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        return {}
    with safe_open(single, framework="pt", device="cpu") as opened:
        return {name: str(single) for name in opened.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _file_name(name: str) -> str:
    """The name in the base's files of a weight peft wrapped (`q_proj.base_layer.weight`)."""
    return name.replace(".base_layer.", ".")


def _vocabulary_weight_names(model) -> set[str]:
    """The names of the input embeddings and output head weights (rows per token)."""
    lm = causal_lm(model)
    weights = {id(p): name for name, p in lm.named_parameters(remove_duplicate=False)}
    layers = [lm.get_input_embeddings(), lm.get_output_embeddings()]
    return {weights[id(layer.weight)] for layer in layers if layer is not None}


def _computed_buffers(model, device) -> dict[str, torch.Tensor]:
    """The values of the model's buffers (rotary frequencies, embedding scales) as
    transformers computes them when it loads a model built on the meta device: given memory
    and set by the model's own weight initialisation, which leaves meta weights alone."""
    persistent = set(model.state_dict())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            owner, _, short = name.rpartition(".")
            module = model.get_submodule(owner)
            empty = torch.empty_like(buffer, device=device)
            module.register_buffer(short, empty, persistent=name in persistent)
    model.initialize_weights()
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()}


def _rows_of_this_rank(name: str, param) -> tuple[int, int]:
    """The rows of `param` this rank holds: FSDP2 splits dimension 0 as torch.chunk does."""
    rows = param.shape[0] if param.dim() else 1
    if not hasattr(param, "device_mesh"):
        return 0, rows
    mesh = param.device_mesh
    chunk = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    end = min(start + chunk, rows)
    if local_part(param).shape[0] != end - start:
        raise ShardedLoadError(
            f"{name}: this rank holds {local_part(param).shape[0]} rows of {rows}, not the "
            f"{end - start} of an even split: FSDP2 shards another way than expected"
        )
    return start, end


# ---- finish --------------------------------------------------------------------------------


def write_sharded_weights(folder: Path | None, trainer, model, world: World) -> None:
    """The trained weights into `folder` (rank 0's; None on the others), gathered one weight
    at a time: a full fine-tune's as transformers' safetensors files, a LoRA run's adapter as
    peft's. Every rank calls it."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        _write_adapter(folder, trainer, model, world)
    else:
        _write_full_weights(folder, causal_lm(model), world)


def _write_adapter(folder, trainer, model, world: World) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = get_model_state_dict(trainer, options=options)
    if world.is_main:
        weights = {name.removeprefix("model."): t for name, t in trained.items()}
        model.save_pretrained(
            folder, safe_serialization=True, save_embedding_layers=False, state_dict=weights
        )


def _write_full_weights(folder, lm, world: World) -> None:
    """Each weight gathered whole on every rank in turn (FSDP's all-gather) and appended by
    rank 0 to its file, then freed: no rank holds more than its shards and one weight."""
    persistent = set(lm.state_dict())
    named = dict(lm.named_parameters())
    named |= {name: b for name, b in lm.named_buffers() if name in persistent}
    files = _shard_plan([(name, t.numel() * t.element_size()) for name, t in named.items()])
    where = {}
    for number, names in enumerate(files):
        file = "model.safetensors" if len(files) == 1 else _shard_file(number, len(files))
        layout = [(name, named[name].dtype, tuple(named[name].shape)) for name in names]
        with contextlib.ExitStack() as stack:
            if world.is_main:
                out = StreamedSafetensors(folder / file, layout, metadata={"format": "pt"})
                stack.enter_context(out)
            for name in names:
                tensor = named[name]
                whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if world.is_main:
                    out.write(name, whole)
                del whole
        where |= dict.fromkeys(names, file)
    if world.is_main:
        lm.config.save_pretrained(folder)
        if len(files) > 1:
            total = sum(t.numel() * t.element_size() for t in named.values())
            index = {"metadata": {"total_size": total}, "weight_map": where}
            (folder / INDEX).write_text(json.dumps(index, indent=2), "utf-8")


def _shard_plan(sizes: list[tuple[str, int]]) -> list[list[str]]:
    files, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > SHARD_BYTES:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return files + [current] if current else files


def _shard_file(number: int, count: int) -> str:
    return f"model-{number + 1:05d}-of-{count:05d}.safetensors"
