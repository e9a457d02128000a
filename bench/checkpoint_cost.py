"""Size and time of one checkpoint of SmolLM2-135M, LoRA and full fine-tuning: save (with
the loadable model and tokenizer, and fsyncs) and load. Run: .venv/bin/python bench/checkpoint_cost.py"""

import tempfile
import time
from pathlib import Path

import torch

from sftforge.models.loading import attach_lora, load_model
from sftforge.models.source import resolve_model_path
from sftforge.models.tokenizer import load_tokenizer
from sftforge.training.checkpoint import load_checkpoint, save_checkpoint


def measure(method: str, path: str, tokenizer, folder: Path, saves: int = 3) -> str:
    model = load_model(path)
    if method == "lora":
        model = attach_lora(model, 16, 32, 0.0, "all-linear", [])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments exist, as in a real run

    def save_model(target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    times = []
    for step in range(1, saves + 1):
        start = time.perf_counter()
        checkpoint = save_checkpoint(folder, step, model, optimizer, {}, 2, save_model)
        times.append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    start = time.perf_counter()
    load_checkpoint(checkpoint, model, optimizer)
    loaded = time.perf_counter() - start
    trainable = sum(p.numel() for p in params)
    return (
        f"{method}: {trainable:,} trainable, checkpoint {size / 2**20:.1f} MiB, "
        f"save {min(times):.2f}-{max(times):.2f} s, load {loaded:.2f} s"
    )


def main() -> None:
    path = resolve_model_path("smollm2-135m")
    tokenizer = load_tokenizer(path)
    for method in ("lora", "full"):
        with tempfile.TemporaryDirectory(dir=".") as folder:
            print(measure(method, path, tokenizer, Path(folder)))


if __name__ == "__main__":
    main()
