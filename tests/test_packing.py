"""Packing, token-budget micro-batches, chunked head loss and FLOP counting.

The rule they share: how a step's examples are laid out in tensors changes speed and
memory, never the loss or the gradient."""

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sftforge.encode.batches import (
    collate,
    collate_rows,
    pack_best_fit_decreasing,
    plan_micro_batches,
    step_batches,
    trained_token_count,
)
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models import loss as loss_module
from sftforge.models.flops import flop_model
from sftforge.models.loading import PackingError
from sftforge.models.loss import (
    TokenLoss,
    chunked_head_loss,
    summed_token_loss,
)
from sftforge.models.packing_check import verify_packing_isolation
from sftforge.training.update import accumulate_gradients

VOCAB = 512
CPU = torch.device("cpu")


def random_examples(n: int, seed: int = 0, longest: int = 40) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, longest // 2))]
        answer = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, longest // 2 - 1))] + [2]
        examples.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, f"ex{i}"))
    return examples


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_gradients(model, batches):
    model.zero_grad(set_to_none=True)
    loss, count = accumulate_gradients(TokenLoss(model), batches, CPU, None)
    return loss, count, gradients(model)


# --- best-fit-decreasing packing -----------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 200))
def test_packing_places_every_example_once_and_never_overfills_a_row(lengths, capacity):
    bins = pack_best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two rows that could have been one.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_packing_fills_rows_better_than_one_example_per_row():
    lengths = [70, 60, 50, 40, 30, 20, 10, 8]
    bins = pack_best_fit_decreasing(lengths, 100)
    assert [sorted(lengths[i] for i in b) for b in bins] == [[30, 70], [40, 60], [8, 10, 20, 50]]
    assert pack_best_fit_decreasing([10, 20], 128) == [[1, 0]]


def test_an_example_longer_than_the_row_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        pack_best_fit_decreasing([10, 300], 256)


def test_packed_rows_restart_positions_and_unlabel_each_examples_first_token():
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "a")
    b = Example([8, 9], [8, 9], "b")  # raw text: its first token carries a label
    batch = collate_rows([[a, b], [b]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # b's first token would be predicted from a's last token: not trained.
    assert batch.labels.tolist()[0] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]
    assert batch.real_tokens == 7 and batch.attended_pairs == 6 + 3 + 3
    assert collate([a, b], 0).position_ids is None  # unpacked rows need no positions


def test_a_packed_batch_gives_the_loss_and_gradients_of_the_same_examples_unpacked(
    tiny_model_factory,
):
    model = tiny_model_factory(VOCAB)
    examples = random_examples(12, seed=4)
    rows = [
        [examples[i] for i in b]
        for b in pack_best_fit_decreasing([len(e.input_ids) for e in examples], 64)
    ]
    assert any(len(r) > 1 for r in rows)

    loss_u, n_u, grads_u = loss_and_gradients(model, [collate(examples, 0)])
    loss_p, n_p, grads_p = loss_and_gradients(model, [collate_rows(rows, 0)])

    assert n_u == n_p == sum(e.trained_token_count for e in examples)
    assert abs(loss_u - loss_p) < 1e-5
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-5, rtol=1e-5, msg=name)


def test_packing_without_restarting_positions_would_change_the_loss(tiny_model_factory):
    # Guard that the test above can fail: the same packed row read as one sequence leaks.
    model = tiny_model_factory(VOCAB)
    examples = random_examples(6, seed=5)
    packed = collate_rows([examples], 0)
    isolated = summed_token_loss(model, packed.input_ids, packed.labels, packed.position_ids)
    leaking = summed_token_loss(model, packed.input_ids, packed.labels)
    assert abs(isolated.item() - leaking.item()) > 1e-3


