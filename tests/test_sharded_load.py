"""Under FSDP no rank holds the whole model: it is built on the meta device, each rank reads
its rows of each weight from safetensors, and a sharded finish writes the weights gathered
one at a time. Checked under torchrun (2 CPU processes, gloo, one thread each) by
tests/sharded_load.py against one process loading the same run's model whole."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_families import save_model_with_tokenizer, tiny_gemma3, tiny_llama
from safetensors.torch import load_file

from sftforge.config.loading import load_config
from sftforge.training.prepare import prepare_model, prepare_text

SCRIPT = Path(__file__).parent / "sharded_load.py"
PROBE = torch.arange(1, 17).reshape(2, 8)  # as in sharded_load.py


def load_on_two_ranks(out: Path, overrides: list[str], whole: bool = False) -> Path:
    out.mkdir(parents=True)
    flags = ["--whole"] if whole else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(SCRIPT), str(out), *flags, *overrides]  # fmt: skip
    quiet = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    # glibc's mmap threshold fixed (it otherwise grows as large blocks are freed, and keeps
    # later ones in its heap): resident memory then follows what the tensors hold.
    quiet["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run(
        command, env=os.environ | quiet, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out


def loaded_whole(overrides: list[str]) -> tuple[dict, torch.Tensor]:
    """The run's model as one process builds it: (its weights, the probe's logits)."""
    config = load_config(None, overrides + ["training.device=cpu"])
    text = prepare_text(config)
    torch.manual_seed(config.training.seed)
    model, _ = prepare_model(config, torch.device("cpu"), text)
    threads = torch.get_num_threads()
    # One thread, as each rank computes (OMP_NUM_THREADS=1): on some CPUs (an AMX Xeon) the
    # fp32 matmuls add in another order with two threads, 1e-6 apart.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = model(input_ids=PROBE).logits
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), logits


def assert_the_same_model(out: Path, overrides: list[str]) -> None:
    """What the ranks hold, gathered, is bit for bit what one process loads, and computes
    the same logits (buffers included: rotary frequencies, embedding scales)."""
    gathered = load_file(out / "gathered.safetensors")
    weights, logits = loaded_whole(overrides)
    torch.testing.assert_close(gathered.pop("probe_logits"), logits, rtol=0, atol=1e-6)
    assert gathered.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(gathered[name], tensor), name


def model_bytes(folder: str) -> int:
    return sum(
        t.numel() * t.element_size() for t in load_file(f"{folder}/model.safetensors").values()
    )


def peaks(out: Path) -> list[int]:
    return [json.loads((out / f"peak-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, small_chatml_tokenizer) -> str:
    """A 2-layer Llama of hidden 768 with a 1,024-token vocabulary: 11.4M parameters (45 MB
    in fp32) in tensors of at most 4.7 MB, so that loading it whole stands out from a
    process's other memory, and no one weight dominates it."""
    model = tiny_llama(len(small_chatml_tokenizer), hidden_size=768)
    folder = tmp_path_factory.mktemp("wide")
    return save_model_with_tokenizer(model, small_chatml_tokenizer, folder)


def settings(model_dir: str, method: str, *more: str) -> list[str]:
    return [f"model={model_dir}", "data.train=unused.jsonl", f"method={method}", *more]


@pytest.fixture(scope="module")
def sharded_full(tmp_path_factory, wide_model_dir) -> Path:
    out = tmp_path_factory.mktemp("sharded-full") / "out"
    return load_on_two_ranks(out, settings(wide_model_dir, "full"))


@pytest.mark.slow
def test_each_rank_reads_its_shards_of_the_weights_a_whole_load_gives(sharded_full, wide_model_dir):
    assert_the_same_model(sharded_full, settings(wide_model_dir, "full"))


@pytest.mark.slow
def test_a_sharded_finish_writes_the_weights_it_was_given_bit_for_bit(sharded_full, wide_model_dir):
    """Loaded sharded and written by a sharded finish, untrained: the base model's file."""
    written = load_file(sharded_full / "written/model.safetensors")
    base = load_file(f"{wide_model_dir}/model.safetensors")
    assert written.keys() == base.keys()
    for name, tensor in base.items():
        assert torch.equal(written[name], tensor), name


@pytest.mark.slow
def test_no_rank_grows_by_the_whole_model_while_loading_it(sharded_full, wide_model_dir, tmp_path):
    """Resident memory gained while loading (the peak): under the whole model on each rank
    loading its shards (half of it, and a slice at a time); at least the whole model on a
    rank that loads it all first."""
    whole_model = model_bytes(wide_model_dir)
    assert max(peaks(sharded_full)) < whole_model, peaks(sharded_full)
    loaded_whole_first = load_on_two_ranks(
        tmp_path / "whole", settings(wide_model_dir, "full"), whole=True
    )
    assert min(peaks(loaded_whole_first)) >= whole_model, peaks(loaded_whole_first)


@pytest.mark.slow
def test_lora_adapters_start_as_in_one_process_and_a_sharded_finish_writes_them(
    wide_model_dir, tmp_path
):
    overrides = settings(wide_model_dir, "lora")
    out = load_on_two_ranks(tmp_path / "lora", overrides)
    assert_the_same_model(out, overrides)
    written = load_file(out / "written/adapter_model.safetensors")
    gathered = load_file(out / "gathered.safetensors")
    assert written and all(torch.equal(t, gathered[n.replace(".weight", ".default.weight")])
                           for n, t in written.items())  # fmt: skip


@pytest.mark.slow
def test_rows_of_tokens_the_template_adds_start_at_the_mean_as_in_one_process(
    untied_sentencepiece_model_dir, tmp_path
):
    """ChatML's turn tokens are new to this SentencePiece vocabulary; its head is untied."""
    overrides = settings(untied_sentencepiece_model_dir, "full", "template=chatml")
    out = load_on_two_ranks(tmp_path / "new-tokens", overrides)
    assert_the_same_model(out, overrides)


@pytest.mark.slow
def test_a_gemma3_model_gets_its_embedding_scale_and_rotary_buffers(
    shared_smollm2_tokenizer, tmp_path
):
    folder = save_model_with_tokenizer(tiny_gemma3(49152), shared_smollm2_tokenizer, tmp_path / "g")
    overrides = settings(folder, "full", "template=chatml")
    out = load_on_two_ranks(tmp_path / "gemma3", overrides)
    assert_the_same_model(out, overrides)
