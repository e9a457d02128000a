"""A clean run prints no library warning that our calls bring on (issue 29, point 13): each
deprecated call is replaced by the current one, and where the deprecated call is a library's
own, made as we use it as documented, that one warning is silenced at our call site. Warnings
raised in sftforge's own modules fail every test (pyproject's filterwarnings)."""

import warnings

import torch
import torch.distributed.checkpoint as dcp

from sftforge.models.loading import attach_lora
from sftforge.training.sharded import SHARDED, load_trained_weights


def warnings_of(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught]


def test_wrapping_a_model_in_lora_warns_of_nothing(tiny_model_factory):
    import peft  # noqa: F401  (what importing it warns of, bitsandbytes' own, is not the wrap's)

    model = tiny_model_factory(vocab_size=256)
    model.activation_checkpointing_enable({"use_reentrant": False})  # as a run does
    assert warnings_of(lambda: attach_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"], [])) == []


def test_reading_a_sharded_checkpoint_in_one_process_warns_of_nothing(tmp_path):
    written, read = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with warnings.catch_warnings():  # writing shards alone is this test's doing, not a run's
        warnings.simplefilter("ignore")
        dcp.save({"model": written.state_dict()}, checkpoint_id=tmp_path / SHARDED, no_dist=True)

    assert warnings_of(lambda: load_trained_weights(tmp_path, read)) == []
    torch.testing.assert_close(read.state_dict(), written.state_dict())