def test_the_isolation_check_passes_for_sdpa_and_refuses_a_leaking_model(tiny_model_factory):
    verify_packing_isolation(tiny_model_factory(VOCAB), CPU)

    class Leaky(torch.nn.Module):
        """A 'decoder' that mixes every earlier token in, whatever the positions say."""

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 8)
            self.config = type("C", (), {"_attn_implementation": "leaky"})()

        def get_decoder(self):
            return self

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return (self.embed(input_ids).cumsum(1),)

    with pytest.raises(PackingError, match="attend to each other"):
        verify_packing_isolation(Leaky(), CPU)


# --- token-budget micro-batches --------------------------------------------------------------


def test_a_token_budget_caps_rows_times_longest_row():
    lengths = [30, 10, 25, 12, 8, 40, 22]
    plan = plan_micro_batches(lengths, list(range(7)), batch_size=2, token_budget=64)
    assert sorted(i for mb in plan for row in mb for i in row) == list(range(7))
    for mb in plan:
        longest = max(sum(lengths[i] for i in row) for row in mb)
        assert len(mb) == 1 or len(mb) * longest <= 64
    # Short examples share a micro-batch, long ones go alone: [40], [30, 25]... by length.
    assert [len(mb) for mb in plan] == [1, 2, 2, 2]


def test_an_example_over_the_budget_still_gets_a_micro_batch_of_its_own():
    assert plan_micro_batches([100, 5], [0, 1], batch_size=8, token_budget=64) == [[[0]], [[1]]]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    budget=st.sampled_from([None, 48, 96, 200]),
    pack=st.sampled_from([None, 64, 100]),
    batch_size=st.integers(1, 5),
)
def test_any_cut_of_a_step_gives_the_same_loss_and_gradients(
    tiny_model_factory, seed, budget, pack, batch_size
):
    model = tiny_model_factory(VOCAB)
    examples = random_examples(9, seed=seed)
    lengths = [len(e.input_ids) for e in examples]
    step = list(range(9))
    reference = loss_and_gradients(model, [collate(examples, 0)])
    cut = step_batches(examples, lengths, step, 0, batch_size, budget, pack)
    loss, count, grads = loss_and_gradients(model, cut)
    assert count == reference[1]
    assert abs(loss - reference[0]) < 1e-5
    for name, g in reference[2].items():
        torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_factory, method):
    from sftforge.models.loading import attach_lora, enable_gradient_checkpointing

    model = tiny_model_factory(VOCAB)
    if method == "lora":
        model = attach_lora(model, 4, 8, 0.0, "all-linear", [])
        for name, p in model.named_parameters():  # LoRA's B starts at zero: give it a value
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    model.train()
    examples = random_examples(8, seed=11)
    rows = [
        [examples[i] for i in b]
        for b in pack_best_fit_decreasing([len(e.input_ids) for e in examples], 64)
    ]
    batches = [collate_rows(rows, 0)]
    plain = loss_and_gradients(model, batches)
    enable_gradient_checkpointing(model)
    recomputed = loss_and_gradients(model, batches)

    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6)
    assert plain[2].keys() == recomputed[2].keys() and len(plain[2]) > 4
    for name, g in plain[2].items():
        torch.testing.assert_close(recomputed[2][name], g, atol=1e-6, rtol=1e-5, msg=name)


# --- the head in chunks ----------------------------------------------------------------------


