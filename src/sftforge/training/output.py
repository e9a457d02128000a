"""What a training run leaves behind: its model or adapter saved for transformers and peft,
and a plain model made from one of its checkpoints (also a sharded one)."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path


def save_run(
    folder: Path,
    model,
    tokenizer,
    stop_ids: tuple[int, ...],
    pad_id: int,
    config,
    data_report: dict,
    weights_written: bool = False,
    initial_adapter: Path | None = None,
) -> None:
    """Model (or adapter), tokenizer with its chat template, generation stop tokens, the
    resolved config and the data report: everything inference needs to render and stop
    exactly as in training. The live model is left as it was: the generation config is
    written from a copy. `weights_written`: the weights (and config.json) are in `folder`
    already, gathered from FSDP's shards. `initial_adapter`: a pissa/olora adapter's start
    (save_initial_adapter): the adapter is saved as plain LoRA on the original base."""
    from sftforge.config.loading import dump_config

    folder.mkdir(parents=True, exist_ok=True)
    is_adapter = hasattr(model, "peft_config")
    base = model.get_base_model() if is_adapter else model
    if is_adapter and not weights_written:
        # The rows of tokens the template added are saved as the adapter's trainable-token
        # rows; peft would otherwise save the whole resized embedding (and a tied head).
        # From pissa/olora, peft saves the change since the start: (A | A0)(B | -B0), rank 2r.
        conversion = {"path_initial_model_for_weight_conversion": str(initial_adapter)}
        options = conversion if initial_adapter else {}
        with warnings.catch_warnings():  # peft, loading the start beside it: "convert it"
            warnings.filterwarnings("ignore", "(PiSSA|OLoRA) changes the base weights")
            model.save_pretrained(
                folder, safe_serialization=True, save_embedding_layers=False, **options
            )
    elif not weights_written:
        model.save_pretrained(folder, safe_serialization=True)
    if base.generation_config is not None:
        generation = copy.deepcopy(base.generation_config)
        # Generation must stop at the template's end-of-turn token, whichever it is.
        generation.eos_token_id = list(stop_ids)
        generation.pad_token_id = pad_id
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dump_config(config, folder / "sftforge.yaml")
    (folder / "data_report.json").write_text(json.dumps(data_report, indent=2))


INITIAL_ADAPTER = "initial_adapter"  # a pissa/olora run's adapter as it started


def initial_adapter_of(config, output_dir: Path) -> Path | None:
    """Where a run whose adapters start from the base weights (lora.init pissa, olora) keeps
    them as they started; None for every other run."""
    starts_from_weights = config.uses_lora and config.lora.init != "default"
    return output_dir / INITIAL_ADAPTER if starts_from_weights else None


def save_initial_adapter(model, folder: Path) -> None:
    """A pissa/olora adapter as it starts, before any step: what save_run subtracts. Written
    as plain LoRA (init_lora_weights true), so that loading it rewrites no base weight."""
    config = model.peft_config["default"]
    chosen, config.init_lora_weights = config.init_lora_weights, True
    try:
        model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False)
    finally:
        config.init_lora_weights = chosen


def convert_checkpoint(checkpoint: Path, output_dir: Path) -> Path:
    """A checkpoint written by any number of processes (FSDP's sharded ones included) ->
    a plain model or adapter directory, loadable with transformers/peft like a run's final
    model. The base and its adapters are built from the run's settings recorded in the
    checkpoint, on the CPU, and the trained weights loaded into them."""
    import torch

    from sftforge.config.schema import Config
    from sftforge.models.loss import TokenLoss
    from sftforge.training.checkpoint import CheckpointError, verify_checkpoint
    from sftforge.training.prepare import prepare
    from sftforge.training.sharded import load_trained_weights

    state_file = checkpoint / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{checkpoint}: not a checkpoint (no state.json)")
    problem = verify_checkpoint(checkpoint)
    if problem is not None:
        raise CheckpointError(f"{checkpoint}: {problem}")
    state = json.loads(state_file.read_text("utf-8"))
    config = Config.model_validate(state["identity"]["config"])
    prepared = prepare(config, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as scratch:
        initial_adapter = initial_adapter_of(config, Path(scratch))
        if initial_adapter:
            save_initial_adapter(prepared.model, initial_adapter)
        load_trained_weights(checkpoint, TokenLoss(prepared.model))
        encoder = prepared.encoder
        report = {"base_model": prepared.base_model_path, "converted_from": str(checkpoint)}
        save_run(
            output_dir, prepared.model, encoder.tokenizer, encoder.stop_ids, encoder.pad_id,
            config, report, initial_adapter=initial_adapter,
        )  # fmt: skip
    return output_dir
