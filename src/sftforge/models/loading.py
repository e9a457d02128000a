"""Load the model and tokenizer a ModelSource names (models/source.py resolves `--model`: a
model or run folder, hub id, GGUF file or the embedded default), a run's LoRA adapter with
them; make the chat template's special tokens real tokens, and attach LoRA adapters; and the
device and precision it trains on.

Weights are read from safetensors only (pickle only with allow_pickle, after a warning), and
remote code runs only when asked for.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from packaging.version import Version

from sftforge.console import warn
from sftforge.errors import InputError, RunFailed
from sftforge.models.per_example import drop_per_example
from sftforge.models.source import (
    ModelSource,
)

Method = Literal["full", "lora", "qlora"]  # qlora: LoRA on a base held in 4-bit NF4

Attention = Literal["auto", "sdpa", "eager", "flash_attention_2"]
LoraInit = Literal["default", "pissa", "olora"]  # pissa, olora: computed from the base weights


@contextmanager
def adapter_input_casts(model, enabled: bool):
    """Switch peft's cast of adapter inputs to the adapter dtype on or off (its layers'
    documented `cast_input_dtype_enabled` flag), restoring it afterwards. (peft's own
    `disable_input_dtype_casting` fails on models with trainable-token layers.)"""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = enabled
    try:
        yield
    finally:
        for m, value in zip(layers, before, strict=True):
            m.cast_input_dtype_enabled = value


# Weight files written with Python's pickle; safetensors files hold nothing but tensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PickleWeightsError(InputError):
    """Weights exist only as pickle, and allow_pickle is not set."""


def _pickle_files(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    )


def _declared_weights_file(path: str, trust_remote_code: bool) -> str | None:
    """The weights file a config.json names (`transformers_weights`). transformers loads it
    even with use_safetensors=True, so a config can point at a pickle file."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config, "transformers_weights", None)


def model_pickle_weights(path: str, trust_remote_code: bool = False) -> list[str]:
    """The pickle files loading this model (local directory or hub id) would unpickle; [] when
    its weights are safetensors (or, for a hub id, not yet known: transformers then refuses
    anything but safetensors itself)."""
    declared = _declared_weights_file(path, trust_remote_code)
    if declared and not declared.endswith((".safetensors", ".safetensors.index.json")):
        return [f"{declared}, named by config.json's transformers_weights"]
    directory = Path(path)
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return []
    return _pickle_files(directory)


def adapter_pickle_weights(adapter_dir: Path) -> list[str]:
    """The pickle files peft would load from a LoRA adapter directory, or []."""
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return []
    return _pickle_files(adapter_dir)


def check_pickle_weights(where: str, pickle_files: list[str], allow_pickle: bool) -> None:
    """Refuse pickle weights unless allowed; when allowed, say what the user has accepted."""
    if not pickle_files:
        return
    names = ", ".join(pickle_files)
    if not allow_pickle:
        raise PickleWeightsError(
            f"refusing to load {where}: its weights are pickle ({names}), and unpickling a "
            "file can run arbitrary code hidden in it. Convert them to safetensors (load the "
            "model once where you trust it and save it with save_pretrained, which writes "
            ".safetensors), or, if you trust where the files came from, set allow_pickle: true."
        )
    warn(
        f"warning: allow_pickle is set: loading pickle weights from {where} ({names}); "
        "unpickling a file can run arbitrary code hidden in it, so load only files you trust"
    )


def check_torch_version() -> None:
    """Refuse a torch older than what training calls: torch.compiler.set_stance,
    torch.nn.utils.get_total_norm and torch.distributed.fsdp.fully_shard (torch 2.6)."""
    if Version(torch.__version__).release[:2] < (2, 6):  # 2.6.0a0+nv... builds too
        raise InputError(
            f"sftforge needs torch >= 2.6 (set_stance, get_total_norm, fully_shard); this "
            f"environment has torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}). "
            "Install a newer build for your CUDA: pip install --upgrade torch --index-url "
            "https://download.pytorch.org/whl/cu126 (cu118, cu124, cu126...; the command for "
            "yours is at https://pytorch.org/get-started/locally/)"
        )


def load_model(
    path: str,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    attention: str = "sdpa",
    allow_pickle: bool = False,
    **loading,
):
    """A causal LM from safetensors weights; pickle weights (.bin, .pt ...) only with
    allow_pickle, after a warning. `loading` goes to from_pretrained (models/quantize.py's 4-bit)."""
    from transformers import AutoModelForCausalLM

    check_torch_version()
    pickled = model_pickle_weights(path, trust_remote_code)
    if allow_pickle and not pickled and not Path(path).is_dir():
        # A hub repository's files are known only once transformers looks: warn beforehand.
        pickled = ["pytorch_model.bin, if the repository has no safetensors"]
    check_pickle_weights(f"model {path}", pickled, allow_pickle)
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        # None lets transformers fall back to pytorch_model.bin when there is no safetensors.
        use_safetensors=None if allow_pickle else True,
        # Even opted-in pickle goes through torch's restricted unpickler (tensors and plain
        # containers only), which narrows, but does not close, the risk.
        weights_only=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=attention,
        **loading,
    )


