"""Runs with the update rules that change how much a step learns: bf16 weights rounded
stochastically each step, LoRA+'s faster B matrices, rsLoRA's scale and DoRA. Each trains,
saves fp32 masters, and resumes from a checkpoint to bitwise the weights of a run never
interrupted."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftforge.config.loading import load_config
from sftforge.training.loop import train


def run(tiny_model_dir, data, output_dir: Path, *extra: str, steps: int = 4):
    overrides = [
        f"model={tiny_model_dir}",
        f"data.train={data}",
        f"output_dir={output_dir}",
        f"training.max_steps={steps}",
        "training.save_every=2",
        "training.batch_size=2",
        "training.grad_accum=2",
        "training.device=cpu",
        "training.schedule=constant",
        "training.warmup_ratio=0",
        "training.weight_decay=0",
        "max_length=96",
        "eval.forgetting=false",
        "eval.samples=0",
        *extra,
    ]
    return train(load_config(None, overrides))


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (output_dir / name).exists():
            return load_file(output_dir / name)
    raise FileNotFoundError(output_dir)


def resumed_from_step_2(reference: Path, tmp_path: Path, tiny_model_dir, data, *extra: str):
    """The reference run's folder as it stood after its step-2 checkpoint, run on to the end."""
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    rows = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")
    run(tiny_model_dir, data, resumed, *extra, "resume=auto")
    return resumed


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


@pytest.mark.parametrize(
    "method, extra",
    [
        ("full", ["training.precision=bf16", "training.lr=1e-4"]),
        ("lora", ["training.precision=bf16", "lora.b_lr_ratio=8", "lora.rslora=true"]),
    ],
    ids=["full-bf16-stochastic", "lora-plus-rslora-bf16-stochastic"],
)
def test_bf16_stochastic_rounding_and_lora_plus_resume_bitwise_and_save_fp32_masters(
    tmp_path, tiny_model_dir, demo_records_16, method, extra
):
    extra = [f"method={method}", *extra]
    reference = tmp_path / "reference"
    run(tiny_model_dir, demo_records_16, reference, *extra)
    resumed = resumed_from_step_2(reference, tmp_path, tiny_model_dir, demo_records_16, *extra)
    assert_same_weights(weights(reference), weights(resumed))
    # The saved weights are the fp32 masters, not the bf16 values the steps computed with.
    trained = [t for name, t in weights(reference).items() if t.dim() >= 2]
    assert any(not torch.equal(t, t.bfloat16().float()) for t in trained)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


def test_lora_plus_moves_b_by_its_ratio_times_the_learning_rate(
    tmp_path, tiny_model_dir, demo_records_16
):
    """B starts at zero, and Adam's first step moves each weight with a gradient by the
    learning rate (less only where the gradient is near Adam's epsilon): after one step
    B's elements are +-(ratio x lr)."""
    lr, ratio = 1e-3, 8
    for setting, expected in ((1, lr), (ratio, ratio * lr)):
        out = tmp_path / f"ratio-{setting}"
        run(tiny_model_dir, demo_records_16, out, f"training.lr={lr}", f"lora.b_lr_ratio={setting}",
            "training.precision=fp32", "lora.dropout=0", steps=1)  # fmt: skip
        b = torch.cat([t.flatten() for n, t in weights(out).items() if "lora_B" in n])
        moved = b[b != 0].abs()
        assert len(moved) > 0.9 * len(b)
        assert moved.max() == pytest.approx(expected, rel=1e-3)
        assert moved.median() == pytest.approx(expected, rel=1e-3)


def test_rslora_and_dora_reach_peft(tiny_model_dir, demo_records_16):
    from peft.tuners.lora import LoraLayer

    from sftforge.training.prepare import prepare

    config = load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"data.train={demo_records_16}",
            "lora.rslora=true",
            "lora.dora=true",
            "lora.r=4",
            "lora.alpha=8",
        ],
    )
    model = prepare(config, torch.device("cpu")).model
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r)
    assert layer.use_dora["default"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
