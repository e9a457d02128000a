"""`training.lr: auto`: the peak rate chosen by short trials on the training data. The search
brackets the lowest validation loss on a factor-2 grid; the trials leave the run as they found
it (a run with lr auto equals, bitwise, a run given the rate it chose), and a resumed run
takes the rate from its checkpoint instead of probing again."""

import json
import math

import pytest
import torch
from test_learning_rules import assert_same_weights, resumed_from_step_2, run, weights

from sftforge.config.loading import ConfigError, load_config
from sftforge.errors import InputError
from sftforge.training.lr_probe import GRID_FACTOR, Trial, bracketed_minimum, probe_slices


def valley_at(best_rate: float):
    """A loss of the rate whose minimum lies at `best_rate` (in log-rate), and its calls."""
    calls = []

    def loss_at(rate: float) -> float:
        calls.append(rate)
        return (math.log2(rate) - math.log2(best_rate)) ** 2

    return loss_at, calls


def test_a_minimum_inside_the_first_three_rates_takes_three_trials():
    loss_at, calls = valley_at(2e-4)
    chosen, bracketed = bracketed_minimum(loss_at, centre=2e-4)
    assert chosen == pytest.approx(2e-4) and bracketed
    assert sorted(calls) == pytest.approx([1e-4, 2e-4, 4e-4])


def test_the_search_walks_outwards_until_the_minimum_is_bracketed():
    loss_at, calls = valley_at(2e-4 * GRID_FACTOR**2)  # two grid steps above the centre
    chosen, bracketed = bracketed_minimum(loss_at, centre=2e-4)
    assert chosen == pytest.approx(8e-4) and bracketed
    assert sorted(calls) == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3])

    loss_at, calls = valley_at(2e-4 / GRID_FACTOR**2)  # and below it
    chosen, bracketed = bracketed_minimum(loss_at, centre=2e-4)
    assert chosen == pytest.approx(5e-5) and bracketed
    assert min(calls) == pytest.approx(2.5e-5)


def test_a_minimum_beyond_the_trials_allowed_is_reported_as_the_edge():
    loss_at, calls = valley_at(1.0)
    chosen, bracketed = bracketed_minimum(loss_at, centre=2e-4, max_trials=5)
    assert len(calls) == 5
    assert chosen == pytest.approx(max(calls)) and not bracketed


def test_diverged_trials_lose_and_ties_go_to_the_lower_rate():
    calls = []

    def loss_at(rate: float) -> float:
        calls.append(rate)
        return math.inf if rate > 3e-4 else 1.0

    chosen, bracketed = bracketed_minimum(loss_at, centre=2e-4, max_trials=4)
    assert calls == [1e-4, 2e-4, 4e-4, 5e-5]  # the search walked down the flat side
    assert chosen == 5e-5 and not bracketed  # and took its lowest rate


def test_a_trial_that_forgets_beyond_the_limit_is_ruled_out_as_if_it_diverged():
    """A short trial's loss keeps falling as the rate grows; the general-text perplexity
    stops the search where it passes 1.05, and the rate below is chosen, bracketed."""
    trials = {
        1e-4: Trial(0.50, 1.001), 2e-4: Trial(0.40, 1.004), 4e-4: Trial(0.30, 1.020),
        8e-4: Trial(0.20, 1.080), 1.6e-3: Trial(0.10, 1.300),
    }  # fmt: skip
    chosen, bracketed = bracketed_minimum(lambda rate: trials[rate].score, centre=2e-4)
    assert chosen == 4e-4 and bracketed
    assert Trial(0.2, None).score == 0.2  # forgetting not measured: the loss alone


def test_a_trials_forgetting_is_projected_to_the_runs_length():
    """A trial of 8 steps for a run of 60 may spend 8/60 of the budget of 1.05."""
    assert Trial(0.1, 1.005, run_per_trial=7.5).projected_forgetting == pytest.approx(1.0375)
    assert Trial(0.1, 1.005, run_per_trial=7.5).score == 0.1
    assert Trial(0.1, 1.010, run_per_trial=7.5).score == math.inf  # 1.075 over the run
    assert Trial(0.1, 0.990, run_per_trial=7.5).projected_forgetting == 1.0  # better: no debt
    assert Trial(math.nan, 1.0).score == math.inf