def load_source_model(
    source: ModelSource, vocabulary_size: int, purpose: str, allow_pickle: bool = False, **loading
):
    """The causal LM `source` names (`purpose` is what the refusal of a tokenizer-only folder
    names). A LoRA run's adapter is attached to its base (a peft model), whose embeddings are
    first resized to the run's tokenizer (`vocabulary_size` tokens) when the run added
    template tokens: the adapter's trained rows expect them. `loading` goes to load_model."""
    from peft import PeftModel

    weights = source.require_weights(purpose)
    adapter = source.adapter
    if adapter is not None:
        # peft falls back to adapter_model.bin (pickle) when there is no .safetensors.
        pickled = adapter_pickle_weights(adapter)
        check_pickle_weights(f"LoRA adapter {adapter}", pickled, allow_pickle)
    model = load_model(weights, allow_pickle=allow_pickle, **loading)
    if adapter is None:
        return model
    if model.get_input_embeddings().num_embeddings != vocabulary_size:
        model.resize_token_embeddings(vocabulary_size, mean_resizing=False)
    with _peft_reading_a_deprecated_property():
        return PeftModel.from_pretrained(model, adapter)


def attention_implementation(choice: str) -> str:
    """'auto' is PyTorch's SDPA on every device. flash_attention_2 (CUDA, package flash_attn)
    must be asked for: it runs only in bf16/fp16, and evaluation here runs in fp32."""
    if choice != "auto":
        return choice
    return "sdpa"


def causal_lm(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attends_in_sliding_windows(config) -> bool:
    """Whether some of the model's layers attend only within a sliding window (Gemma 3,
    Mistral): such windows are counted in tokens of the row or cache, which a custom mask
    or a padded gap would change."""
    config = config.get_text_config()
    if not getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return any("sliding" in kind for kind in layer_types)
    return bool(getattr(config, "use_sliding_window", True))


class PackingError(RunFailed):
    pass


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant, as torch
    recommends). Tested to give the gradients of a run without it."""
    causal_lm(model).activation_checkpointing_enable({"use_reentrant": False})


def compile_decoder_layers(model, probe, backend="inductor") -> str | None:
    """torch.compile each decoder layer in place (shapes vary with each batch: dynamic) and
    compile them now, by running `probe` (a small forward and backward), so that a compiler
    that fails does so here rather than in the first step. The random generators are left
    as they were. Returns None, or why compiling failed: the caller then runs the model
    under torch.compiler.set_stance("force_eager")."""
    for layer in causal_lm(model).get_decoder().layers:
        layer.compile(dynamic=True, backend=backend)
    device = next(model.parameters()).device  # fork only its GPU's generator, not every GPU's
    try:
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            probe()
    except Exception as error:  # the compiler's errors have no common base but Exception
        cause = error
        while cause.__cause__ is not None:  # the compiler's own error, under dynamo's
            cause = cause.__cause__
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    return None


def fit_new_token_rows(model, tokenizer, new_ids: list[int]) -> None:
    """Give `model` rows for the tokens `new_ids` that were just added to `tokenizer` (the
    model may be loaded after the tokenizer got them), started at the mean of the rows of
    the tokens it had before."""
    if not new_ids:
        return
    if model.get_input_embeddings().weight.shape[0] <= max(new_ids):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    start_rows_at_the_mean(model, new_ids, known=len(tokenizer) - len(new_ids))


@torch.no_grad()
def start_rows_at_the_mean(model, ids: list[int], known: int) -> None:
    """Set the rows `ids` of the input embeddings and of the output head (once, when tied)
    to the mean of the rows of the `known` tokens the tokenizer had before."""
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    weights = {id(layer.weight): layer.weight for layer in layers if layer is not None}
    for weight in weights.values():
        weight[ids] = mean_row(weight.__getitem__, known, weight.dtype)


MEAN_CHUNK_ROWS = 4096


def mean_row(read_rows, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of rows 0..count-1, read `MEAN_CHUNK_ROWS` at a time by `read_rows(slice)`
    and summed in float64: the same bits whether the rows come from a whole weight
    or, a slice at a time, from its file (training/sharded_model.py)."""
    total = None
    for start in range(0, count, MEAN_CHUNK_ROWS):
        rows = read_rows(slice(start, min(start + MEAN_CHUNK_ROWS, count)))
        part = rows.to(torch.float64).sum(0)
        total = part if total is None else total + part
    return (total / count).to(dtype)


