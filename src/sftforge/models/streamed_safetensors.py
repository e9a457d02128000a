"""A safetensors file written one tensor at a time.

`safetensors.torch.save_file` takes every tensor of a file at once; a model gathered from
FSDP's shards would then be whole in one process's memory. The format is a little-endian
u64 header length, a JSON header (each tensor's dtype, shape and byte offsets, padded with
spaces to 8 bytes), then the tensors' bytes in that order, so once every tensor's dtype and
shape is known the header can be written first and each tensor's bytes appended as it comes.
The files read back with `safetensors` (and transformers) like any other; the tests compare
them with `save_file`'s.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


class StreamedSafetensors:
    """with StreamedSafetensors(path, [(name, dtype, shape), ...]) as file:
    file.write(name, tensor) for each, in that order."""

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple]], metadata=None):
        self.path, self.order, self.next = Path(path), [name for name, _, _ in layout], 0
        header, offset = {}, 0
        for name, dtype, shape in layout:
            size = dtype.itemsize * (int(torch.Size(shape).numel()))
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}  # fmt: skip
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.layout = {name: (dtype, tuple(shape)) for name, dtype, shape in layout}
        self.file = self.path.open("wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or name != self.order[self.next]:
            raise ValueError(f"{self.path}: {name} written out of the header's order")
        if (tensor.dtype, tuple(tensor.shape)) != self.layout[name]:
            raise ValueError(f"{self.path}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"not {self.layout[name]} as its header says")  # fmt: skip
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self.file.write(memoryview(data.view(torch.uint8).numpy()))
        self.next += 1

    def __enter__(self) -> StreamedSafetensors:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.file.close()
        if kind is None and self.next != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensors not written")