def test_the_validation_slice_is_never_trained_on_and_the_steps_cycle_the_rest():
    trial_steps, validation = probe_slices(30, examples_per_step=4, steps=10, seed=3)
    assert len(validation) == 3 and len(trial_steps) == 10
    assert all(len(step) == 4 for step in trial_steps)
    trained = {i for step in trial_steps for i in step}
    assert trained.isdisjoint(validation) and trained | set(validation) == set(range(30))
    assert probe_slices(30, 4, 10, seed=3) == (trial_steps, validation)  # seeded
    with pytest.raises(InputError, match="training.lr auto needs at least 2"):
        probe_slices(1, 4, 10, seed=3)


def test_lr_takes_auto_or_a_positive_number_and_names_the_key_otherwise():
    base = ["data.train=x.jsonl"]
    assert load_config(None, [*base, "training.lr=auto"]).learning_rate is None
    assert load_config(None, [*base, "training.lr=auto"]).default_learning_rate == 2e-4
    assert load_config(None, [*base, "method=full"]).learning_rate == 2e-5
    for wrong in ("fast", "-1e-4"):  # one line for the key, not one per type it may take
        with pytest.raises(ConfigError) as raised:
            load_config(None, [*base, f"training.lr={wrong}"])
        assert str(raised.value).count("config key") == 1
        assert "config key 'training.lr': Input should be " in str(raised.value)
        assert f"(got '{wrong}'); or 'auto'" in str(raised.value)


PROBE = ["training.lr=auto", "training.lr_probe_steps=2", "lora.b_lr_ratio=4"]


def test_a_run_with_lr_auto_trains_as_a_run_given_the_rate_it_chose_and_resumes_without_probing(
    tmp_path, tiny_model_dir, demo_records_16, caplog
):
    auto = tmp_path / "auto"
    result = run(tiny_model_dir, demo_records_16, auto, "lora.dropout=0.1", *PROBE)
    probe = result.summary["lr_probe"]
    tried = {row["lr"]: row["validation_loss"] for row in probe["trials"]}
    assert len(tried) >= 3 and probe["chosen"] in tried
    assert tried[probe["chosen"]] == min(tried.values())
    assert probe["steps"] == 2 and probe["validated_on"] == 1  # 10 % of the 10 that fit
    assert "training.lr auto: " in caplog.text
    assert json.loads((auto / "summary.json").read_text())["lr_probe"] == probe

    # The same run with the chosen rate given: the same losses and weights, to the bit. (The
    # probe trained, drew dropout masks and rounded; none of it reaches the run.)
    given = tmp_path / "given"
    fixed = [f"training.lr={probe['chosen']!r}", "lora.b_lr_ratio=4", "lora.dropout=0.1"]
    same = run(tiny_model_dir, demo_records_16, given, *fixed)
    assert [m["loss"] for m in same.metrics] == [m["loss"] for m in result.metrics]
    assert [m["lr"] for m in same.metrics] == [m["lr"] for m in result.metrics]
    assert_same_weights(weights(auto), weights(given))

    # Resumed from its step-2 checkpoint: the rate comes from the checkpoint, no new probe.
    caplog.clear()
    resumed = resumed_from_step_2(
        auto, tmp_path, tiny_model_dir, demo_records_16, "lora.dropout=0.1", *PROBE
    )
    assert "training.lr auto: " not in caplog.text
    assert "lr auto, from the checkpoint" in caplog.text
    assert_same_weights(weights(auto), weights(resumed))
    assert json.loads((resumed / "summary.json").read_text())["lr_probe"] == probe


def test_full_fine_tuning_in_bf16_probes_around_its_own_default_and_restores_the_masters(
    tmp_path, tiny_model_dir, demo_records_16
):
    """Stochastic rounding rewrites the matrices in place during each trial step; after the
    probe every master weight is back to its starting value, bit for bit."""
    common = ["method=full", "training.precision=bf16"]
    auto = run(tiny_model_dir, demo_records_16, tmp_path / "a", *common, *PROBE[:2], steps=1)
    probe = auto.summary["lr_probe"]
    assert {1e-5, 2e-5, 4e-5} <= {row["lr"] for row in probe["trials"]}
    chosen = f"training.lr={probe['chosen']!r}"
    given = run(tiny_model_dir, demo_records_16, tmp_path / "g", *common, chosen, steps=1)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "g"))
    assert auto.metrics[0]["loss"] == given.metrics[0]["loss"]
    assert torch.isfinite(torch.tensor(auto.metrics[0]["loss"]))