@pytest.mark.parametrize("head_kind", ["linear", "wrapped"])
def test_chunked_head_loss_equals_the_naive_loss_and_gradients(head_kind):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 100, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 100, (37,))
    if head_kind == "wrapped":
        head = torch.nn.Sequential(head)
        head.weight = head[0].weight

    naive = F.cross_entropy(head(hidden), targets, reduction="sum")
    naive_grads = torch.autograd.grad(naive, [hidden, head.weight])
    chunked = chunked_head_loss(head, hidden, targets, chunk_rows=5)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    with torch.no_grad():  # evaluation takes the loss alone
        torch.testing.assert_close(chunked_head_loss(head, hidden, targets, 5), naive.detach())

    torch.testing.assert_close(chunked, naive, atol=1e-5, rtol=1e-6)
    for ours, ref in zip(chunked_grads, naive_grads, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def logit_rows_saved_for_backward(loss_fn) -> int:
    """The most rows of any [rows x vocab] tensor autograd keeps for the backward pass."""
    rows = [0]

    def keep(t):
        if t.dim() >= 2 and t.shape[-1] == VOCAB:
            rows.append(t.numel() // VOCAB)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return max(rows)


def test_no_logits_are_kept_for_backward(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(16, seed=2), 0)
    trained = trained_token_count(batch.labels)
    assert trained > 40
    ours = logit_rows_saved_for_backward(
        lambda: summed_token_loss(model, batch.input_ids, batch.labels)
    )
    assert ours == 0  # each chunk's gradient is made in the forward; no logits are kept

    # Guard: the plain computation keeps the whole [positions x vocab] softmax.
    def plain():
        logits = model(input_ids=batch.input_ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1))

    assert logit_rows_saved_for_backward(plain) >= trained


def test_a_wrapped_head_is_checkpointed_per_chunk_and_keeps_no_logits():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(16, VOCAB, bias=False))  # not a plain Linear
    hidden = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, VOCAB, (40,))
    rows = logit_rows_saved_for_backward(lambda: chunked_head_loss(head, hidden, targets, 8))
    assert rows == 0
    naive = F.cross_entropy(head(hidden), targets, reduction="sum")
    torch.testing.assert_close(chunked_head_loss(head, hidden, targets, 8), naive)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_loss_through_the_model_equals_the_full_logits_loss(
    tiny_model_factory, monkeypatch, amp
):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(10, seed=8), 0)
    monkeypatch.setattr(loss_module, "CHUNK_LOGIT_ELEMENTS", 7 * VOCAB)
    tolerance = 1e-5 if amp is None else 2e-2  # bf16 matmuls: a few significant digits

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = loss_fn()
        loss.backward()
        return loss.detach(), gradients(model)

    def naive():
        logits = model(input_ids=batch.input_ids).logits.float()
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1), reduction="sum"
        )

    ours, ours_grads = run(lambda: summed_token_loss(model, batch.input_ids, batch.labels))
    reference, reference_grads = run(naive)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=tolerance)
    for name, g in reference_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(
            ours_grads[name], g, atol=tolerance * scale, rtol=tolerance, msg=name
        )


# --- FLOPs -----------------------------------------------------------------------------------


def test_flop_model_counts_decoder_matmuls_attention_and_the_head(tiny_model_factory):
    model = tiny_model_factory(VOCAB)  # hidden 32, mlp 64, 2 layers, 4 heads of 8, 2 kv heads
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)
    full = flop_model(model, "full")
    assert full.matmul_params == 2 * per_layer
    assert full.attention_width == 2 * 4 * 8
    assert full.head_params == 32 * VOCAB
    # One example of 3 tokens, 2 trained: context 1 + 2 + 3 = 6.
    forward = 2 * full.matmul_params * 3 + 4 * full.attention_width * 6 + 2 * 32 * VOCAB * 2
    assert full.step_flops(3, 6, 2) == 3 * forward
    assert flop_model(model, "lora").step_flops(3, 6, 2) == 2 * forward


def test_flop_model_ignores_lora_adapter_matrices(tiny_model_factory):
    from sftforge.models.loading import attach_lora

    model = tiny_model_factory(VOCAB)
    plain = flop_model(model, "lora").matmul_params
    adapted = attach_lora(model, 4, 8, 0.0, "all-linear", [])
    assert flop_model(adapted, "lora").matmul_params == plain


def test_a_batch_counts_its_trained_tokens_as_the_loss_does():
    examples = random_examples(7, seed=9)
    for batch in (collate(examples, 0), collate_rows([examples[:4], examples[4:]], 0)):
        assert batch.trained_tokens == trained_token_count(batch.labels)
