"""Many processes, one update: data parallelism with torch.distributed, launched by torchrun.

`torchrun --nproc_per_node N -m sftforge train config.yaml` starts N copies of the run. The
contract with the launcher is torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/MASTER_PORT), so Slurm, Kubernetes and cloud launchers that set it work too.
A plain `sftforge train` is one process and never touches torch.distributed.

What is the same whatever the number of processes:
- An optimizer step is `batch_size x grad_accum` examples in all, drawn as in one process;
  each rank takes a disjoint share of them (`share_of_step`, balanced by tokens).
- Each rank's summed token loss is divided by the step's *global* count of trained tokens
  (summed over ranks) and multiplied by the world size, because DDP and FSDP average the
  gradients over ranks: the gradient is that of the mean over every trained token of the
  step, as in one process.
- Every rank runs the same number of micro-batches (a rank with fewer runs empty ones that
  train nothing): FSDP gathers each layer's weights in every forward, on all ranks at once.

DDP keeps a whole copy of the model on each rank; FSDP2 (`fully_shard`, one unit per decoder
layer and one for the rest) keeps a shard of each weight, of the gradients and of the
optimizer state, and gathers a layer's weights just before it runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sftforge.console import say
from sftforge.errors import InputError

# Collectives inside training time out after the config's training.collective_timeout_s.
# Waiting for the other ranks to finish loading the model and the data, or for rank 0 to
# measure and save, is bounded by this much longer limit instead: a slow rank there is
# normal, and a rank that died is noticed by the launcher, which stops the others.
STARTUP_TIMEOUT = timedelta(hours=6)
LAUNCHER_CHECK_S = 0.5  # how often a rank looks whether its launcher is still there


class DistributedError(InputError):
    pass


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (rank 0 of 1 when alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # its number on its machine: which GPU it takes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


ALONE = World()  # one process


def world_from_environment() -> World:
    """The world torchrun (or another launcher) describes in RANK, WORLD_SIZE, LOCAL_RANK."""
    size = os.environ.get("WORLD_SIZE")
    if size is None or int(size) == 1:
        return World()
    missing = [
        name
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        if name not in os.environ
    ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: start many processes with "
            "torchrun (torchrun --nproc_per_node N -m sftforge train config.yaml), or a "
            "launcher that sets torchrun's variables"
        )
    return World(int(os.environ["RANK"]), int(size), int(os.environ["LOCAL_RANK"]))


def device_of_rank(device: torch.device, world: World) -> torch.device:
    """The GPU this process computes on, with its index, made the current CUDA device (which
    bitsandbytes, flash-attention and memory statistics use). Alone: the one asked for (no
    index: the current one). Among many: the GPU of its LOCAL_RANK, or the only GPU it sees
    when the launcher gives each process its own (Slurm --gpus-per-task=1, or
    CUDA_VISIBLE_DEVICES per process). CPU ranks share the CPU."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if count == 0:
        raise DistributedError(
            f"config key 'training.device': {device}, but torch sees no GPU (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). Use "
            "training.device=auto or cpu, or install the torch build for your CUDA"
        )
    if not world.is_distributed:
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DistributedError(
                f"config key 'training.device': {device}, but this machine shows {count} "
                f"GPUs: use cuda:0 to cuda:{count - 1}, or auto"
            )
    elif world.local_rank < count:
        index = world.local_rank
    elif count == 1:
        index = 0  # the launcher made one GPU visible to each process: it is this one's
    else:
        raise DistributedError(
            f"rank {world.rank} has LOCAL_RANK {world.local_rank} but this machine shows "
            f"{count} GPUs: start at most {count} processes per machine (torchrun "
            f"--nproc_per_node {count}), or give each process one GPU of its own "
            "(Slurm --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per process)"
        )
    if world.is_distributed and device.index not in (None, index):
        raise DistributedError(
            f"config key 'training.device': {device} under torchrun; each process takes the "
            f"GPU of its LOCAL_RANK (here cuda:{index}). Use training.device=cuda (or auto), "
            "and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def end_with_the_launcher() -> None:
    """Stop this rank as a SIGTERM to torchrun would (finish the step, agree on it with the
    other ranks, checkpoint it, exit) when its launcher dies: a daemon thread sees this
    process handed to another parent and sends it one SIGTERM. Without it, `kill -9` of
    torchrun leaves its ranks training on, orphaned, to the end of the run (seen here). (The
    kernel's parent-death signal, tried first, reached a rank more than once, and a second
    SIGTERM ends a rank at once, without its checkpoint.)"""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(LAUNCHER_CHECK_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def start_processes(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the process group: NCCL between GPUs, gloo between CPU processes. Also a gloo
    group with a long timeout for the waits that are not training collectives. No device is
    bound here: NCCL starts (its communicator and threads) at the first collective, on the
    GPU device_of_rank made current, after the data is encoded by forked workers."""
    global _waiting_group
    if not world.is_distributed:
        return
    end_with_the_launcher()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _waiting_group = dist.new_group(backend="gloo", timeout=STARTUP_TIMEOUT)


def end_processes() -> None:
    global _waiting_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _waiting_group = None


_waiting_group = None


def wait_for_all(world: World, what: str = "") -> None:
    """Wait, up to STARTUP_TIMEOUT, until every rank gets here: after preparing, and while
    rank 0 measures or saves alone (`what` is said on rank 0)."""
    if not world.is_distributed:
        return
    if world.is_main and what:
        say(f"waiting for every rank to finish {what}")
    dist.barrier(group=_waiting_group)


def share_of_step(indices: list[int], lengths: list[int], world: World) -> list[int]:
    """This rank's examples of an optimizer step: longest first, each to the rank holding
    the fewest tokens so far (ties to the lowest rank). Disjoint, covering the step, and the
    same on every rank (a function of the step alone)."""
    if not world.is_distributed:
        return indices
    tokens = [0] * world.size
    mine = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        rank = min(range(world.size), key=lambda r: (tokens[r], r))
        tokens[rank] += lengths[i]
        if rank == world.rank:
            mine.append(i)
    return mine


def sum_over_ranks(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (in float64: token counts stay exact)."""
    if not world.is_distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def max_over_ranks(value: int, world: World, device: torch.device) -> int:
    if not world.is_distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def rank_prefix(world: World) -> str:
    return f"[rank {world.rank}] " if world.is_distributed else ""


def quiet_other_ranks(world: World) -> None:
    """Ranks other than 0 print nothing on stdout (progress, figures, report lines are rank
    0's); their errors still go to stderr, named by rank."""
    if world.is_distributed and not world.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def wrap_for_training(
    loss_module: torch.nn.Module,
    decoder_layers,
    world: World,
    parallelism: str,
    amp,
    offload: bool = False,
):
    """`loss_module` (a TokenLoss) under DDP, or sharded by FSDP2 one decoder layer at a time
    and the rest (embeddings, final norm, head) as the outermost unit; unchanged when alone.
    Adapters are attached before: FSDP shards them with the layer they belong to. With
    `offload` (GPUs only) FSDP keeps the shards, their gradients and the optimizer state in
    CPU memory and runs the optimizer step there."""
    if not world.is_distributed:
        return loss_module
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(loss_module.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(loss_module, device_ids=ids)
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    options = {}
    if amp:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    if offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=True)
    for layer in decoder_layers:
        fully_shard(layer, **options)
    fully_shard(loss_module, **options)
    register_fsdp_forward_method(loss_module, "apply_to_model")
    return loss_module


def local_part(param: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory this process holds: a DTensor's (FSDP's) local shard, or the
    tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def on_sharded_model(trainer, fn):
    """`fn(model)` on every rank at once, under FSDP: through the loss module's
    `apply_to_model`, which gathers the outermost unit's weights around it. They are sharded
    again after: FSDP leaves the outermost unit gathered after a forward, expecting the
    backward, and the optimizer must find the sharded weights it was given."""
    try:
        return trainer.apply_to_model(fn)
    finally:
        trainer.reshard()


def offloads(config, device: torch.device, world: World) -> bool:
    """Whether FSDP keeps its shards in CPU memory (training.fsdp_cpu_offload): on GPUs
    only; on a CPU they are there already, which is said once."""
    if not (config.training.fsdp_cpu_offload and world.is_distributed):
        return False
    if config.training.parallelism != "fsdp":
        raise DistributedError(
            "config key 'training.fsdp_cpu_offload': offloads FSDP's shards; set "
            "training.parallelism=fsdp, or leave fsdp_cpu_offload off"
        )
    if device.type != "cuda":
        say(
            f"note: training.fsdp_cpu_offload has no effect on {device.type}: it moves a GPU's "
            "shards and optimizer state to CPU memory, where these already are"
        )
        return False
    return True


def gradient_sync(wrapped: torch.nn.Module, enabled: bool):
    """Whether the next backward reduces gradients over the ranks. Under DDP only the last
    micro-batch of a step needs to (no_sync before it). FSDP reduces (reduce-scatters) after
    every micro-batch: skipping it would keep the whole model's gradients, unsharded, on
    every rank until the step's last micro-batch (seen here: a 0.53B model's full
    fine-tune peaked at 8.8 GB a rank on 2 ranks against 9.9 GB in one process)."""
    from contextlib import nullcontext

    if hasattr(wrapped, "no_sync") and not enabled:  # DDP
        return wrapped.no_sync()
    return nullcontext()


def from_main(value, world: World):
    """`value` as rank 0 has it, on every rank (any picklable value)."""
    if not world.is_distributed:
        return value
    box = [value]
    # On the waiting group (gloo, long timeout): a rank may still be preparing its data.
    dist.broadcast_object_list(box, src=0, group=_waiting_group)
    return box[0]


def check_parallel_settings(config, world: World) -> None:
    """What many processes cannot do yet, refused before anything loads."""
    if not world.is_distributed:
        return
    parallelism = config.training.parallelism
    if config.method == "qlora" and parallelism == "fsdp":
        raise DistributedError(
            "config key 'training.parallelism': fsdp cannot shard QLoRA's 4-bit base "
            "(bitsandbytes stores it as packed uint8 with its quantization state beside it); "
            "use training.parallelism=ddp, which keeps a whole 4-bit base on each GPU and "
            "reduces the adapters' gradients only"
        )
    if config.uses_lora and config.lora.init != "default" and parallelism == "fsdp":
        raise DistributedError(
            f"config key 'lora.init': {config.lora.init} computes the adapters from whole base "
            "weights, which fsdp never holds; use training.parallelism=ddp"
        )


def processes_note(world: World, parallelism: str) -> str:
    if not world.is_distributed:
        return ""
    return f" x {world.size} processes ({parallelism.upper()})"


def shared_note(world: World) -> str:
    return f" in all, shared out over {world.size} processes" if world.is_distributed else ""
