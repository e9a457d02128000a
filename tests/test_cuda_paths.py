"""What the CUDA paths rely on, checked on the CPU: packed rows as flash-attention must
receive them, the packing check in low precision, evaluation under the run's autocast, no
host sync per micro-batch, FLOPs and MFU over several devices, deterministic mode, and data
encoded before the device is touched (issue 26)."""

import random
import traceback

import pytest
import torch
import torch.nn.functional as F
from model_families import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AttentionInterface

from sftforge.encode.batches import collate, collate_rows, made_ahead, pack_best_fit_decreasing
from sftforge.encode.encoder import IGNORE_INDEX, Example
from sftforge.models.devices import autocast, check_attention_precision, deterministic_algorithms
from sftforge.models.flops import flop_model
from sftforge.models.loading import PackingError
from sftforge.models.loss import TokenLoss, batch_loss
from sftforge.models.packing_check import verify_packing_isolation
from sftforge.training.metrics import Progress, step_record
from sftforge.training.update import accumulate_gradients

CPU = torch.device("cpu")
VOCAB = 64


def random_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 12))]
        answer = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 10))] + [2]
        examples.append(Example(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, f"ex{i}"))
    return examples


# ---- flash-attention and packed rows ----------------------------------------------------------

CALLS: list[dict] = []


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention as flash-attention computes it: causal within each row, and within each
    segment of `cu_seq_lens_q` when given. Packed positions alone separate nothing (the
    variable-length path is taken only from a batch of one row, as transformers does)."""
    cu = kwargs.get("cu_seq_lens_q")
    CALLS.append({"rows": query.shape[0], "cu_seq_lens": None if cu is None else cu.tolist()})
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    length = query.shape[2]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if cu is not None:
        starts = torch.zeros(length, dtype=torch.long)
        starts[cu[1:-1].long()] = 1
        segment = starts.cumsum(0)
        allowed &= segment[:, None] == segment[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# A flash-like kernel under a name with "flash" in it (transformers and sftforge then treat it
# as flash-attention), and the same kernel under another name: nothing flattens its rows.
AttentionInterface.register("flash_attention_recording", _attention)
AttentionInterface.register("rows_as_given", _attention)


def model_with(attention: str, seed: int = 0):
    model = tiny_llama(VOCAB, seed=seed)
    # Set on the config itself: set_attn_implementation would look for a flash kernel.
    model.config._attn_implementation = attention
    return model


def packed_micro_batch(examples):
    bins = pack_best_fit_decreasing([len(e.input_ids) for e in examples], 40)
    rows = [[examples[i] for i in b] for b in bins]
    assert len(rows) >= 2 and any(len(r) > 1 for r in rows)
    return collate_rows(rows, 0)


def test_packed_rows_reach_flash_attention_as_one_row_with_their_segments():
    examples = random_examples(8, seed=1)
    batch = packed_micro_batch(examples)
    model = model_with("flash_attention_recording")
    CALLS.clear()
    with torch.no_grad():
        packed = float(batch_loss(TokenLoss(model), batch))

    segments = batch.cu_seq_lens.tolist()
    assert CALLS and all(c == {"rows": 1, "cu_seq_lens": segments} for c in CALLS)
    # every example, and each row's padding, is a segment of its own
    lengths = [b - a for a, b in zip(segments, segments[1:], strict=False)]
    assert sum(lengths) == batch.input_ids.numel()
    assert sorted(n for n in lengths if n in {len(e.input_ids) for e in examples})
    alone = sum(float(batch_loss(TokenLoss(model), collate([e], 0))) for e in examples)
    assert packed == pytest.approx(alone, rel=1e-5)


def test_rows_handed_over_as_they_are_would_leak_and_the_packing_check_refuses_them():
    # Guard for the test above: the same kernel, given the micro-batch's rows as they are
    # (what transformers does with more than one row), lets examples see each other.
    examples = random_examples(8, seed=1)
    batch = packed_micro_batch(examples)
    model = model_with("rows_as_given")
    packed = float(batch_loss(TokenLoss(model), batch))
    alone = sum(float(batch_loss(TokenLoss(model), collate([e], 0))) for e in examples)
    assert abs(packed - alone) > 1e-3  # isolated, they agree to 1e-5 relative (above)
    with pytest.raises(PackingError, match="attend to each other"):
        verify_packing_isolation(model, CPU)
    verify_packing_isolation(model_with("flash_attention_recording"), CPU)


def test_the_packing_check_passes_in_bf16_and_still_refuses_a_leak_there():
    verify_packing_isolation(tiny_llama(VOCAB), CPU, amp=torch.bfloat16)
    verify_packing_isolation(tiny_llama(VOCAB).to(torch.bfloat16), CPU)  # pure bf16 weights
    with pytest.raises(PackingError, match="in bfloat16"):
        verify_packing_isolation(model_with("rows_as_given"), CPU, amp=torch.bfloat16)


def test_flash_attention_is_refused_for_a_run_in_fp32():
    with pytest.raises(ValueError, match="config key 'attention'.*bf16 or fp16 only"):
        check_attention_precision("flash_attention_2", None)
    check_attention_precision("flash_attention_2", torch.bfloat16)
    check_attention_precision("sdpa", None)


# ---- no host sync per micro-batch ----------------------------------------------------------


class CountedOps(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: reading a value (.item(),
    float()) and finding nonzero entries (boolean-mask indexing). Left out: transformers'
    own test for packed positions (masking_utils.find_packed_sequence_indices), one per
    forward whenever no mask is passed, which sftforge cannot remove without patching."""

    WAITING = {"_local_scalar_dense", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.WAITING and not _inside_transformers_mask_making():
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _inside_transformers_mask_making() -> bool:
    return any(f.filename.endswith("masking_utils.py") for f in traceback.extract_stack())


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_a_step_reads_the_device_once_however_many_micro_batches(micro_batches):
    model = tiny_llama(VOCAB)
    examples = random_examples(8, seed=2)
    per = len(examples) // micro_batches
    batches = [collate(examples[k : k + per], 0) for k in range(0, len(examples), per)]
    with CountedOps() as counted:
        accumulate_gradients(TokenLoss(model), batches, CPU, None)
    assert counted.counts == {"_local_scalar_dense": 1}


def test_the_next_steps_batches_are_made_ahead_in_pinned_memory_when_asked():
    steps = iter([(0, [0, 1]), (0, [2, 3]), (1, [1, 2])])
    examples = random_examples(4)
    made = made_ahead(steps, lambda indices: [collate([examples[i] for i in indices], 0)])
    assert [(epoch, indices) for epoch, indices, _ in (next(made) for _ in range(3))] == [
        (0, [0, 1]),
        (0, [2, 3]),
        (1, [1, 2]),
    ]
    made.close()


# ---- evaluation under the run's autocast -------------------------------------------------------


def test_evaluation_runs_under_the_runs_autocast(smollm2_tokenizer):
    from sftforge.data.messages import Message
    from sftforge.evaluation.generation import Prompt
    from sftforge.models.tokenizer import text_side
    from sftforge.training.assessment import Assessment

    encoder, _ = text_side(smollm2_tokenizer, "chatml")
    model = tiny_llama(len(smollm2_tokenizer))
    dtypes = set()
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    held_out = [encoder.encode_prompt([Message("user", "hi")]) + [2, 3]]
    assessment = Assessment(
        held_out=[Example(held_out[0], held_out[0], "h")],
        prompts=[Prompt([Message("user", "hello")])],
        references=["x"],
        sources=["s"],
        encoder=encoder,
        device=CPU,
        max_new_tokens=2,
        amp=torch.bfloat16,
    )
    assessment.measure(model)
    assert dtypes == {torch.bfloat16}  # held-out loss and generation alike
    dtypes.clear()
    assessment.amp = None
    assessment.measure(model)
    assert dtypes == {torch.float32}


def test_autocast_is_off_for_fp32():
    with autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, torch.bfloat16):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


