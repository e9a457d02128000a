"""bench/gpu_check.py on a CPU, with no model: its dry run lists every case, its runner
records each case's outcome (a failure, an exception, a crash, a hang) and goes on, and
--device cuda without CUDA stops with a message. (The cases themselves need a GPU.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402

# Fake cases: run_cases starts each in its own process, which loads this file to find them.


def passes(settings):
    return {"device": settings.device, "folder_exists": Path(settings.workdir).is_dir()}


def raises(settings):
    raise ValueError("something broke in the case")


def fails(settings):
    raise gpu_check.Fail("losses differ by 0.5", {"gap": 0.5})


def skips(settings):
    raise gpu_check.Skip("needs two GPUs")


def crashes(settings):
    os.kill(os.getpid(), signal.SIGKILL)


def hangs(settings):
    time.sleep(60)


def case(function, timeout_s=60):
    return gpu_check.Case(function.__name__, function, "a fake case", "never", timeout_s)


def run(cases, tmp_path):
    settings = gpu_check.Settings(model="none", device="cpu", workdir=str(tmp_path / "work"))
    output = tmp_path / "results.json"
    status = gpu_check.run_cases(cases, settings, output)
    return status, json.loads(output.read_text())


def test_dry_run_lists_every_case_and_imports_nothing_heavy():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gpu_check; "
        "status = gpu_check.main(['--dry-run']); "
        "print('torch imported' if 'torch' in sys.modules else 'light'); sys.exit(status)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    expected = [
        "fp32_matches_cpu",
        "packing_isolation",
        "interrupted_run_resumes",
        "short_runs",
        "throughput",
        "distributed",
        "fsdp_memory",
    ]
    assert [c.name for c in gpu_check.CASES] == expected
    for name in expected:
        assert f"\n{name} (at most" in "\n" + done.stdout
    assert done.stdout.count("  checks: ") == done.stdout.count("  passes: ") == len(expected)
    assert done.stdout.strip().endswith("light")


def test_dry_run_of_chosen_cases_and_unknown_names(capsys):
    assert gpu_check.main(["--dry-run", "--cases", "throughput,distributed"]) == 0
    shown = capsys.readouterr().out
    assert "throughput (at most" in shown and "distributed (at most" in shown
    assert "short_runs" not in shown
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--dry-run", "--cases", "throughput,no_such_case"])
    assert stopped.value.code == 2
    assert "unknown case no_such_case" in capsys.readouterr().err


def test_runner_records_every_outcome_and_goes_on(tmp_path):
    cases = [
        case(raises),
        case(passes),
        case(fails),
        case(crashes),
        case(hangs, timeout_s=2),
        case(skips),
    ]
    status, report = run(cases, tmp_path)

    assert status == 1
    assert report["exit_status"] == 1
    records = {r["name"]: r for r in report["cases"]}
    assert list(records) == [c.name for c in cases]
    assert {name: r["status"] for name, r in records.items()} == {
        "raises": "error",
        "passes": "pass",
        "fails": "fail",
        "crashes": "error",
        "hangs": "error",
        "skips": "skipped",
    }
    assert records["raises"]["reason"] == "ValueError: something broke in the case"
    assert any("raise ValueError" in line for line in records["raises"]["traceback"])
    assert records["passes"]["figures"] == {"device": "cpu", "folder_exists": True}
    assert records["fails"]["reason"] == "losses differ by 0.5"
    assert records["fails"]["figures"] == {"gap": 0.5}
    assert "signal 9" in records["crashes"]["reason"]
    assert records["hangs"]["reason"] == "timed out after 2 s"
    assert 2 <= records["hangs"]["seconds"] < 30
    assert records["skips"]["reason"] == "needs two GPUs"
    assert all(isinstance(r["seconds"], float) for r in records.values())
    assert not any((tmp_path / "work").iterdir())  # each case's folder removed after it


def test_runner_exits_zero_when_every_case_passes_or_is_skipped(tmp_path):
    status, report = run([case(passes), case(skips)], tmp_path)
    assert status == 0
    assert [r["status"] for r in report["cases"]] == ["pass", "skipped"]


def test_device_cuda_without_cuda_exits_with_a_message(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    output = tmp_path / "results.json"
    status = gpu_check.main(["--device", "cuda", "--output", str(output)])
    assert status != 0
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not output.exists()


def test_a_spent_budget_stops_the_cases_left_as_not_run(tmp_path):
    settings = gpu_check.Settings(model="none", device="cpu", workdir=str(tmp_path / "work"))
    output = tmp_path / "results.json"
    status = gpu_check.run_cases([case(hangs), case(passes)], settings, output, budget_s=2)
    report = json.loads(output.read_text())

    assert status == 1
    hung, left = report["cases"]
    assert hung["status"] == "error" and hung["reason"].startswith("timed out after")
    assert left == {
        "name": "passes",
        "status": "error",
        "seconds": 0.0,
        "reason": "not run: the budget of 2 s was spent",
    }
