"""Run under torchrun by test_sharded_load.py: build a run's model as training does under
FSDP (`prepare_model_for`), or, with `--whole`, load it whole on each rank and shard it after
(what FSDP did before sharded loading), then write into OUT:

    peak-rank<R>.json   this rank's growth of resident memory while loading (bytes)
    gathered.safetensors  every weight as the ranks hold it, gathered on rank 0, and the
                        logits of a probe batch (`probe_logits`)
    written/            the model (or adapter) written by a sharded finish

usage: sharded_load.py OUT [--whole] KEY=VALUE...   (config overrides)
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from sftforge.config.loading import load_config
from sftforge.models.loading import causal_lm
from sftforge.training.distributed import (
    end_processes,
    on_sharded_model,
    start_processes,
    wait_for_all,
    world_from_environment,
    wrap_for_training,
)
from sftforge.training.prepare import prepare_model, prepare_model_for, prepare_text, training_loss
from sftforge.training.sharded_model import write_sharded_weights


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    out, whole, overrides = Path(sys.argv[1]), "--whole" in sys.argv, sys.argv[2:]
    overrides = [o for o in overrides if o != "--whole"]
    config = load_config(None, overrides + ["training.parallelism=fsdp", "training.device=cpu"])
    world = world_from_environment()
    device = torch.device("cpu")
    start_processes(world, device, 120)
    text = prepare_text(config)
    torch.manual_seed(config.training.seed)
    # The code is imported before the measurement (a model built on the meta device): the
    # memory measured is the weights'.
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(text.base_model_path))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    before = resident_bytes("VmRSS")
    if whole:
        model, _ = prepare_model(config, device, text)
        layers = causal_lm(model).get_decoder().layers
        trainer = wrap_for_training(training_loss(config, model), layers, world, "fsdp", None)
    else:
        model, _, trainer = prepare_model_for(config, device, text, world, None, False)
    peak = resident_bytes("VmHWM") - before
    (out / f"peak-rank{world.rank}.json").write_text(json.dumps(peak))

    probe = torch.arange(1, 17).reshape(2, 8)  # buffers (rotary, embedding scale) show here
    logits = on_sharded_model(trainer, lambda m: m(input_ids=probe).logits.detach().clone())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = get_model_state_dict(trainer, options=options)
    if world.is_main:
        tensors = {name.removeprefix("model."): t.clone() for name, t in gathered.items()}
        save_file(tensors | {"probe_logits": logits}, out / "gathered.safetensors")
    write_sharded_weights(out / "written" if world.is_main else None, trainer, model, world)
    wait_for_all(world)
    end_processes()


if __name__ == "__main__":
    main()
