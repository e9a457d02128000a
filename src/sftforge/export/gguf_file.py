"""Writing a GGUF file: the model's hyperparameters, its vocabulary and chat template, and its
weights, one tensor at a time (memory does not hold a second copy of the model).

f16, bf16 and q8_0 are written here with the `gguf` package; the k-quants (q4_k_m, ...) come
from llama.cpp's own quantizer, through llama-cpp-python, applied to an f16 file. The file
is written under a temporary name beside the output and renamed when whole, so a failure (a
full disk) never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from sftforge.errors import InputError, RunFailed
from sftforge.export.architectures import Architecture
from sftforge.export.vocabulary import Vocabulary

Q = gguf.GGMLQuantizationType
# What each of our own types writes a matrix as, and the file type it declares.
PYTHON_TYPES = {
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Types llama.cpp's quantizer makes (from an f16 file).
LLAMA_CPP_TYPES = ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANT_TYPES = (*PYTHON_TYPES, *LLAMA_CPP_TYPES)


class LlamaCppMissing(InputError):
    """A type only llama.cpp's quantizer makes, asked for where llama-cpp-python is not."""


def check_quant_type(quant: str) -> None:
    """Refuse an unknown type, or a k-quant without llama.cpp, before any work is done."""
    if quant not in QUANT_TYPES:
        raise InputError(f"--quant {quant!r}: choose one of {', '.join(QUANT_TYPES)}")
    if quant in LLAMA_CPP_TYPES:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            raise LlamaCppMissing(
                f"--quant {quant} is made by llama.cpp's own quantizer, and llama-cpp-python "
                "is not installed here. Install it (it builds llama.cpp from source with the "
                "C/C++ compiler and cmake): pip install llama-cpp-python, or `make llama-cpp` "
                "in a sftforge checkout; or export f16, bf16 or q8_0, which need nothing more"
            ) from e


def write_gguf(
    model: torch.nn.Module,
    architecture: Architecture,
    vocabulary: Vocabulary,
    output: Path,
    quant: str,
    name: str,
    sampling_temperature: float | None = 0.0,
) -> None:
    """The model as a GGUF file at `output` (whole, or not there at all)."""
    check_quant_type(quant)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    f16 = output.with_name(f".{output.name}.f16-{os.getpid()}")
    try:
        if quant in PYTHON_TYPES:
            _write(model, architecture, vocabulary, partial, quant, name, sampling_temperature)
        else:
            _write(model, architecture, vocabulary, f16, "f16", name, sampling_temperature)
            _llama_cpp_quantize(f16, partial, quant)
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())  # on disk before it takes the final name
        os.replace(partial, output)
    except OSError as e:
        raise RunFailed(
            f"writing {output} failed ({e.strerror or e}); nothing was left under that name "
            "(a full disk: free space and export again)"
        ) from e
    finally:
        for leftover in (partial, f16):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _write(model, architecture, vocabulary, path, quant, name, sampling_temperature) -> None:
    matrix_type, file_type = PYTHON_TYPES[quant]
    config = model.config
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[architecture.gguf_arch])
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    architecture.write_hyperparameters(writer, config)
    vocabulary.write(writer)
    if sampling_temperature is not None:
        writer.add_sampling_temp(sampling_temperature)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    plan = list(_tensor_plan(model, architecture, matrix_type))
    for gguf_name, _, shape, qtype in plan:
        stored = gguf.quant_shape_to_byte_shape(shape, qtype) if _is_blocked(qtype) else shape
        dtype = np.uint8 if _is_blocked(qtype) else _numpy_dtype(qtype)
        nbytes = int(np.prod(stored)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gguf_name, stored, np.dtype(dtype), nbytes, raw_dtype=qtype)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, tensor, _, qtype in plan:
        weights = tensor.detach().to("cpu", torch.float32).numpy()
        weights = architecture.to_gguf_layout(gguf_name, weights, config)
        writer.write_tensor_data(np.ascontiguousarray(gguf.quants.quantize(weights, qtype)))
    writer.close()


def _is_blocked(qtype: Q) -> bool:
    return qtype not in (Q.F32, Q.F16)


def _numpy_dtype(qtype: Q):
    return {Q.F32: np.float32, Q.F16: np.float16}[qtype]


def _tensor_plan(
    model: torch.nn.Module, architecture: Architecture, matrix_type: Q
) -> Iterator[tuple[str, torch.Tensor, tuple[int, ...], Q]]:
    """(GGUF name, tensor, shape, type) for every weight llama.cpp reads; a tied head is
    left out (llama.cpp reuses the embeddings, as the model does)."""
    config = model.config
    names = gguf.get_tensor_name_map(architecture.gguf_arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name.startswith("lm_head."):
            continue
        if "rotary_emb" in hf_name:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"{hf_name}: a weight with no GGUF name for {architecture.name}")
        shape = tuple(tensor.shape)
        if len(shape) == 1:
            qtype = Q.F32  # norms and biases: small, and precision-sensitive
        elif matrix_type == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
            qtype = Q.F16  # rows that do not split into whole q8_0 blocks
        else:
            qtype = matrix_type
        yield gguf_name, tensor, shape, qtype


def _llama_cpp_quantize(source: Path, target: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = os.cpu_count() or 1
    failed = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), params
    )  # fmt: skip
    if failed:
        raise InputError(f"llama.cpp could not quantize the model to {quant} (code {failed})")
