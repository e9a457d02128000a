"""`lora.init: pissa | olora`: adapters computed from the base weights (peft's PiSSA: the
principal singular directions; OLoRA: a QR factor), the base keeping the rest. The run saves
its adapter converted to plain LoRA of rank 2r on the *original* base, so that peft, merge and
the GGUF export load it like any other; and it resumes bitwise."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_learning_rules import assert_same_weights, resumed_from_step_2, run, weights
from transformers import AutoModelForCausalLM

from sftforge.config.loading import load_config
from sftforge.errors import InputError
from sftforge.models.loading import attach_configured_lora
from sftforge.training.checkpoint import load_trainable_state
from sftforge.training.distributed import DistributedError, World, check_parallel_settings

SETTINGS = ["training.precision=fp32", "training.lr=2e-3", "lora.r=4", "lora.dropout=0"]


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_started_from_the_weights_is_saved_as_plain_lora_on_the_original_base(
    tmp_path, tiny_model_dir, demo_records_16, init
):
    out = tmp_path / init
    run(tiny_model_dir, demo_records_16, out, f"lora.init={init}", *SETTINGS)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # rank 2r, loads as LoRA

    # The model as training left it: the base rewritten by the init, then the trained adapters.
    config = load_config(None, [f"data.train={demo_records_16}", f"lora.init={init}", *SETTINGS])
    trained = attach_configured_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), config.lora, [], seed=42
    )
    final = out / "checkpoints" / "step-000004" / "trainable.safetensors"
    load_trainable_state(trained, load_file(final), final)
    # The saved adapter, on the base as it is on disk.
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[1, 17, 230, 4000, 9, 77, 2]])
    with torch.no_grad():
        base_logits = original(ids).logits
        loaded = PeftModel.from_pretrained(original, out)
        torch.testing.assert_close(loaded(ids).logits, trained(ids).logits, atol=2e-5, rtol=0)
        assert (loaded(ids).logits - base_logits).abs().max() > 1e-3  # it learnt something

    resumed = resumed_from_step_2(
        out, tmp_path, tiny_model_dir, demo_records_16, f"lora.init={init}", *SETTINGS
    )
    assert_same_weights(weights(out), weights(resumed))


def test_what_a_weight_computed_init_cannot_go_with_is_refused_naming_lora_init(
    tmp_path, tiny_model_dir, demo_records_16
):
    with pytest.raises(InputError, match="config key 'lora.init': pissa .* lora.dora"):
        run(tiny_model_dir, demo_records_16, tmp_path / "d", "lora.init=pissa", "lora.dora=true")
    config = load_config(None, ["data.train=x.jsonl", "lora.init=olora"])
    config.training.parallelism = "fsdp"
    with pytest.raises(DistributedError, match="'lora.init': olora .* training.parallelism=ddp"):
        check_parallel_settings(config, World(rank=0, size=2, local_rank=0))
