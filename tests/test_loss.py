"""The loss: token-normalised across micro-batches, head computed only where trained."""

import random

import pytest
import torch
import torch.nn.functional as F
from model_families import tiny_gemma3

from sftforge.encode.batches import collate, epoch_steps, trained_token_count
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models.loss import TokenLoss, summed_token_loss
from sftforge.training.update import accumulate_gradients

VOCAB = 512


def random_examples(n: int, seed: int = 0) -> list[Example]:
    """Examples of different lengths with a prompt part (untrained) and an answer part."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        answer = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 15))] + [2]
        ids = prompt + answer
        examples.append(Example(ids, [IGNORE_INDEX] * len(prompt) + answer, f"ex{i}"))
    return examples


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_four_micro_batches_of_two_give_the_gradient_of_one_batch_of_eight(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    examples = random_examples(8)
    cpu = torch.device("cpu")

    loss_one, n_one = accumulate_gradients(TokenLoss(model), [collate(examples, 0)], cpu, None)
    one = gradients(model)
    model.zero_grad(set_to_none=True)
    micro = [collate(examples[i : i + 2], 0) for i in range(0, 8, 2)]
    loss_four, n_four = accumulate_gradients(TokenLoss(model), micro, cpu, None)
    four = gradients(model)

    assert n_one == n_four == sum(e.trained_token_count for e in examples)
    assert abs(loss_one - loss_four) < 1e-5
    assert one.keys() == four.keys() and one
    for name in one:
        torch.testing.assert_close(four[name], one[name], atol=1e-5, rtol=1e-5, msg=name)


def test_averaging_each_micro_batch_instead_would_change_the_gradient(tiny_model_factory):
    # Guard that the test above can fail: per-micro-batch means weight short examples more.
    model = tiny_model_factory(VOCAB)
    examples = random_examples(8)
    micro = [collate(examples[i : i + 2], 0) for i in range(0, 8, 2)]
    accumulate_gradients(TokenLoss(model), micro, torch.device("cpu"), None)
    exact = gradients(model)
    model.zero_grad(set_to_none=True)
    for b in micro:
        (
            summed_token_loss(model, b.input_ids, b.labels) / trained_token_count(b.labels) / 4
        ).backward()
    averaged = gradients(model)
    worst = max(float((exact[n] - averaged[n]).abs().max()) for n in exact)
    assert worst > 1e-3 * max(float(g.abs().max()) for g in exact.values())


def test_loss_on_trained_positions_equals_the_full_logits_cross_entropy(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(6, seed=3), 0)
    ours = summed_token_loss(model, batch.input_ids, batch.labels)
    logits = model(input_ids=batch.input_ids).logits
    naive = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=1e-5)


def test_right_padding_without_attention_mask_gives_each_example_its_own_loss(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    examples = random_examples(5, seed=7)
    padded = summed_token_loss(model, *_tensors(collate(examples, 0)))
    alone = sum(summed_token_loss(model, *_tensors(collate([e], 0))) for e in examples)
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-5)


def test_padding_is_never_trained_even_when_pad_equals_the_end_token():
    ex = Example([5, 6, 2], [IGNORE_INDEX, 6, 2], "a")
    batch = collate([ex, Example([5, 6, 7, 8, 2], [IGNORE_INDEX] * 4 + [2], "b")], pad_id=2)
    assert batch.labels[0].tolist() == [IGNORE_INDEX, 6, 2, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.input_ids[0].tolist() == [5, 6, 2, 2, 2]
    assert trained_token_count(batch.labels) == 3


def test_epoch_steps_cover_every_example_once_and_are_deterministic():
    a = epoch_steps(37, 4, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(37))
    assert [len(s) for s in a] == [4] * 9 + [1]
    assert a == epoch_steps(37, 4, seed=1, epoch=0)
    assert a != epoch_steps(37, 4, seed=1, epoch=1)


def _tensors(batch):
    return batch.input_ids, batch.labels


@pytest.mark.parametrize("family", ["llama tied", "llama untied", "gemma3"])
def test_a_head_with_trained_rows_of_added_tokens_gives_peft_forwards_loss_and_gradients(
    tiny_model_factory, family
):
    # Tokens a template added are trained as peft trainable-token rows; the loss puts those
    # rows in the embeddings and the head itself, and must equal peft's own forward.
    from sftforge.models.loading import attach_lora

    new_ids = [VOCAB - 2, VOCAB - 1]
    base = (
        tiny_gemma3(VOCAB)
        if family == "gemma3"
        else tiny_model_factory(VOCAB, tie="untied" not in family)
    )
    model = attach_lora(base, 4, 8, 0.0, "all-linear", new_ids)
    examples = random_examples(6, seed=3)
    examples[0] = Example([5, 6, *new_ids, 7], [IGNORE_INDEX, IGNORE_INDEX, *new_ids, 7], "new")
    batch = collate(examples, pad_id=0)
    with torch.no_grad():  # move the new rows off their start, so a wrong row would show
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))

    ours = summed_token_loss(model, batch.input_ids, batch.labels)
    ours.backward()
    ours_grads = gradients(model)
    model.zero_grad()
    logits = model(input_ids=batch.input_ids).logits
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1), reduction="sum"
    )
    reference.backward()

    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    assert any("trainable_tokens_delta" in name for name in ours_grads)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-5)
