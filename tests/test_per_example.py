"""Dropout masks and NEFTune noise are drawn per example: however a step's examples are laid
out (alone, padded together, packed into one row, in another order), each example gets the
same numbers, so one process and many train the same run (tests/test_distributed.py checks
that under torchrun at the default settings)."""

import pytest
import torch
from test_packing import random_examples

from sftforge.encode.batches import collate_rows
from sftforge.models.loading import attach_lora
from sftforge.models.loss import TokenLoss
from sftforge.models.per_example import ExampleDropout, drawing_per_example
from sftforge.training.update import accumulate_gradients

VOCAB = 512
CPU = torch.device("cpu")


def layouts(examples):
    """The same 5 examples laid out three ways: (rows of indices) per micro-batch."""
    return {
        "each alone": [[[i]] for i in range(5)],
        "padded together, reversed": [[[4], [3], [2], [1], [0]]],
        "packed in two rows": [[[0, 3, 1], [2, 4]]],
    }


def step_gradients(model, loss: TokenLoss, examples, plan, draw_seed):
    batches = [
        collate_rows([[examples[i] for i in row] for row in mb], 0, indices=mb) for mb in plan
    ]
    model.zero_grad(set_to_none=True)
    value, _ = accumulate_gradients(loss, batches, CPU, None, draw_seed=draw_seed)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value, grads


@pytest.mark.parametrize("randomness", ["lora dropout", "neftune"])
def test_each_example_draws_the_same_numbers_in_any_layout(tiny_model_factory, randomness):
    examples = random_examples(5, seed=3)
    model = attach_lora(
        tiny_model_factory(VOCAB),
        4,
        8,
        0.5 if randomness == "lora dropout" else 0,
        "all-linear",
        [],
    )
    loss = TokenLoss(model, neftune_alpha=5.0 if randomness == "neftune" else None).train()
    results = {
        name: step_gradients(model, loss, examples, plan, draw_seed=7)
        for name, plan in layouts(examples).items()
    }
    (want_loss, want), *others = results.values()
    for got_loss, got in others:
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # Drawn from torch's generator instead, the layouts differ: the check can tell. (LoRA's
    # B starts at zero, so dropout on its input shows in the gradients, not in the loss.)
    torch.manual_seed(0)
    _, alone = step_gradients(model, loss, examples, layouts(examples)["each alone"], None)
    torch.manual_seed(0)
    _, packed = step_gradients(model, loss, examples, layouts(examples)["packed in two rows"], None)
    assert any(not torch.allclose(alone[n], packed[n], rtol=1e-3, atol=1e-6) for n in alone)


def test_another_step_draws_other_numbers(tiny_model_factory):
    examples = random_examples(5, seed=3)
    model = attach_lora(tiny_model_factory(VOCAB), 4, 8, 0.5, "all-linear", [])
    loss, plan = TokenLoss(model).train(), layouts(examples)["each alone"]
    _, first = step_gradients(model, loss, examples, plan, draw_seed=7)
    _, again = step_gradients(model, loss, examples, plan, draw_seed=7)
    _, other = step_gradients(model, loss, examples, plan, draw_seed=8)
    assert all(torch.equal(again[n], first[n]) for n in first)
    assert any(not torch.allclose(other[n], first[n], rtol=1e-3, atol=1e-6) for n in first)


def test_example_dropout_drops_p_and_scales_the_rest_in_training_only():
    dropout = ExampleDropout(0.25, stream=1)
    x = torch.ones(2, 50, 64)
    spans = [(0, 0, 30, 11), (0, 30, 20, 12), (1, 0, 50, 13)]
    with drawing_per_example(5, spans, row_length=50):
        dropped = dropout.train()(x)
        assert torch.equal(dropout.eval()(x), x)
    kept = dropped != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3
    assert torch.allclose(dropped[kept], torch.tensor(1 / 0.75))


def test_lora_layers_drop_per_example():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = attach_lora(LlamaForCausalLM(config), 4, 8, 0.05, "all-linear", [])
    dropouts = [m for m in model.modules() if isinstance(m, ExampleDropout)]
    assert len(dropouts) == 7  # q, k, v, o, gate, up, down
    assert len({d.stream for d in dropouts}) == 7


def test_gradient_checkpointing_recomputes_the_masks_it_drew(tiny_model_factory):
    """The backward recomputes each layer under the same per-example draws: without them it
    would draw other masks from torch's generator, and the gradients would differ."""
    from sftforge.models.loading import enable_gradient_checkpointing

    examples = random_examples(5, seed=3)
    plan = layouts(examples)["packed in two rows"]
    model = attach_lora(tiny_model_factory(VOCAB), 4, 8, 0.5, "all-linear", [])
    loss = TokenLoss(model).train()
    _, plain = step_gradients(model, loss, examples, plan, draw_seed=7)
    enable_gradient_checkpointing(model)
    _, recomputed = step_gradients(model, loss, examples, plan, draw_seed=7)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
