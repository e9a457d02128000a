"""The adapter's output is added to the base layer's in fp32: under bf16 the young adapter's
small contribution survives the sum, and in fp32 nothing changes."""

import copy

import torch
from peft import LoraConfig, get_peft_model

from sftforge.models.loading import add_adapter_outputs_in_fp32, attach_lora


class OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.proj(x)


def young_adapter(fp32_sum: bool):
    """One LoRA layer whose B has taken a first small step (B starts at zero)."""
    model = get_peft_model(OneLayer(), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.full_like(p, 1e-4))
    if fp32_sum:
        assert add_adapter_outputs_in_fp32(model) == 1
    return model


def adapter_share(model, x) -> torch.Tensor:
    """(layer output - base output) under bf16 autocast: what the adapter added."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        with model.disable_adapter():
            base = model(x)
    return out.float() - base.float()


def test_under_bf16_the_adapters_small_output_survives_the_sum_only_in_fp32():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 10
    expected = young_adapter(False).base_model.model.proj
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        adapter = expected.lora_B["default"](expected.lora_A["default"](x)).float() * 2.0
    summed_in_fp32 = adapter_share(young_adapter(True), x)
    summed_in_bf16 = adapter_share(young_adapter(False), x)
    assert torch.allclose(summed_in_fp32, adapter, rtol=1e-2, atol=1e-6)
    # In bf16 most of it is rounded away: the base output is ~1e3 times larger.
    lost = (summed_in_bf16 - adapter).abs().mean() / adapter.abs().mean()
    assert lost > 0.5


def assert_same_outputs_and_gradients(model_a, model_b, amp=None):
    """The same logits and trained gradients, bit for bit, for one batch (under `amp`
    autocast when given)."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (model_a, model_b):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out.logits.detach(), grads))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_in_fp32_the_fp32_sum_changes_neither_outputs_nor_gradients(tiny_model_factory):
    base = tiny_model_factory(vocab_size=512)
    plain = attach_lora(copy.deepcopy(base), 4, 8, 0.0, "all-linear", [])
    with torch.no_grad():
        for p in (p for n, p in plain.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    hooked = copy.deepcopy(plain)
    assert add_adapter_outputs_in_fp32(hooked) > 0
    assert_same_outputs_and_gradients(plain, hooked)


def test_the_config_key_turns_the_fp32_sum_on_in_a_run_and_off_when_asked(
    tiny_model_dir, demo_records_40
):
    """Through the run's own preparation: under bf16 autocast a LoRA layer hands on fp32
    (its base output summed with the adapter's in fp32) only when lora.fp32_sum is on."""
    from peft.tuners.lora import LoraLayer

    from sftforge.config.loading import load_config
    from sftforge.training.prepare import prepare

    dtypes = {}
    for setting in (True, False):
        config = load_config(
            None,
            [
                f"model={tiny_model_dir}",
                f"data.train={demo_records_40}",
                f"lora.fp32_sum={str(setting).lower()}",
            ],
        )
        model = prepare(config, torch.device("cpu")).model
        layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
        x = torch.randn(2, layer.get_base_layer().in_features)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            dtypes[setting] = layer(x).dtype
    assert dtypes == {True: torch.float32, False: torch.bfloat16}


def test_frozen_matrices_stored_in_bf16_give_bf16_autocast_the_same_losses_and_gradients(
    tiny_model_factory,
):
    """Autocast casts each frozen fp32 matrix to bf16 at every use; stored in bf16 once, the
    matrix is that very cast: the logits and every trained gradient are the same, bit for bit.
    Embeddings, norms and adapters stay fp32."""
    from sftforge.training.prepare import store_frozen_matrices_as_computed

    base = tiny_model_factory(vocab_size=512)
    as_loaded = attach_lora(copy.deepcopy(base), 4, 8, 0.0, "all-linear", [])
    with torch.no_grad():
        for p in (p for n, p in as_loaded.named_parameters() if "lora_B" in n):
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    add_adapter_outputs_in_fp32(as_loaded)
    stored = copy.deepcopy(as_loaded)
    add_adapter_outputs_in_fp32(stored)  # deepcopy keeps no hooks
    converted = store_frozen_matrices_as_computed(stored, torch.bfloat16)
    layer_matrices = {
        n: p for n, p in stored.named_parameters() if ".layers." in n and p.dim() == 2
    }
    frozen = {n for n, p in layer_matrices.items() if not p.requires_grad}
    assert converted == sum(layer_matrices[n].numel() for n in frozen) > 0
    for name, p in stored.named_parameters():
        expected = torch.bfloat16 if name in frozen else torch.float32
        assert p.dtype == expected, name  # adapters, embeddings and norms stay fp32
    assert_same_outputs_and_gradients(as_loaded, stored, torch.bfloat16)


def test_a_bf16_lora_run_stores_its_frozen_matrices_in_bf16_and_an_fp32_run_does_not(
    tiny_model_dir, demo_records_40
):
    from sftforge.config.loading import load_config
    from sftforge.models.devices import autocast_dtype
    from sftforge.training.distributed import ALONE
    from sftforge.training.prepare import prepare_model_for, prepare_text

    dtypes = {}
    for precision in ("bf16", "fp32"):
        config = load_config(
            None,
            [
                f"model={tiny_model_dir}",
                f"data.train={demo_records_40}",
                f"training.precision={precision}",
            ],
        )
        cpu = torch.device("cpu")
        amp = autocast_dtype(precision, cpu)
        model, _, _ = prepare_model_for(config, cpu, prepare_text(config), ALONE, amp, False)
        dtypes[precision] = {p.dtype for n, p in model.named_parameters() if "q_proj.base" in n}
    assert dtypes == {"bf16": {torch.bfloat16}, "fp32": {torch.float32}}
