"""Device and precision choices that matter on CUDA, checked on the CPU with torch.cuda's
answers stood in for (issue 26): the torch floor, bf16 only where the chosen GPU runs it
natively, each process's GPU under launchers, and RNG forks on the model's device only."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from model_families import tiny_llama

from sftforge.models import devices as model_module
from sftforge.models.devices import autocast_dtype, warn_emulated_bf16
from sftforge.models.loading import check_torch_version, compile_decoder_layers, load_model
from sftforge.training.distributed import ALONE, DistributedError, World, device_of_rank

# ---- the torch floor ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.5.0"])
def test_a_torch_older_than_2_6_is_refused_naming_its_version(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(ValueError, match=r"torch >= 2\.6.*set_stance") as refused:
        check_torch_version()
    assert version in str(refused.value)
    assert "pytorch.org" in str(refused.value)


@pytest.mark.parametrize("version", ["2.6.0+cu124", "2.6.0a0+ecf3bae40a.nv25.01", "2.13.0+cpu"])
def test_torch_2_6_and_later_builds_pass(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    check_torch_version()


def test_loading_a_model_checks_torch_first(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.4.0")
    with pytest.raises(ValueError, match=r"torch >= 2\.6"):
        load_model(str(tmp_path / "no-such-model"))


# ---- precision: auto takes bf16 only where the chosen GPU runs it natively ---------------------


@pytest.fixture
def capability(monkeypatch):
    """Set `capability.value`; `capability.asked` records the devices asked about."""
    state = SimpleNamespace(value=(8, 0), asked=[])

    def get_device_capability(device=None):
        state.asked.append(device)
        return state.value

    monkeypatch.setattr(torch.cuda, "get_device_capability", get_device_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    warn_emulated_bf16.cache_clear()
    return state


@pytest.mark.parametrize(
    ("value", "expected"), [((7, 0), None), ((7, 5), None), ((8, 0), torch.bfloat16)]
)
def test_auto_takes_bf16_from_compute_capability_8_0_on(capability, value, expected):
    capability.value = value
    assert autocast_dtype("auto", torch.device("cuda", 1)) == expected
    assert capability.asked == [1]  # the chosen GPU's, not the current one's


def test_auto_on_cuda_without_index_asks_about_the_current_gpu(capability):
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert capability.asked == [None]  # torch.cuda's "the current device"


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_explicit_bf16_below_8_0_is_kept_and_warned_about_once(capability, capsys, precision):
    capability.value = (7, 5)
    device = torch.device("cuda", 0)
    assert autocast_dtype(precision, device) == torch.bfloat16
    assert autocast_dtype(precision, device) == torch.bfloat16
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "7.5" in err and "emulated" in err


def test_explicit_bf16_from_8_0_on_and_fp32_say_nothing(capability, capsys):
    assert autocast_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    capability.value = (7, 0)
    assert autocast_dtype("fp32", torch.device("cuda", 0)) is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fast", [True, False])
def test_the_cpu_choice_is_unchanged(monkeypatch, fast):
    monkeypatch.setattr(model_module, "cpu_has_fast_bf16", lambda: fast)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if fast else None)
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp32", cpu) is None


# ---- each process's GPU ------------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Set `gpus.count` (and `gpus.current`); `gpus.set` records torch.cuda.set_device."""
    state = SimpleNamespace(count=2, current=0, set=[])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: state.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state.current)
    monkeypatch.setattr(torch.cuda, "set_device", state.set.append)
    return state


def test_a_launcher_giving_each_process_one_gpu_runs_every_rank_on_cuda_0(gpus):
    gpus.count = 1  # Slurm --gpus-per-task=1, or CUDA_VISIBLE_DEVICES per rank
    for local_rank in range(4):
        assert device_of_rank(torch.device("cuda"), World(local_rank, 4, local_rank)) == (
            torch.device("cuda", 0)
        )
    assert gpus.set == [0, 0, 0, 0]


def test_each_local_rank_takes_its_own_gpu(gpus):
    assert device_of_rank(torch.device("cuda"), World(3, 4, 1)) == torch.device("cuda", 1)
    assert gpus.set == [1]


def test_a_local_rank_beyond_the_gpus_is_refused_naming_both_numbers(gpus):
    with pytest.raises(DistributedError, match="LOCAL_RANK 3 but this machine shows 2 GPUs"):
        device_of_rank(torch.device("cuda"), World(3, 4, 3))
    assert gpus.set == []


def test_an_explicit_gpu_other_than_the_ranks_is_refused(gpus):
    with pytest.raises(DistributedError, match="LOCAL_RANK"):
        device_of_rank(torch.device("cuda", 0), World(1, 2, 1))


def test_a_single_process_on_cuda_1_makes_it_the_current_device(gpus):
    assert device_of_rank(torch.device("cuda", 1), ALONE) == torch.device("cuda", 1)
    assert gpus.set == [1]


def test_a_single_process_on_cuda_gets_the_current_device_with_its_index(gpus):
    gpus.current = 1
    assert device_of_rank(torch.device("cuda"), ALONE) == torch.device("cuda", 1)
    assert gpus.set == [1]


def test_a_gpu_the_machine_does_not_have_is_refused(gpus):
    with pytest.raises(DistributedError, match="cuda:2, but this machine shows 2 GPUs"):
        device_of_rank(torch.device("cuda", 2), ALONE)
    gpus.count = 0
    with pytest.raises(DistributedError, match="torch sees no GPU"):
        device_of_rank(torch.device("cuda"), ALONE)
    assert gpus.set == []


def test_cpu_ranks_share_the_cpu_and_touch_no_gpu(gpus):
    cpu = torch.device("cpu")
    assert device_of_rank(cpu, ALONE) == cpu
    assert device_of_rank(cpu, World(1, 2, 1)) == cpu
    assert gpus.set == []


# ---- random generators forked on the model's device only ---------------------------------------


@pytest.fixture
def forks(monkeypatch):
    calls = []

    @contextmanager
    def fork_rng(devices=None, **options):
        calls.append(devices)
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    return calls


def test_compiling_a_cpu_model_forks_no_gpu_generator(forks):
    model = tiny_llama(64)
    assert compile_decoder_layers(model, lambda: None) is None
    assert forks == [[]]  # None would fork every visible GPU's


def test_compiling_a_model_on_cuda_1_forks_that_gpu_generator_only(forks):
    model = tiny_llama(64)
    model.parameters = lambda: iter([SimpleNamespace(device=torch.device("cuda", 1))])
    assert compile_decoder_layers(model, lambda: None) is None
    assert forks == [[1]]


def test_a_checkpoint_keeps_the_runs_own_gpu_generator_and_touches_no_other(monkeypatch):
    from sftforge.training import checkpoint

    def every_gpu():
        raise AssertionError("a checkpoint read every visible GPU's generator")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert set(checkpoint.torch_rng_states()) == {"cpu"}  # CUDA not in use: not started
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    states = checkpoint.torch_rng_states()
    assert set(states) == {"cpu", "cuda"} and states["cuda"].tolist() == [7]
