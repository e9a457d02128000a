"""One typed config: the schema a YAML file plus `key=value` overrides (`training.lr=1e-4`)
are validated against (config/loading.py reads them). A mistake names the key and, where the
values are a fixed set, the allowed ones. Each set of allowed values (a Literal type) is
defined once, by the stage that owns it (DataFormat in data/formats.py, Precision in
models/devices.py, ...), and imported here; Schedule and Parallelism, the run's own, are
defined here. A field marked `resumable` may change when a run resumes; every other field
shapes the steps, and a resume refuses a change.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sftforge.data.formats import DataFormat
from sftforge.data.loading import OnInvalid
from sftforge.encode.parallel import Truncation
from sftforge.encode.render import ReasoningMode, TrainOn
from sftforge.errors import InputError
from sftforge.evaluation.scoring import ScorerConfig
from sftforge.models.devices import Precision
from sftforge.models.loading import Attention, LoraInit, Method
from sftforge.models.loss import TokenLossKind
from sftforge.trackers import Tracker

Schedule = Literal["cosine", "linear", "constant"]
Parallelism = Literal["ddp", "fsdp"]  # under torchrun: whole copies, or sharded weights


def resumable(default, **field_options):
    """A config field that may differ when a run resumes: it changes where and how often
    things are written or shown, never which steps are taken or what they compute."""
    return Field(default, json_schema_extra={"resumable": True}, **field_options)


class ConfigKeyError(InputError):
    """A check across keys, raised inside validation, that names the key to change."""

    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(Strict):
    """One dataset of a mix: its files, how many of its examples to take, and how to read it
    when that differs from the data section's format and columns."""

    path: str | list[str] = Field(description="file, folder, or list of them")
    weight: float | None = Field(
        default=None,
        gt=0,
        description="take this many times its training examples (0.5: half, 2: each twice)",
    )
    count: int | None = Field(default=None, gt=0, description="take this many training examples")
    format: DataFormat | None = Field(default=None, description="default: data.format")
    columns: dict[str, str] | None = Field(default=None, description="default: data.columns")

    @model_validator(mode="after")
    def _one_amount(self):
        if self.weight is not None and self.count is not None:
            raise ConfigKeyError("data.train", f"{self.path}: give weight or count, not both")
        return self


class DataConfig(Strict):
    train: str | list[str | DataSource] = Field(
        default="",
        description="file, folder, or list of them (JSON, JSONL, Parquet, CSV); an entry may "
        "be a source of a mix: {path, weight or count, format, columns}",
    )
    format: DataFormat = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description="our field -> the dataset's column, e.g. output: response"
    )
    on_invalid: OnInvalid = "error"
    rejects: str | None = Field(
        default=None, description="where skipped records go; default <output_dir>/rejects.jsonl"
    )

    def sources(self) -> list[DataSource]:
        """Every entry of `train` as a DataSource (a plain path: all of it, read as the data
        section says)."""
        entries = self.train if isinstance(self.train, list) else [self.train]
        return [e if isinstance(e, DataSource) else DataSource(path=e) for e in entries]

    @property
    def is_mix(self) -> bool:
        return isinstance(self.train, list) and any(isinstance(e, DataSource) for e in self.train)

    def paths(self) -> list[str]:
        """Every file or folder named, mixed or not."""
        found = []
        for source in self.sources():
            found += source.path if isinstance(source.path, list) else [source.path]
        return found

    num_proc: int | None = resumable(
        None, gt=0, description="processes encoding the data; default: every core, up to 8"
    )
    cache: bool = resumable(
        True,
        description="keep the encoded examples under <cache_dir>/examples, keyed by the data, "
        "tokenizer, template and masking options: a second run over the same data starts "
        "in seconds, and under torchrun each machine's first rank encodes for the others",
    )


class LoraConfig(Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="on each adapter's input, in training; each example's mask drawn from its "
        "own seed (step, layer, example), so any number of processes trains the same run "
        "(not in batches that share prefixes: those draw per process)",
    )
    target_modules: str | list[str] = "all-linear"
    rslora: bool = Field(default=False, description="adapter scaled by alpha/sqrt(r), not alpha/r")
    dora: bool = Field(
        default=False, description="DoRA: each adapted weight's magnitude learnt apart (slower)"
    )
    init: LoraInit = Field(
        default="default",
        description="default: A random, B zero; pissa / olora: the adapter starts as the "
        "weight's principal part (SVD) / orthonormal part (QR), the frozen weight as the rest; "
        "the saved adapter is converted back to plain LoRA of rank 2r on the original base",
    )
    b_lr_ratio: float = Field(
        default=1.0,
        gt=0,
        description="LoRA+: the B matrices learn at this many times training.lr (A at the "
        "rate itself); 1 is plain LoRA",
    )
    fp32_sum: bool = Field(
        default=True, description="under autocast, add adapter and base outputs in fp32"
    )


