"""Training objectives beyond plain cross-entropy: DFT (each token's loss weighted by its
probability) and NEFTune (noise on the input embeddings). Both change training only."""

import json

import pytest
import torch
import torch.nn.functional as F
from model_families import tiny_gemma3
from test_loss import VOCAB, gradients, random_examples

from sftforge.config.schema import TrainingConfig
from sftforge.encode.batches import collate, collate_rows
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models import loss
from sftforge.models.loss import TokenLoss, neftune_noise, summed_token_loss


def dft_by_hand(model, batch) -> torch.Tensor:
    """-sum over trained tokens of p.detach() x log p, from the full logits."""
    logits = model(input_ids=batch.input_ids).logits[:, :-1].float()
    targets = batch.labels[:, 1:]
    trained = targets != IGNORE_INDEX
    log_p = logits[trained].log_softmax(-1).gather(1, targets[trained][:, None]).squeeze(1)
    return -(log_p.detach().exp() * log_p).sum()


@pytest.mark.parametrize("head", ["linear, one chunk", "linear, chunks of 3", "soft-capped"])
def test_dft_loss_and_gradients_equal_probability_weighted_cross_entropy(
    tiny_model_factory, monkeypatch, head
):
    if head == "soft-capped":  # a head that is more than a linear map: the model's own forward
        model = tiny_gemma3(VOCAB)
        model.config.final_logit_softcapping = 30.0
    else:
        model = tiny_model_factory(VOCAB)
    if head == "linear, chunks of 3":
        monkeypatch.setattr(loss, "CHUNK_LOGIT_ELEMENTS", 3 * VOCAB)
    batch = collate(random_examples(6, seed=5), 0)

    ours = summed_token_loss(model, batch.input_ids, batch.labels, probability_weighted=True)
    ours.backward()
    ours_grads = gradients(model)
    model.zero_grad()
    reference = dft_by_hand(model, batch)
    reference.backward()

    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    plain = summed_token_loss(model, batch.input_ids, batch.labels)
    assert float(ours) < 0.5 * float(plain)  # a random model: every p is small
    for name, grad in gradients(model).items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_neftune_and_dft_leave_evaluation_plain(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(6, seed=2), 0)
    args = (batch.input_ids, batch.labels, None, batch.example_length_per_token)
    plain = TokenLoss(model)(*args)
    both = TokenLoss(model, neftune_alpha=5.0, probability_weighted=True)

    with torch.no_grad():
        assert float(both.eval()(*args)) == float(plain)
        assert float(both.train()(*args)) != pytest.approx(float(plain), rel=1e-3)


def test_each_token_knows_its_own_examples_length_in_padded_and_packed_rows():
    short = Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "short")
    long = Example([5, 6, 7, 8, 9, 10], [IGNORE_INDEX] * 3 + [8, 9, 10], "long")

    padded = collate([short, long], pad_id=0)
    packed = collate_rows([[long, short], [short]], pad_id=0)

    assert padded.example_length_per_token.tolist() == [[3, 3, 3, 3, 3, 3], [6] * 6]
    # Packed: each example its own length; padding forms a run of its own.
    assert packed.example_length_per_token.tolist() == [[6] * 6 + [3] * 3, [3] * 3 + [6] * 6]


def test_neftune_noise_is_uniform_within_alpha_over_root_of_length_times_hidden():
    torch.manual_seed(0)
    hidden, alpha = 64, 5.0
    lengths = torch.tensor([[4] * 4 + [100] * 100])  # a short and a long example in one row
    noise = neftune_noise(torch.zeros(1, 104, hidden), lengths, alpha)

    for span, length in ((slice(0, 4), 4), (slice(4, 104), 100)):
        bound = alpha / (length * hidden) ** 0.5
        part = noise[0, span]
        assert float(part.abs().max()) <= bound
        assert float(part.abs().max()) > 0.95 * bound  # uniform: it reaches near the bound
        assert abs(float(part.mean())) < 0.1 * bound


def test_neftune_changes_the_gradient_but_the_same_seed_gives_the_same_step(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(6, seed=4), 0)
    args = (batch.input_ids, batch.labels, None, batch.example_length_per_token)

    def step_gradients(module, seed):
        torch.manual_seed(seed)
        model.zero_grad()
        module(*args).backward()
        return gradients(model)

    noisy = TokenLoss(model, neftune_alpha=5.0)
    first, again, other = (step_gradients(noisy, s) for s in (1, 1, 2))
    clean = step_gradients(TokenLoss(model), 1)

    for name in clean:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert any(not torch.allclose(first[n], other[n]) for n in clean)
    assert any(not torch.allclose(first[n], clean[n]) for n in clean)


def test_config_names_the_loss_and_noise_options():
    assert TrainingConfig().loss == "cross_entropy" and TrainingConfig().neftune_alpha is None
    with pytest.raises(ValueError, match="cross_entropy"):
        TrainingConfig(loss="focal")
    with pytest.raises(ValueError, match="greater than 0"):
        TrainingConfig(neftune_alpha=0)


def test_plain_loss_is_unchanged_by_the_new_options_being_off(tiny_model_factory):
    model = tiny_model_factory(VOCAB)
    batch = collate(random_examples(6, seed=3), 0)
    logits = model(input_ids=batch.input_ids).logits
    naive = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1), reduction="sum"
    )
    ours = TokenLoss(model)(batch.input_ids, batch.labels, None, batch.example_length_per_token)
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=1e-5)


def test_a_run_trains_with_dft_and_neftune_on_packed_rows_and_says_so(
    tmp_path, tiny_model_dir, capsys
):
    from test_train import config

    from sftforge.training.loop import train

    def first_loss(name, *options):
        (tmp_path / name).mkdir()
        run = config(tmp_path / name, tiny_model_dir, "training.packing=true", *options)
        out = train(run).output_dir
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    plain = first_loss("plain")
    weighted = first_loss("dft", "training.loss=dft", "training.neftune_alpha=5")

    # Step 1 sees the same weights and examples: DFT's loss is each token's, times p < 1.
    assert 0 < weighted < plain
    assert "DFT: token losses weighted by their probability, NEFTune noise, alpha 5" in (
        capsys.readouterr().out
    )


def test_neftune_noise_reaches_the_embeddings_in_training_only(tmp_path, tiny_model_dir):
    from test_train import config

    from sftforge.training.loop import train

    def one_step(name, *options):
        # A step too small to move fp32 weights: evaluated after it, the model is the one
        # evaluated before it.
        settings = ("method=full", "training.precision=fp32", "training.lr=1e-30")
        evaluation = ("eval.held_out=4", "eval.every=1", "eval.max_new_tokens=8")
        (tmp_path / name).mkdir()
        run = config(
            tmp_path / name, tiny_model_dir, "training.max_steps=1", *settings, *evaluation,
            *options,
        )  # fmt: skip
        result = train(run)
        return result.metrics[0], result.summary

    plain_step, plain = one_step("plain")
    noisy_step, noisy = one_step("noisy", "training.neftune_alpha=5")

    # The step sees the same weights and examples: only the noise can change its loss.
    assert noisy_step["loss"] != pytest.approx(plain_step["loss"], rel=1e-3)
    # Evaluation in the run, through the noisy training module, and before it: no noise.
    assert noisy_step["eval_loss"] == pytest.approx(noisy["eval_loss_before"], rel=1e-6)
    assert noisy["eval_loss_before"] == plain["eval_loss_before"]
    # Generation, before and after the step: no noise.
    assert len(plain["samples"]) == 4
    assert [s["tuned"] for s in noisy["samples"]] == [s["base"] for s in plain["samples"]]
