"""Rows that share a prefix: the examples' common untrained beginning written once.

The promise is that of packing: how a step's examples are laid out changes speed, never the
loss or the gradient."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sftforge.config.loading import ConfigError, load_config
from sftforge.encode.batches import collate
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models.loading import PackingError
from sftforge.models.loss import TokenLoss, summed_token_loss
from sftforge.models.prefix_sharing import (
    collate_shared_rows,
    pack_sharing_prefixes,
    shareable_length,
    shared_step_batches,
    verify_prefix_sharing,
)
from sftforge.training.update import accumulate_gradients

VOCAB = 512
CPU = torch.device("cpu")


def examples_with_prefixes(n: int, seed: int, prefixes: int = 2) -> list[Example]:
    """Examples that begin with one of a few untrained prefixes (a system prompt, tools),
    then an untrained question and a trained answer."""
    rng = random.Random(seed)
    heads = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 24))] for _ in range(prefixes)]
    examples = []
    for i in range(n):
        head = rng.choice(heads)
        question = [rng.randrange(3, VOCAB) for _ in range(rng.randint(0, 8))]
        answer = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 10))] + [2]
        prompt = head + question
        examples.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, f"ex{i}"))
    return examples


def loss_and_gradients(model, batches):
    model.zero_grad(set_to_none=True)
    loss, count = accumulate_gradients(TokenLoss(model), batches, CPU, None)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, count, grads


def test_a_row_holds_the_common_prefix_once_and_each_examples_rest_after_it():
    a = Example([7, 8, 9, 10, 11], [IGNORE_INDEX] * 3 + [10, 11], "a")
    b = Example([7, 8, 9, 20, 21, 22], [IGNORE_INDEX] * 4 + [21, 22], "b")
    batch = collate_shared_rows([(3, [a, b])], pad_id=0)
    assert batch.input_ids.tolist() == [[7, 8, 9, 10, 11, 20, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    # b's rest is predicted from a's last token in the row: its first token is not trained.
    assert batch.labels.tolist() == [[IGNORE_INDEX] * 3 + [10, 11, IGNORE_INDEX, 21, 22]]
    allowed = batch.attention_mask[0, 0].int().tolist()
    assert allowed[5] == [1, 1, 1, 0, 0, 1, 0, 0]  # b's first token: the prefix and itself
    assert allowed[7] == [1, 1, 1, 0, 0, 1, 1, 1]
    assert allowed[4] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch.real_tokens == 8 and batch.trained_tokens == 4
    # The prefix's 3 tokens (6 pairs), then a's 2 and b's 3 each seeing the prefix.
    assert batch.attended_pairs == 6 + (2 * 3 + 3) + (3 * 3 + 6)


def test_the_shared_prefix_stops_before_the_first_trained_token():
    # Raw text trains from its second token: nothing of it can be shared.
    raw = Example([5, 6, 7], [5, 6, 7], "raw")
    assert shareable_length(raw) == 0
    chat = Example([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], "chat")
    assert shareable_length(chat) == 1
    same_start = Example([5, 6, 9, 9], [IGNORE_INDEX, IGNORE_INDEX, 9, 9], "same start")
    (row,) = pack_sharing_prefixes([chat, same_start], [0, 1], capacity=100)
    assert row.shared == 1  # token 6 would have to predict both 7 and 9


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 14), capacity=st.integers(48, 160))
def test_every_example_is_placed_once_in_a_row_that_fits(seed, n, capacity):
    examples = examples_with_prefixes(n, seed)
    lengths = [len(e.input_ids) for e in examples]
    rows = pack_sharing_prefixes(examples, list(range(n)), capacity)
    assert sorted(i for row in rows for i in row.members) == list(range(n))
    for row in rows:
        assert row.cost(lengths) <= capacity
        assert row.shared <= min(shareable_length(examples[i]) for i in row.members)
        heads = {tuple(examples[i].input_ids[: row.shared]) for i in row.members}
        assert len(heads) == 1


def test_examples_with_one_system_prompt_cost_far_fewer_tokens():
    examples = examples_with_prefixes(12, seed=3, prefixes=1)
    head = examples[0].input_ids[:4]
    long_head = [
        Example(head * 10 + e.input_ids, [IGNORE_INDEX] * 40 + e.labels, e.source) for e in examples
    ]
    lengths = [len(e.input_ids) for e in long_head]
    rows = pack_sharing_prefixes(long_head, list(range(12)), capacity=1024)
    assert len(rows) == 1 and rows[0].shared >= 40
    assert rows[0].cost(lengths) <= sum(lengths) - 11 * 40


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.sampled_from([48, 96, 400]))
def test_shared_rows_give_the_loss_and_gradients_of_the_examples_unpacked(
    tiny_model_factory, attention, seed, capacity
):
    model = tiny_model_factory(VOCAB)
    model.config._attn_implementation = attention
    examples = examples_with_prefixes(10, seed)
    lengths = [len(e.input_ids) for e in examples]
    step = list(range(10))
    reference = loss_and_gradients(model, [collate(examples, 0)])
    shared = shared_step_batches(examples, lengths, step, 0, batch_size=3, pack_length=capacity)
    loss, count, grads = loss_and_gradients(model, shared)
    assert count == reference[1] == sum(e.trained_token_count for e in examples)
    assert abs(loss - reference[0]) < 1e-5
    for name, g in reference[2].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


def test_without_its_mask_a_shared_row_would_change_the_loss(tiny_model_factory):
    # Guard that the test above can fail: the same row read with restarting positions only.
    model = tiny_model_factory(VOCAB)
    examples = examples_with_prefixes(6, seed=5, prefixes=1)
    (batch,) = shared_step_batches(examples, [0] * 6, list(range(6)), 0, 8, pack_length=400)
    masked = summed_token_loss(
        model,
        batch.input_ids,
        batch.labels,
        batch.position_ids,
        attention_mask=batch.attention_mask,
    )
    unmasked = summed_token_loss(model, batch.input_ids, batch.labels, batch.position_ids)
    assert abs(masked.item() - unmasked.item()) > 1e-3


def test_the_sharing_check_passes_for_sdpa_and_refuses_a_short_sliding_window(
    tiny_model_factory,
):
    model = tiny_model_factory(VOCAB)
    verify_prefix_sharing(model, CPU, row_length=1024)
    model.config.sliding_window = 512
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(PackingError, match="sliding window of 512"):
        verify_prefix_sharing(model, CPU, row_length=1024)
    verify_prefix_sharing(model, CPU, row_length=512)


def test_the_sharing_check_runs_under_the_runs_autocast_with_frozen_matrices_in_bf16(
    tiny_model_factory,
):
    """A bf16 LoRA run stores its frozen matrices in bf16: the check computes as training
    does, under bf16 autocast (in fp32 the matmuls would refuse the mixed dtypes)."""
    from sftforge.models.loading import attach_lora
    from sftforge.training.prepare import store_frozen_matrices_as_computed

    model = attach_lora(tiny_model_factory(VOCAB), 4, 8, 0.0, "all-linear", [])
    assert store_frozen_matrices_as_computed(model, torch.bfloat16) > 0
    verify_prefix_sharing(model, CPU, row_length=1024, amp=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        verify_prefix_sharing(model, CPU, row_length=1024)


@pytest.mark.parametrize(
    "overrides, why",
    [
        (["training.share_prefixes=true"], "needs training.packing=true"),
        (
            ["training.share_prefixes=true", "training.packing=true", "training.neftune_alpha=5"],
            "neftune_alpha",
        ),
        (
            [
                "training.share_prefixes=true",
                "training.packing=true",
                "attention=flash_attention_2",
            ],
            "flash_attention_2",
        ),
    ],
)
def test_settings_that_cannot_share_prefixes_are_refused_by_key(overrides, why):
    with pytest.raises(ConfigError, match=why) as raised:
        load_config(None, ["data.train=x.jsonl", *overrides])
    assert "training.share_prefixes" in str(raised.value)


def test_the_held_out_loss_in_shared_rows_is_the_plain_one(tiny_model_factory):
    from sftforge.evaluation.generation import mean_token_loss, summed_loss_and_count

    model = tiny_model_factory(VOCAB)
    examples = examples_with_prefixes(20, seed=9)
    plain = mean_token_loss(model, examples, CPU, 0, batch_size=4)
    shared = mean_token_loss(model, examples, CPU, 0, batch_size=4, shared_rows_of=120)
    assert shared == pytest.approx(plain, rel=1e-6)
    # As many forward passes as asked for, however few the shared rows need.
    _, count = summed_loss_and_count(TokenLoss(model), examples, CPU, 0, 4, 5, shared_rows_of=120)
    assert count == sum(e.trained_token_count for e in examples)
