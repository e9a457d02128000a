"""A failure on the command line is one paragraph on stderr (what, where, what to do) and a
nonzero exit code; the traceback only with --debug."""

import signal

import pytest
import torch

from sftforge.cli import explain, main
from sftforge.guards import NonFiniteError, RunInterrupted


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
