"""sftforge: supervised fine-tuning of language models with exact loss masks.

    import sftforge
    result = sftforge.train(model="smollm2-135m", data="train.jsonl", output_dir="runs/a")
    tuned = sftforge.load_model(result.output_dir)
    print(tuned.generate("Extract the order as JSON: two lamps to Oslo"))

Every command of the `sftforge` CLI is a function here, taking values and giving values back;
errors are SftforgeError subclasses (InputError: fix the input; RunFailed), and nothing prints
unless called with verbose=True. docs/python-api.md walks through it.
"""

from sftforge.api.curating import (
    convert_data,
    data_stats,
    dedup,
    filter_data,
    inspect,
    load_conversations,
)
from sftforge.api.evaluating import Comparison, Evaluation, compare, evaluate
from sftforge.api.exporting import Export, export
from sftforge.api.inference import LoadedModel, chat, convert, load_model, merge
from sftforge.api.running import demo, sweep, train
from sftforge.config.loading import ConfigError, load_config
from sftforge.config.schema import Config
from sftforge.curate.filters import FilterRules
from sftforge.data.loading import conversation_from_record, detect_format
from sftforge.data.messages import Conversation, DataError, Message
from sftforge.errors import InputError, RunFailed, RunInterrupted, SftforgeError
from sftforge.training.run import TrainResult

__all__ = [
    # configuring and training
    "Config",
    "load_config",
    "train",
    "TrainResult",
    "sweep",
    "demo",
    # data
    "load_conversations",
    "inspect",
    "data_stats",
    "dedup",
    "filter_data",
    "FilterRules",
    "convert_data",
    "detect_format",
    "conversation_from_record",
    "Conversation",
    "Message",
    # trained models
    "load_model",
    "LoadedModel",
    "chat",
    "merge",
    "convert",
    "export",
    "Export",
    "evaluate",
    "Evaluation",
    "compare",
    "Comparison",
    # errors
    "SftforgeError",
    "InputError",
    "ConfigError",
    "DataError",
    "RunFailed",
    "RunInterrupted",
]