class TrainingConfig(Strict):
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        default=None,
        description="peak rate; default 2e-5 full, 2e-4 LoRA; auto: chosen by trials (lr_probe.py)",
    )
    lr_probe_steps: int = Field(default=8, gt=0, description="steps of each lr: auto trial")
    epochs: float = Field(default=3, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="overrides epochs")
    batch_size: int = Field(default=8, gt=0, description="examples per micro-batch")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    micro_batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="cut each step's batch_size x grad_accum examples into micro-batches of at "
        "most this many tokens (padding included) instead of batch_size examples each",
    )
    packing: bool = Field(
        default=False,
        description="pack a step's examples into rows of max_length tokens (best-fit "
        "decreasing); attention stays within each example",
    )
    share_prefixes: bool = Field(
        default=False,
        description="with packing: a step's examples that begin with the same untrained tokens "
        "(system prompt, tools) share one copy of them in their row; exact",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="recompute activations in the backward: less memory, slower"
    )
    compile: bool = Field(default=False, description="torch.compile each decoder layer")
    peak_tflops: float | None = resumable(
        None,
        gt=0,
        description="one device's matmul peak in TFLOP/s at the training precision; "
        "shows MFU, over every process's devices (bench/matmul_peak.py measures it)",
    )
    schedule: Schedule = "cosine"
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    loss: TokenLossKind = Field(
        default="cross_entropy",
        description="dft: each trained token's cross-entropy weighted by the model's "
        "probability of it, held constant (dynamic fine-tuning); evaluation stays plain "
        "cross-entropy",
    )
    neftune_alpha: float | None = Field(
        default=None,
        gt=0,
        description="NEFTune: uniform noise of alpha / sqrt(example length x hidden size) on "
        "the input embeddings in training (paper: 5), drawn per example as dropout; null: off",
    )
    seed: int = 42
    deterministic: bool = Field(
        default=False,
        description="only algorithms that give the same bits on every run (torch's "
        "deterministic mode, cuBLAS's fixed workspace, deterministic flash-attention): a resumed "
        "GPU run equals the uninterrupted one bitwise, a little slower (CPU runs always do)",
    )
    precision: Precision = Field(
        default="auto",
        description="auto: bf16 autocast (fp32 master weights) where the device runs bf16 "
        "fast; pure_bf16 (LoRA only): frozen weights stored in bf16, adapters in fp32",
    )
    bf16_rounding: Literal["stochastic", "nearest"] = Field(
        default="stochastic",
        description="each step's bf16 copy of the trained matrices under bf16 autocast: "
        "stochastic (the fp32 masters on average, so tiny updates reach the forward pass; a "
        "4-byte residual per element while a step runs) or nearest (autocast's own cast)",
    )
    mmap_threshold_kib: int | None = resumable(
        None,
        ge=0,
        description="hold glibc's mmap threshold at this many KiB, so that host memory freed "
        "by each step goes back to the OS instead of piling up in the heap: less memory, "
        "slower (docs/benchmarks.md); null: glibc's moving threshold",
    )
    device: str = resumable("auto", description="auto, cpu, cuda, cuda:1, mps")
    parallelism: Parallelism = resumable(
        "ddp",
        description="under torchrun: ddp keeps a whole model on each process; fsdp (FSDP2) "
        "shards weights, gradients and optimizer state, and builds, measures and saves the model "
        "from the shards. The update is the same either way, and as in one process",
    )
    fsdp_cpu_offload: bool = resumable(
        False,
        description="with fsdp on GPUs: shards, gradients and optimizer state in CPU memory, "
        "the optimizer stepping there (FSDP2's CPUOffloadPolicy); slower",
    )
    collective_timeout_s: float = resumable(
        1800,
        gt=0,
        description="under torchrun: seconds a rank waits in a training collective before the "
        "run fails (a rank hung or died); loading and saving wait longer",
    )
    log_every: int = resumable(1, gt=0)
    save_every: int | None = resumable(
        500,
        gt=0,
        description="write a resumable checkpoint every N optimizer steps (and at the end); "
        "null: only at the end",
    )
    keep_checkpoints: int = resumable(2, gt=0, description="keep the newest K checkpoints")
    skip_nonfinite_steps: int = resumable(
        0,
        ge=0,
        description="skip up to N optimizer steps whose loss or gradient is NaN/inf; "
        "0 stops the run at the first one",
    )


