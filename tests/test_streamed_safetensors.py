"""A safetensors file written one tensor at a time reads back as `save_file`'s does."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sftforge.models.streamed_safetensors import StreamedSafetensors


def tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 5),
        "norm.weight": torch.randn(5, dtype=torch.bfloat16),
        "scale": torch.tensor(3.5),
        "mask": torch.rand(3, 4) > 0.5,
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "a.t": torch.randn(4, 3).t(),  # not contiguous
    }


def test_a_streamed_file_holds_what_save_file_writes(tmp_path):
    want = tensors()
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in want.items()]
    with StreamedSafetensors(tmp_path / "streamed.safetensors", layout, {"format": "pt"}) as out:
        for name, tensor in want.items():
            out.write(name, tensor)
    save_file({n: t.contiguous() for n, t in want.items()}, tmp_path / "whole.safetensors")

    got, whole = (
        load_file(tmp_path / "streamed.safetensors"),
        load_file(tmp_path / "whole.safetensors"),
    )
    assert got.keys() == whole.keys() == want.keys()
    for name in want:
        assert got[name].dtype == whole[name].dtype and torch.equal(got[name], whole[name]), name
    with safe_open(tmp_path / "streamed.safetensors", "pt") as opened:
        assert opened.metadata() == {"format": "pt"}


def test_tensors_out_of_order_of_another_shape_or_missing_are_refused(tmp_path):
    layout = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with (
        pytest.raises(ValueError, match="b written out of the header's order"),
        StreamedSafetensors(tmp_path / "f", layout) as out,
    ):
        out.write("b", torch.zeros(3))
    with (
        pytest.raises(ValueError, match=r"a is torch.float32 \(3,\), not"),
        StreamedSafetensors(tmp_path / "f", layout) as out,
    ):
        out.write("a", torch.zeros(3))
    with (
        pytest.raises(ValueError, match="1 tensors not written"),
        StreamedSafetensors(tmp_path / "f", layout) as out,
    ):
        out.write("a", torch.zeros(2))


def test_a_model_written_in_several_files_loads_in_transformers(tmp_path, monkeypatch):
    """write_sharded_weights on a whole model (one process): files of at most SHARD_BYTES
    with transformers' index, read back by from_pretrained as the same weights."""
    from model_families import tiny_llama
    from transformers import AutoModelForCausalLM

    from sftforge.training import sharded_model
    from sftforge.training.distributed import ALONE

    model = tiny_llama(1024)
    monkeypatch.setattr(sharded_model, "SHARD_BYTES", 100_000)
    sharded_model.write_sharded_weights(tmp_path / "out", None, model, ALONE)

    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    want = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[name]), name
