"""The data commands run in memory that does not grow with the number of records: each is run
through the API on N and on 4N generated chats (half of them repeats), and the peak of the
memory Python and numpy allocate during the call (tracemalloc) is compared. Without the
duplicate index the peak at 4N is within 1.3x of that at N; with it (`stats`, `dedup`), the
growth is within the index's stated size per distinct record (curate/dedup.py). At this
scale a test tells records held (a KB or more each) from none, and a dropped duplicate held
from none (the repeats case); bench/data_memory.py measures the whole process at 100k and
400k records, where bytes per record show."""

import json
import random
import tracemalloc

import pytest

import sftforge
from sftforge.api import curating
from sftforge.curate.dedup import EXACT_INDEX_BYTES, NEAR_INDEX_BYTES

SMALL = 2_000  # four chunks of encoding: the pipeline is full, the peak set
WORDS = [
    "the",
    "a",
    "river",
    "stone",
    "light",
    "quiet",
    "north",
    "table",
    "ask",
    "answer",
    "seven",
    "blue",
    "market",
    "paper",
    "winter",
    "signal",
    "garden",
    "copper",
    "window",
    "letter",
    "orange",
    "engine",
    "silver",
]


def write_chats(path, n: int) -> None:
    """`n` two- or four-turn chats (in turn) of random words (a fixed seed), every second one a
    repeat of an earlier one. Turns of fixed lengths make every chunk of records alike, so
    the peak does not move with the longest record met."""
    r = random.Random(n)
    lines = []
    with open(path, "w") as f:
        for k in range(n):
            if k % 2:
                f.write(r.choice(lines))
                continue
            messages = []
            for _ in range(1 + k // 2 % 2):
                ask = " ".join(r.choice(WORDS) for _ in range(12))
                answer = " ".join(r.choice(WORDS) for _ in range(24))
                messages += [
                    {"role": "user", "content": f"{k}: {ask}?"},
                    {"role": "assistant", "content": answer.capitalize() + "."},
                ]
            lines.append(json.dumps({"messages": messages}) + "\n")
            f.write(lines[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chats")
    files = {}
    for n in (SMALL, 4 * SMALL):
        files[n] = folder / f"chats_{n}.jsonl"
        write_chats(files[n], n)
        # Ten distinct records, repeated: all but ten are dropped duplicates.
        files["repeats", n] = folder / f"repeats_{n}.jsonl"
        ten = files[n].read_text().splitlines(keepends=True)[:20:2]
        files["repeats", n].write_text("".join(ten * (n // 10)))
    return files


def traced_peak(call) -> int:
    """Bytes allocated at the peak of `call()` beyond what was allocated before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def commands(tokenizer: str, out):
    """Each command as the API runs it (on the data `d`), with its index's bytes per record."""
    rules = sftforge.FilterRules(min_tokens=20, max_tokens=60, response_blocklist=["copper"])
    return {
        "stats": (
            lambda d: sftforge.data_stats(d, tokenizer, num_proc=1, exact_only=True),
            EXACT_INDEX_BYTES,
        ),
        "filter": (
            lambda d: sftforge.filter_data(d, out / "kept.jsonl", rules, model=tokenizer),
            0,
        ),
        "convert": (lambda d: sftforge.convert_data(d, out / "s.jsonl", to="sharegpt"), 0),
        "dedup": (lambda d: sftforge.dedup(d, out / "d.jsonl", exact_only=True), EXACT_INDEX_BYTES),
        "dedup with near duplicates": (
            lambda d: sftforge.dedup(d, out / "d.jsonl"),
            NEAR_INDEX_BYTES,
        ),
        "dedup of repeats": (lambda d: sftforge.dedup(d, out / "d.jsonl"), 0),
    }


@pytest.mark.parametrize(
    "command",
    [
        "stats",
        "filter",
        "convert",
        "dedup",
        "dedup with near duplicates",
        "dedup of repeats",
    ],
)
def test_a_data_command_holds_no_more_for_four_times_the_records_than_its_index(
    command, data, smollm2_tokenizer_path, shared_smollm2_tokenizer, tmp_path, monkeypatch
):
    # The tokenizer, loaded once here: loading it peaks above what the data takes.
    monkeypatch.setattr(curating, "load_tokenizer", lambda path: shared_smollm2_tokenizer)
    run, index_bytes_per_record = commands(smollm2_tokenizer_path, tmp_path)[command]
    files = [data["repeats", n] if "repeats" in command else data[n] for n in (SMALL, 4 * SMALL)]
    run(files[0])  # whatever is loaded once (the template, regexes) is in neither figure
    small, large = (traced_peak(lambda f=f: run(f)) for f in files)

    per_distinct = (large - small) / (3 * SMALL / 2)  # half the records are repeats
    print(f"{command}: {small / 2**20:.2f}, {large / 2**20:.2f} MiB; {per_distinct:.0f} B/distinct")
    if index_bytes_per_record:
        assert per_distinct <= index_bytes_per_record + 64  # 64: noise, measured
    else:
        assert large <= 1.3 * small