class EvalConfig(Strict):
    held_out: float | int | str | None = Field(
        default=None,
        description="fraction (0.1), count (20) or file of held-out examples; never trained on",
    )
    every: int | None = resumable(None, gt=0, description="eval loss every N steps")
    save_best: bool = resumable(False, description="keep the weights with best eval loss")
    scorer: ScorerConfig | None = Field(default=None, description="score generated answers")
    max_prompts: int = resumable(64, gt=0, description="held-out prompts to generate for")
    max_new_tokens: int = Field(default=128, gt=0)
    samples: int = resumable(8, ge=0, description="before/after generations in the report")
    forgetting: bool = Field(default=True, description="perplexity on general text, before/after")
    corpus: str | None = Field(default=None, description="general text; default: bundled")
    general_prompts: str | None = Field(default=None, description="default: bundled")


class Config(Strict):
    model: str = Field(default="smollm2-135m", description="embedded name, HF dir, hub id, .gguf")
    trust_remote_code: bool = False
    allow_pickle: bool = Field(
        default=False,
        description="load .bin/.pt (pickle) weights; unpickling runs arbitrary code",
    )
    resume: str | None = resumable(
        None,
        description="auto: the newest complete checkpoint in output_dir; or a checkpoint path",
    )
    overwrite_output_dir: bool = resumable(
        False,
        description="start afresh in an output_dir holding a previous run, deleting its "
        "checkpoints and model",
    )
    cache_dir: str | None = resumable(None)
    method: Method = "lora"
    attention: Attention = Field(
        default="auto", description="auto: SDPA; flash_attention_2 on CUDA for packed rows"
    )
    template: str = Field(default="auto", description="auto, a built-in name, or a Jinja file")
    train_on: TrainOn = "all_assistant_turns"
    reasoning: ReasoningMode = Field(
        default="train",
        description="an assistant's reasoning: train (with its answer), context (shown, "
        "not trained), drop (left out)",
    )
    template_options: dict = Field(
        default_factory=dict,
        description="variables for the chat template, e.g. {enable_thinking: false}; a "
        "record's chat_template_kwargs take precedence",
    )
    max_length: int = Field(default=1024, gt=1)
    truncation: Truncation = "drop"
    output_dir: str = resumable("runs/sftforge")
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    report_to: list[Tracker] = resumable(
        [],
        description="experiment trackers that get the metrics, config, data report and "
        "before/after figures: tensorboard, mlflow, trackio, wandb (offline by default)",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_or_several(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self):
        if not self.data.train:
            raise ConfigKeyError("data.train", "required: a file, a folder, or a list of them")
        if self.training.precision == "pure_bf16" and self.method != "lora":
            why = {
                "full": "full fine-tuning keeps fp32 master weights",
                "qlora": "qlora already holds the frozen base in 4-bit",
            }[self.method]
            raise ConfigKeyError(
                "training.precision", f"pure_bf16 is for LoRA: {why}; use bf16 (autocast) instead"
            )
        if self.resume is not None and self.overwrite_output_dir:
            raise ConfigKeyError(
                "overwrite_output_dir",
                f"true deletes the run that resume={self.resume} would continue; set one of them",
            )
        t = self.training
        if t.share_prefixes and not t.packing:
            raise ConfigKeyError("training.share_prefixes", "needs training.packing=true")
        if t.share_prefixes and t.neftune_alpha is not None:
            raise ConfigKeyError(
                "training.share_prefixes",
                "cannot go with training.neftune_alpha: a shared prefix would get one noise "
                "for examples of different lengths; set one of them",
            )
        if t.share_prefixes and self.attention == "flash_attention_2":
            raise ConfigKeyError(
                "training.share_prefixes",
                "needs a 4D attention mask, which flash_attention_2 does not take; use "
                "attention=sdpa",
            )
        if self.eval.save_best and self.eval.held_out is None:
            raise ConfigKeyError(
                "eval.save_best",
                "needs eval.held_out: the best weights are chosen by held-out loss",
            )
        return self

    def run_shaping_settings(self) -> dict:
        """The settings a resume must find unchanged: every field not marked resumable."""
        return self.model_dump(exclude=_resumable_fields(type(self)))

    @property
    def learning_rate(self) -> float | None:
        """The peak learning rate; None when training.lr auto leaves it to the probe."""
        lr = self.training.lr
        return None if lr == "auto" else lr or self.default_learning_rate

    @property
    def default_learning_rate(self) -> float:
        return 2e-4 if self.uses_lora else 2e-5

    @property
    def uses_lora(self) -> bool:
        """LoRA adapters are trained (method lora, or qlora on a 4-bit base)."""
        return self.method in ("lora", "qlora")


def _resumable_fields(section: type[BaseModel]) -> dict:
    """The fields marked `resumable`, as a model_dump exclude tree."""
    tree: dict = {}
    for name, info in section.model_fields.items():
        marks = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        is_section = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        if marks.get("resumable"):
            tree[name] = True
        elif is_section and (inner := _resumable_fields(info.annotation)):
            tree[name] = inner
    return tree
