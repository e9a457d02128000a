"""What one micro-batch keeps alive for its backward pass: every tensor autograd saves during
the forward, by the module that saved it and by dtype, counted once per storage.

    .venv/bin/python bench/saved_for_backward.py --precision bf16 --emulate-bf16 \\
        [--set lora.fp32_sum=false]

The run is set up as `sftforge train` would (loop.start), then one micro-batch of
--micro-batch demo examples runs forward under `torch.autograd.graph.saved_tensors_hooks`;
as training runs it (peft's cast of adapter inputs to fp32 off under autocast);
each saved tensor is attributed to the innermost module whose forward was running. With
the weights themselves this is most of a LoRA step's peak memory on top of the model.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import tempfile
from pathlib import Path

import torch
from emulated_bf16 import EmulatedBf16Matmuls  # bench/emulated_bf16.py

from sftforge.config.loading import load_config
from sftforge.encode.batches import collate
from sftforge.models.devices import autocast
from sftforge.models.loading import adapter_input_casts
from sftforge.models.loss import batch_loss
from sftforge.training.loop import start

DEMO = Path(__file__).resolve().parent.parent / "src/sftforge/assets/demo_train.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="bf16")
    p.add_argument("--method", default="lora")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--emulate-bf16", action="store_true")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--set", action="append", default=[], help="a config override KEY=VALUE")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, [
            f"data.train={DEMO}", f"output_dir={out}", f"method={args.method}",
            "lora.dropout=0.0", f"training.precision={args.precision}",
            f"training.batch_size={args.micro_batch}", "eval.forgetting=false",
            "eval.samples=0", *args.set,
        ])  # fmt: skip
        run = start(config)
    batch = collate([run.data.examples[i] for i in range(args.micro_batch)], run.encoder.pad_id)

    where: list[str] = []  # the modules whose forward is running, innermost last
    names = {module: name for name, module in run.learner.model.named_modules()}

    def enter(module, _inputs):
        where.append(names.get(module, type(module).__name__))

    def leave(module, _inputs, _output):
        where.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    seen: set[int] = set()
    by_place: collections.Counter = collections.Counter()
    by_dtype: collections.Counter = collections.Counter()
    parameters = {p.untyped_storage().data_ptr() for p in run.learner.model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in parameters and storage.nbytes():
            seen.add(key)
            place = where[-1] if where else "(loss)"
            kind = ".".join(part for part in place.split(".") if not part.isdigit())
            by_place[kind, str(tensor.dtype).removeprefix("torch.")] += storage.nbytes()
            by_dtype[str(tensor.dtype).removeprefix("torch.")] += storage.nbytes()
        return tensor

    numerics = EmulatedBf16Matmuls() if args.emulate_bf16 else contextlib.nullcontext()
    saving = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    as_training = adapter_input_casts(run.learner.trainer, enabled=run.learner.amp is None)
    with saving, numerics, as_training, autocast(run.learner.device, run.learner.amp):
        loss = batch_loss(run.learner.trainer, batch)
    for handle in handles:
        handle.remove()
    del loss
    total = sum(by_dtype.values())
    tokens = int(batch.input_ids.numel())
    print(f"one micro-batch: {args.micro_batch} examples, {tokens} token positions, "
          f"{args.precision}, {' '.join(args.set) or 'defaults'}")  # fmt: skip
    print(
        f"saved for the backward: {total / 2**30:.3f} GiB "
        f"({', '.join(f'{d} {b / 2**30:.3f}' for d, b in by_dtype.most_common())})\n"
    )
    print("| saved in (layers folded together) | dtype | GiB |\n|---|---|---:|")
    for (place, dtype), size in by_place.most_common(args.top):
        print(f"| {place} | {dtype} | {size / 2**30:.3f} |")


if __name__ == "__main__":
    main()
