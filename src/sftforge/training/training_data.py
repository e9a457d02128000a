"""A run's examples, from its config: its data (one dataset, or a mix of several) read and
encoded once into a table (encode/cache.py: cached; encode/parallel.py: in parallel), then
the held-out split, the mix and the max_length policy choose rows of it
(encode/selection.py): a run over a million conversations holds their per-example numbers,
not their text or token lists.

A mix names its sources in `data.train`, each read with its own format and column mapping,
its training conversations taken by weight or count, deterministically by the seed:

    data:
      train:
        - {path: chat.jsonl, weight: 2}          # each of its examples twice
        - {path: dolly.jsonl, count: 500}        # 500 of them, drawn by the seed
        - {path: qa.csv, columns: {instruction: question, output: answer}}

The mix (conversations, examples and tokens per source) is printed and kept in the run's
data report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sftforge.config.schema import Config, DataSource
from sftforge.console import say
from sftforge.data.loading import (
    LoadResult,
    Reading,
    reject_reason,
)
from sftforge.data.messages import Conversation, DataError
from sftforge.encode.batches import Batch, step_batches
from sftforge.encode.cache import encode_readings
from sftforge.encode.encoder import Encoder, Example
from sftforge.encode.parallel import (
    EncodingReport,
    default_num_proc,
)
from sftforge.encode.selection import HeldOut, MixSource, choose_rows, split_note
from sftforge.encode.table import ExampleView
from sftforge.models.prefix_sharing import shared_step_batches
from sftforge.training.distributed import World, share_of_step, wait_for_all


@dataclass
class TrainingData:
    """A run's examples: what is trained on, what is held out, and how they were obtained."""

    examples: ExampleView  # what is trained on, read like a list of Examples
    report: EncodingReport
    loaded: LoadResult  # what reading found (its conversations are not kept)
    held_out: list[Conversation] = field(default_factory=list)  # never trained on
    held_out_examples: list[Example] = field(default_factory=list)
    mix: list[dict] = field(default_factory=list)  # per source of a mix: what it gave


def load_examples_once(
    config: Config, encoder: Encoder, output_dir: Path, world: World
) -> TrainingData:
    """`load_examples` on every rank, the data encoded once per machine: under torchrun, with
    the cache on, each machine's first rank reads, encodes and caches the data while that
    machine's other ranks wait, then they read it from the cache. (Without the cache, data.cache
    false, every rank encodes it.) Rank 0 writes the rejects."""
    if not world.is_distributed or examples_cache(config) is None:
        return load_examples(config, encoder, output_dir, write_rejects=world.is_main)
    encodes = world.local_rank == 0
    if encodes:
        data = load_examples(config, encoder, output_dir, write_rejects=world.is_main)
    wait_for_all(world, "encoding the data")
    if not encodes:
        data = load_examples(config, encoder, output_dir, write_rejects=world.is_main)
    return data


def load_examples(
    config: Config, encoder: Encoder, output_dir: Path, write_rejects: bool = True
) -> TrainingData:
    """Read, encode, split and fit every example of a run; rejected records (with
    on_invalid=skip) go to one file, whatever stage rejected them (when `write_rejects`:
    under torchrun every rank prepares the same examples, and rank 0 writes).

    The conversations stream: every source is read once, one chunk at a time, into one
    ExampleTable (cached, and memory-mapped, under <cache_dir>/examples), and only the rows
    to train on are chosen after, so memory holds the table's small per-example columns,
    not the data. Held-out conversations are read again by index (a second pass)."""
    data, seed = config.data, config.training.seed
    sources = data.sources() if data.is_mix else [DataSource(path=data.train)]
    readings = [reading_of(config, source) for source in sources]
    held_out_file = config.eval.held_out if isinstance(config.eval.held_out, str) else None
    file_reading = reading_of(config, DataSource(path=held_out_file)) if held_out_file else None
    mix = [mix_source(source) for source in sources] if data.is_mix else None
    num_proc, cache_root = data.num_proc or default_num_proc(), examples_cache(config)
    rejects_path = Path(data.rejects or output_dir / "rejects.jsonl")
    loaded, encoded, sizes, entry = encode_readings(
        readings, encoder, data.on_invalid, num_proc, cache_root
    )
    table = encoded.table
    for _, err, record in encoded.rejected:
        loaded.rejects.add(err.source, reject_reason(err), record)
    writing = data.on_invalid == "skip" and write_rejects
    if writing:  # now, for a run that stops below; again once the held-out file is read
        loaded.rejects.write_jsonl(rejects_path)
        loaded.rejects_path = rejects_path
    say(loaded.summary())
    if encoded.rejected and write_rejects:
        say(f"rejected by the chat template: {len(encoded.rejected)} (written to {rejects_path})")
    if note := split_note(table):
        say(note)
    training_rejects = len(loaded.rejects)
    held_out = HeldOut.split(
        table, config.eval.held_out, seed, readings, file_reading, entry, loaded.rejects
    )
    chosen = choose_rows(
        table, sizes, held_out.indices, mix, seed, config.max_length, config.truncation
    )
    examples = ExampleView.joined(chosen.views)
    if not len(examples):
        raise DataError(str(data.train), "no example is left to train on")
    held_examples = held_out.examples(
        table, encoder, data.on_invalid, loaded.rejects, config.max_length
    )
    if writing and (held_rejects := len(loaded.rejects) - training_rejects):
        loaded.rejects.write_jsonl(rejects_path)
        say(f"held-out file: {held_rejects} rejected (written to {rejects_path})")
    kept = {e.source for e in held_examples}
    conversations = [c for c in held_out.conversations if str(c.source) in kept]
    return TrainingData(
        examples, chosen.report, loaded, conversations, held_examples, chosen.mix_report()
    )


def examples_cache(config: Config) -> Path | None:
    """Where encoded examples are cached (data.cache), under the run's cache_dir."""
    if not config.data.cache:
        return None
    from sftforge.models.source import default_cache_dir

    return Path(config.cache_dir or default_cache_dir()) / "examples"


def reading_of(config: Config, source: DataSource) -> Reading:
    """How one source is read: its own format and columns, else the data section's."""
    data = config.data
    columns = source.columns if source.columns is not None else data.columns
    return Reading(source.path, source.format or data.format, columns or None, data.on_invalid)


def mix_source(source: DataSource) -> MixSource:
    name = ", ".join(source.path) if isinstance(source.path, list) else source.path
    return MixSource(name, source.count, source.weight)


def step_batches_of(config: Config, examples, encoder, world: World):
    """The function that gives this rank's micro-batches of a step's example indices, as the
    run's settings cut them (batch size, token budget, packing, shared prefixes)."""
    t, lengths = config.training, examples.lengths
    make_batches = shared_step_batches if t.share_prefixes else step_batches
    batching = {
        "batch_size": t.batch_size,
        "token_budget": t.micro_batch_tokens,
        "pack_length": config.max_length if t.packing else None,
    }

    def my_batches(indices: list[int]) -> list[Batch]:
        mine = share_of_step(indices, lengths, world)
        return make_batches(examples, lengths, mine, encoder.pad_id, **batching)

    return my_batches
