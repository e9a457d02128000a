"""A failure on the command line is one paragraph on stderr (what, where, what to do) and a
nonzero exit code; the traceback only with --debug."""

import signal
from pathlib import Path

import pytest
import torch

from sftforge.cli.main import explain, main
from sftforge.errors import RunInterrupted
from sftforge.training.guards import NonFiniteError


def test_a_missing_data_file_is_one_paragraph_and_exit_code_2(tmp_path, capsys):
    code = main(["train", f"data.train={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path}/o"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"sftforge: error: {tmp_path / 'nope.jsonl'}: no such file or folder")
    assert "Traceback" not in err
    assert err.count("\n") == 1


def test_debug_shows_the_traceback_instead(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["train", "--debug", f"data.train={tmp_path / 'nope.jsonl'}"])


def test_an_unknown_config_key_on_the_command_line_names_it(capsys):
    assert main(["train", "data.train=x.jsonl", "training.learning_rate=1"]) == 2
    assert "unknown config key 'training.learning_rate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "code", "start", "advice"),
    [
        (NonFiniteError("step 3: the loss (nan) ..."), 1, "error: step 3", "step 3"),
        (RunInterrupted("stopped by SIGTERM ...", signal.SIGTERM), 143, "stopped by", "SIGTERM"),
        (torch.OutOfMemoryError("CUDA out of memory"), 1, "error: out of memory", "batch_size"),
        (OSError(28, "No space left on device"), 1, "error: [Errno 28]", "resume=auto"),
        (KeyError("oops"), 1, "internal error: KeyError", "--debug"),
    ],
)
def test_each_kind_of_failure_has_its_exit_code_and_advice(error, code, start, advice):
    message, exit_code = explain(error)

    assert exit_code == code
    assert message.startswith(start)
    assert advice in message


@pytest.mark.parametrize("model", ["smollm2-999m", "nobody/no-such-model", "not/a/hub id"])
def test_a_model_that_does_not_exist_is_named_with_the_embedded_names_and_no_disk_advice(
    tmp_path, capsys, monkeypatch, model
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    data = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"

    code = main(["train", "--model", model, f"data.train={data}", f"output_dir={tmp_path}/o"])

    err = capsys.readouterr().err
    assert code == 2
    assert f"model '{model}' is not an embedded model (smollm2-135m)" in err
    assert "disk" not in err and "Traceback" not in err


def test_a_folder_that_is_not_a_model_says_so(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    code = main(["inspect", "--model", str(tmp_path / "weights"), "x.jsonl"])

    assert code == 2
    assert "holds no config.json" in capsys.readouterr().err