def has_tied_head(model) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def add_adapter_outputs_in_fp32(model) -> int:
    """Make each LoRA layer add its adapter's output to the base layer's output in fp32
    under autocast: a forward hook on the base layer hands its bf16/fp16 output on as fp32
    (peft then adds the adapter's output to it, and keeps the sum's dtype; autocast casts it
    for the next matmul). In bf16 the sum would round away what a young adapter adds, below
    1/256 of the base output. Without autocast (fp32, or a bf16 model run as it is stored)
    nothing changes. Returns the layers hooked."""
    from peft.tuners.lora import LoraLayer

    hooked = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.get_base_layer().register_forward_hook(_as_fp32)
            hooked += 1
    return hooked


def _as_fp32(module, args, output):
    if (
        isinstance(output, torch.Tensor)
        and output.dtype in (torch.bfloat16, torch.float16)
        and torch.is_autocast_enabled(output.device.type)
    ):
        return output.float()
    return None


def attach_lora(
    model,
    r: int,
    alpha: int,
    dropout: float,
    target_modules,
    new_token_ids,
    seed: int = 0,
    rslora: bool = False,
    dora: bool = False,
    init: LoraInit = "default",
):
    """LoRA adapters on `model` (peft), each started from a seed of its own (see
    `seed_adapters`), or from the base weights (`init` pissa, olora: peft computes them, and
    the base keeps the rest); scaled by alpha / sqrt(r) with `rslora`, as DoRA with `dora`."""
    from peft import LoraConfig, get_peft_model

    if init != "default" and (dora or getattr(model, "hf_quantizer", None) is not None):
        raise InputError(
            f"config key 'lora.init': {init} rewrites the base weights in full precision and "
            "is converted back to plain LoRA when saved; it goes with neither lora.dora nor "
            "a 4-bit base (method qlora)"
        )

    trainable_tokens = None
    if new_token_ids:
        # Rows of tokens the template added must learn, or the model never sees them mean
        # anything: train just those rows, of the embeddings and, when it is not tied to
        # them, of the output head (else every new token keeps the same output row, and the
        # model cannot tell them apart when it writes them).
        names = {module: name for name, module in model.named_modules()}
        trainable_tokens = {names[model.get_input_embeddings()]: list(new_token_ids)}
        if not has_tied_head(model):
            trainable_tokens[names[model.get_output_embeddings()]] = list(new_token_ids)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
        trainable_token_indices=trainable_tokens,
        use_rslora=rslora,
        use_dora=dora,
        init_lora_weights=True if init == "default" else init,
    )
    with _peft_reading_a_deprecated_property():
        adapted = get_peft_model(model, config)
    if init == "default":  # (the others come from the weights: the same in every process)
        seed_adapters(adapted, seed)
    drop_per_example(adapted)  # the same masks on any number of processes
    return adapted


def attach_configured_lora(model, lora, new_token_ids, seed: int):
    """`attach_lora` with the settings of a config's `lora` section."""
    return attach_lora(
        model, lora.r, lora.alpha, lora.dropout, lora.target_modules, new_token_ids, seed,
        rslora=lora.rslora, dora=lora.dora, init=lora.init,
    )  # fmt: skip


def seed_adapters(model, seed: int) -> None:
    """Start each LoRA layer's adapter (peft's own initialisation: A as nn.Linear's, B zero)
    from a seed made of the run's seed and the layer's name, not from wherever the global
    generator stands: the same values whether the model is built whole or on the meta
    device and sharded, on any number of processes. An adapter still on the meta device is
    given memory on the CPU (and left there)."""
    import hashlib

    from peft.tuners.lora import LoraLayer

    for name, module in causal_lm(model).named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            parts = (module.lora_A[adapter], module.lora_B[adapter])
            device = parts[0].weight.device
            for part in parts:  # drawn on the CPU, whatever device the model is on
                part.to_empty(device="cpu") if part.weight.is_meta else part.to("cpu")
            digest = hashlib.sha256(f"{seed}:{name}:{adapter}".encode()).digest()
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                module.reset_lora_parameters(adapter, True)
            if device.type != "meta":
                for part in parts:
                    part.to(device)


@contextmanager
def _peft_reading_a_deprecated_property():
    """peft (0.21) reads `model.is_gradient_checkpointing` as it wraps a model, a property
    transformers 5 deprecates with a FutureWarning on each read; the read is peft's, so that
    one warning is silenced around peft's wrapping alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning
        )
        yield