# ---- FLOPs and MFU ----------------------------------------------------------------------------


def test_mfu_divides_by_the_peak_of_every_devices():
    from types import SimpleNamespace

    from sftforge.training.distributed import World

    progress = Progress(tokens=1000, flops=4e12, elapsed_s=2.0)
    t = SimpleNamespace(peak_tflops=1.0)
    one = step_record(1, 1, 0.5, 1e-4, 1.0, progress, t, World())
    two = step_record(1, 1, 0.5, 1e-4, 1.0, progress, t, World(rank=0, size=2, local_rank=0))
    assert one["tflops"] == two["tflops"] == pytest.approx(2.0)
    assert one["mfu"] == pytest.approx(2.0) and two["mfu"] == pytest.approx(1.0)


def test_flops_count_a_linear_layers_matmul_whatever_its_storage():
    class Packed(torch.nn.Linear):
        """A linear layer stored packed two values a byte (as bitsandbytes' 4-bit)."""

        def __init__(self, linear):
            super().__init__(linear.in_features, linear.out_features, bias=False)
            self.weight = torch.nn.Parameter(
                torch.zeros(linear.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False
            )

    model = tiny_llama(VOCAB)
    plain = flop_model(model, "lora")
    for layer in model.model.layers:
        layer.mlp.up_proj = Packed(layer.mlp.up_proj)
    assert flop_model(model, "lora") == plain


# ---- deterministic mode and the order of a run's start -----------------------------------------


def test_deterministic_mode_is_on_for_the_run_only(monkeypatch):
    import os

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert os.environ["FLASH_ATTENTION_DETERMINISTIC"] == "1"
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()


class Stop(Exception):
    pass


def test_a_run_encodes_its_data_before_it_touches_the_device(
    monkeypatch, tmp_path, demo_records_40
):
    """Forked encoding workers must start before CUDA and NCCL do in this process; and a
    run with training.deterministic trains in deterministic mode."""
    import sftforge.training.loop as train_module
    from sftforge.config.loading import load_config

    order = []

    def recorded(name, result=None, stop=False):
        def call(*args, **kwargs):
            order.append(name)
            if name == "prepare_model":
                order.append(torch.are_deterministic_algorithms_enabled())
            if stop:
                raise Stop
            return result(*args, **kwargs) if callable(result) else result

        return call

    monkeypatch.setattr(train_module, "load_examples_once", recorded("load_examples", "data"))
    monkeypatch.setattr(train_module, "device_of_rank", recorded("device_of_rank", CPU))
    monkeypatch.setattr(train_module, "start_processes", recorded("start_processes"))
    monkeypatch.setattr(train_module, "prepare_model_for", recorded("prepare_model", stop=True))
    config = load_config(
        None,
        [
            f"data.train={demo_records_40}",
            f"output_dir={tmp_path / 'run'}",
            "training.deterministic=true",
        ],
    )
    with pytest.raises(Stop):
        train_module.train(config)
    # the process group starts first, without a device: NCCL starts at the first collective
    assert order == ["start_processes", "load_examples", "device_of_rank", "prepare_model", True]
    assert not torch.are_deterministic_algorithms_enabled()
