"""Behaviour of data/loading.py: records in every supported format and file type become validated
Conversations, and every bad record is reported with its file, line (or row) and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftforge.data.formats import FORMATS
from sftforge.data.loading import (
    LoadResult,
    Rejects,
    conversation_from_record,
    detect_format,
    load_conversations,
)
from sftforge.data.messages import DataError, Message, Source

DATA = Path(__file__).parent / "data"
BAD_RECORDS = Path(__file__).parent / "bad_inputs" / "records"  # see test_bad_inputs.py
GOOD = DATA / "good"


def chat(*pairs: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in pairs)


def messages(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


# -- every format from every file type ------------------------------------------------------

# Per format: records as a dataset would hold them, and the messages (or text) they become.
RECORDS = {
    "alpaca": [
        {"instruction": "Add 2 and 2.", "input": "", "output": "4", "system": None},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be terse."},
    ],
    "messages": [
        {"messages": messages(("user", "Hi"), ("assistant", "Hello"))},
        {"messages": messages(("system", "S"), ("user", "A"), ("assistant", "B"))},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "user", "value": "A"}, {"from": "assistant", "value": "B"}]},
    ],
    "prompt_completion": [
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"prompt": "2+2=", "completion": "4"},
    ],
    "text": [{"text": "First document."}, {"text": "Second document."}],
}
EXPECTED = {
    "alpaca": [
        chat(("user", "Add 2 and 2."), ("assistant", "4")),
        chat(("system", "Be terse."), ("user", "Translate.\n\nBonjour"), ("assistant", "Hello")),
    ],
    "messages": [
        chat(("user", "Hi"), ("assistant", "Hello")),
        chat(("system", "S"), ("user", "A"), ("assistant", "B")),
    ],
    "sharegpt": [
        chat(("user", "Hi"), ("assistant", "Hello")),
        chat(("user", "A"), ("assistant", "B")),
    ],
    "prompt_completion": [
        chat(("user", "Capital of France?"), ("assistant", "Paris")),
        chat(("user", "2+2="), ("assistant", "4")),
    ],
    "text": ["First document.", "Second document."],
}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json_array(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def write_csv(path: Path, records: list) -> Path:
    """Lists (messages) become JSON strings, as in CSV exports; nulls become empty cells."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            cells = {k: json.dumps(v) if isinstance(v, list) else v for k, v in record.items()}
            writer.writerow(cells)
    return path


def load_via(file_type: str, tmp_path: Path, records: list, **kwargs) -> LoadResult:
    if file_type == "dataset":
        return load_conversations(datasets.Dataset.from_list(records), **kwargs)
    writers = {
        "jsonl": write_jsonl,
        "json": write_json_array,
        "parquet": write_parquet,
        "csv": write_csv,
    }
    path = writers[file_type](tmp_path / f"data.{file_type}", records)
    return load_conversations(path, **kwargs)


FILE_TYPES = ("jsonl", "json", "parquet", "csv", "dataset")
EXPECTED_SOURCES = {
    "jsonl": [Source("data.jsonl", line=1), Source("data.jsonl", line=2)],
    "json": [Source("data.json", row=0), Source("data.json", row=1)],
    "parquet": [Source("data.parquet", row=0), Source("data.parquet", row=1)],
    "csv": [Source("data.csv", line=2), Source("data.csv", line=3)],  # header is line 1
    "dataset": [Source("dataset", row=0), Source("dataset", row=1)],
}


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("format", list(RECORDS))
def test_each_format_loads_from_each_file_type(tmp_path, format, file_type):
    result = load_via(file_type, tmp_path, RECORDS[format])

    if format == "text":
        assert [c.text for c in result.conversations] == EXPECTED[format]
        assert all(c.messages == () and c.is_raw_text for c in result.conversations)
    else:
        assert [c.messages for c in result.conversations] == EXPECTED[format]
    assert result.formats == {format: 1}
    sources = [c.source for c in result.conversations]
    assert [(s.line, s.row) for s in sources] == [
        (s.line, s.row) for s in EXPECTED_SOURCES[file_type]
    ]
    assert all(s.path.endswith(EXPECTED_SOURCES[file_type][0].path) for s in sources)


def test_prompt_completion_accepts_message_lists(tmp_path):
    record = {
        "prompt": messages(("system", "S"), ("user", "Q")),
        "completion": messages(("assistant", "A")),
    }
    result = load_conversations(write_jsonl(tmp_path / "pc.jsonl", [record]))

    assert result.conversations[0].messages == chat(
        ("system", "S"), ("user", "Q"), ("assistant", "A")
    )


def test_prompt_completion_error_names_the_completion_list_entry(tmp_path):
    record = {
        "prompt": messages(("user", "Q")),
        "completion": messages(("assistant", "A"), ("assistant", " ")),
    }
    path = write_jsonl(tmp_path / "pc.jsonl", [record])

    with pytest.raises(
        DataError, match=r"pc\.jsonl:1: field 'completion\[1\]\.content': empty assistant turn"
    ):
        load_conversations(path)


@pytest.mark.parametrize(
    ("record", "user_content"),
    [
        ({"instruction": "Do it.", "output": "Done"}, "Do it."),
        ({"instruction": "Do it.", "input": "", "output": "Done"}, "Do it."),
        ({"instruction": "Do it.", "input": "   ", "output": "Done"}, "Do it."),
        ({"instruction": "Do it.", "input": "now", "output": "Done"}, "Do it.\n\nnow"),
        ({"instruction": "", "input": "now", "output": "Done"}, "now"),
        ({"instruction": "", "output": "Done"}, ""),  # empty user content is allowed
    ],
)
def test_alpaca_user_turn_is_instruction_then_blank_line_then_input(record, user_content):
    conversation = conversation_from_record(record, Source("x.jsonl", line=1), "alpaca")

    assert conversation.messages == chat(("user", user_content), ("assistant", "Done"))


def test_alpaca_empty_system_is_left_out():
    record = {"instruction": "Q", "output": "A", "system": ""}
    conversation = conversation_from_record(record, Source("x.jsonl", line=1), "alpaca")

    assert [m.role for m in conversation.messages] == ["user", "assistant"]


def test_conversation_records_its_format_in_meta():
    conversation = conversation_from_record({"text": "t"}, Source("x.jsonl", line=1), "auto")

    assert conversation.meta == {"format": "text"}


# -- format detection and explicit formats --------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "format"),
    [
        (["messages"], "messages"),
        (["messages", "text"], "messages"),  # chat sets often carry a rendered `text` too
        (["conversations"], "sharegpt"),
        (["prompt", "completion"], "prompt_completion"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "input", "output", "text"], "alpaca"),  # tatsu-lab/alpaca has `text`
        (["text"], "text"),
        (["prompt", "text"], "text"),  # a prompt alone is not prompt/completion
    ],
)
def test_detect_format_from_keys(keys, format):
    assert detect_format(dict.fromkeys(keys, "x")) == format


def test_detect_format_failure_names_keys_and_known_formats():
    with pytest.raises(DataError) as error:
        detect_format({"question": "q", "answer": "a"})

    message = str(error.value)
    assert "(question, answer)" in message
    for format in FORMATS:
        assert format in message


def test_detect_format_applies_columns():
    assert detect_format({"q": "x", "a": "y"}, {"prompt": "q", "completion": "a"}) == (
        "prompt_completion"
    )


def test_explicit_format_overrides_detection(tmp_path):
    record = {"messages": messages(("user", "Hi"), ("assistant", "Yo")), "text": "<s>Hi Yo</s>"}
    path = write_jsonl(tmp_path / "both.jsonl", [record])

    assert load_conversations(path).conversations[0].messages == chat(
        ("user", "Hi"), ("assistant", "Yo")
    )
    as_text = load_conversations(path, format="text")
    assert as_text.conversations[0].text == "<s>Hi Yo</s>"
    assert as_text.formats == {"text": 1}


def test_explicit_format_that_does_not_fit_reports_the_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": []}])

    with pytest.raises(
        DataError, match=r"chat\.jsonl:1: field 'instruction': missing; found keys \(messages\)"
    ):
        load_conversations(path, format="alpaca")


def test_first_valid_record_decides_the_format_of_its_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"broken\n{"text": "a document"}\n{"instruction": "Q", "output": "A"}\n')

    result = load_conversations(path, on_invalid="skip")

    assert result.formats == {"text": 1}
    assert [c.text for c in result.conversations] == ["a document"]
    # The alpaca line is not re-detected: it fails as a text record with no `text` field.
    assert [r.source for r in result.rejects] == [f"{path}:1", f"{path}:3"]
    assert "field 'text': missing" in list(result.rejects)[1].reason


def test_each_file_is_detected_on_its_own(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS["alpaca"])
    write_jsonl(tmp_path / "b.jsonl", RECORDS["sharegpt"])
    write_jsonl(tmp_path / "c.jsonl", RECORDS["sharegpt"])

    assert load_conversations(tmp_path).formats == {"alpaca": 1, "sharegpt": 2}


# -- columns mapping --------------------------------------------------------------------------

DOLLY = [
    {
        "instruction": "When did Virgin Australia start operating?",
        "context": "Virgin Australia commenced services on 31 August 2000.",
        "response": "On 31 August 2000.",
        "category": "closed_qa",
    },
    {
        "instruction": "Name a primary colour.",
        "context": "",
        "response": "Red.",
        "category": "open_qa",
    },
]
DOLLY_COLUMNS = {"instruction": "instruction", "input": "context", "output": "response"}


def test_columns_mapping_loads_dolly(tmp_path):
    result = load_conversations(write_jsonl(tmp_path / "dolly.jsonl", DOLLY), columns=DOLLY_COLUMNS)

    assert result.formats == {"alpaca": 1}
    assert result.conversations[0].messages == chat(
        (
            "user",
            "When did Virgin Australia start operating?\n\nVirgin Australia commenced services on 31 August 2000.",
        ),
        ("assistant", "On 31 August 2000."),
    )
    assert result.conversations[1].messages == chat(
        ("user", "Name a primary colour."), ("assistant", "Red.")
    )


def test_dolly_without_columns_is_read_as_dolly_into_the_same_conversations(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)

    direct = load_conversations(path)

    assert direct.formats == {"dolly": 1}
    mapped = load_conversations(path, columns=DOLLY_COLUMNS)
    assert [c.messages for c in direct.conversations] == [c.messages for c in mapped.conversations]


def test_columns_missing_mapped_column_names_the_dataset_column(tmp_path):
    records = [DOLLY[0], {"instruction": "Q", "context": "", "answer": "A"}]
    path = write_jsonl(tmp_path / "dolly.jsonl", records)

    with pytest.raises(
        DataError, match=r"dolly\.jsonl:2: field 'response': missing \(mapped to 'output'"
    ):
        load_conversations(path, columns=DOLLY_COLUMNS)


def test_columns_type_error_names_the_dataset_column(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", [{**DOLLY[0], "response": 7}])

    with pytest.raises(
        DataError, match=r"dolly\.jsonl:1: field 'response': expected a string, found number \(7\)"
    ):
        load_conversations(path, columns=DOLLY_COLUMNS)


def test_columns_error_inside_a_renamed_message_list_names_the_dataset_column(tmp_path):
    record = {"dialog": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [record])

    with pytest.raises(
        DataError, match=r"d\.jsonl:1: field 'dialog\[1\]\.role': unknown role 'bot'"
    ):
        load_conversations(path, columns={"messages": "dialog"})


def test_columns_given_the_wrong_way_round_is_a_value_error(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)

    with pytest.raises(ValueError, match="'answer' is not one of our fields"):
        load_conversations(path, columns={"answer": "output"})


# -- files, folders and datasets ----------------------------------------------------------------


def test_folder_is_read_recursively_in_path_order_ignoring_other_files(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    (tmp_path / "sub").mkdir()
    write_json_array(tmp_path / "sub" / "c.json", [{"text": "c"}])
    (tmp_path / "README.md").write_text("not data")

    result = load_conversations(tmp_path)

    assert [c.text for c in result.conversations] == ["a", "b", "c"]
    assert result.files == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
        str(tmp_path / "sub" / "c.json"),
    ]


def test_list_of_paths_is_read_in_the_given_order(tmp_path):
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])

    assert [c.text for c in load_conversations([b, str(a)]).conversations] == ["b", "a"]


def test_good_corpus_folder_loads_every_file_without_rejects():
    result = load_conversations(GOOD, on_invalid="skip")

    assert len(result.rejects) == 0
    assert result.formats == {"alpaca": 1, "messages": 1, "sharegpt": 1, "text": 1}
    assert len(result.files) == 4
    assert len(result.conversations) == 7


def test_json_file_may_hold_json_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')

    result = load_conversations(path)

    assert [c.text for c in result.conversations] == ["one", "two"]
    assert [c.source.line for c in result.conversations] == [1, 3]


def test_json_file_holding_one_object_is_one_record(tmp_path):
    path = tmp_path / "one.json"
    path.write_text('{\n  "text": "only"\n}\n')

    assert [c.text for c in load_conversations(path).conversations] == ["only"]


def test_malformed_json_array_is_a_file_error_even_when_skipping(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')

    with pytest.raises(DataError, match=r"broken\.json:4: malformed JSON array"):
        load_conversations(path, on_invalid="skip")


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"text": "a"}\n   \n{"text": "b"}\n')

    result = load_conversations(path)

    assert [c.source for c in result.conversations] == [
        Source(str(path), line=2),
        Source(str(path), line=4),
    ]


def test_csv_line_numbers_count_cells_that_span_lines(tmp_path):
    path = tmp_path / "multi.csv"
    path.write_text('text\n"first\nsecond\nthird"\n"next"\n')

    result = load_conversations(path)

    assert [c.text for c in result.conversations] == ["first\nsecond\nthird", "next"]
    assert [c.source.line for c in result.conversations] == [2, 5]


def test_invalid_utf8_line_is_rejected_by_line_number(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')

    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_conversations(path)


def test_dataset_source_uses_its_name(tmp_path):
    dataset = datasets.Dataset.from_list(
        RECORDS["text"], info=datasets.DatasetInfo(dataset_name="my_corpus")
    )

    result = load_conversations(dataset)

    assert [c.source for c in result.conversations] == [
        Source("my_corpus", row=0),
        Source("my_corpus", row=1),
    ]
    assert result.files == ["my_corpus"]


def test_dataset_dict_asks_for_one_split():
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS["text"])})

    with pytest.raises(ValueError, match=r"pass one split, e\.g\. ds\['train'\]"):
        load_conversations(splits)


def test_dataset_errors_name_the_row():
    dataset = datasets.Dataset.from_list(
        [
            {"messages": messages(("user", "Hi"), ("assistant", "Yo"))},
            {"messages": messages(("user", "Hi"), ("assistant", "Yo"), ("user", "?"))},
        ]
    )

    with pytest.raises(
        DataError,
        match=r"dataset\[row 1\]: field 'messages\[2\]\.role': conversation ends on a user turn",
    ):
        load_conversations(dataset)


def test_parquet_errors_name_the_row(tmp_path):
    records = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": None}]
    path = write_parquet(tmp_path / "d.parquet", records)

    with pytest.raises(
        DataError, match=r"d\.parquet\[row 1\]: field 'output': expected a string, found null"
    ):
        load_conversations(path)


def test_missing_path_is_file_not_found_listing_supported_types(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"nope\.jsonl: no such file.*\.csv, \.json, \.jsonl, \.parquet"
    ):
        load_conversations(tmp_path / "nope.jsonl")


def test_unknown_extension_is_a_data_error_listing_supported_types(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")

    with pytest.raises(
        DataError, match=r"data\.txt:.*unsupported file type '\.txt'; supported: \.csv"
    ):
        load_conversations(path)


def test_folder_without_data_files_is_an_error(tmp_path):
    (tmp_path / "notes.md").write_text("no data here")

    with pytest.raises(DataError, match="folder holds no .csv, .json, .jsonl, .parquet files"):
        load_conversations(tmp_path)


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("format", "chatml", "auto, alpaca, dolly, flan, messages"),
        ("on_invalid", "ignore", "error, skip"),
    ],
)
def test_invalid_option_value_is_a_value_error_naming_the_allowed_ones(
    tmp_path, option, value, allowed
):
    path = write_jsonl(tmp_path / "t.jsonl", RECORDS["text"])

    with pytest.raises(ValueError, match=allowed):
        load_conversations(path, **{option: value})


def test_conversation_from_record_rejects_a_non_object():
    with pytest.raises(
        DataError, match=r"x\.json\[row 3\]: expected a JSON object \(a record\), found list"
    ):
        conversation_from_record(["user", "hi"], Source("x.json", row=3), "auto")


def test_summary_reports_counts_and_where_rejects_went(tmp_path):
    rejects_path = tmp_path / "rejects.jsonl"

    result = load_conversations(
        BAD_RECORDS / "unknown_role.jsonl", on_invalid="skip", rejects_path=rejects_path
    )
    summary = result.summary()

    assert "files read:   1" in summary
    assert "records read: 3" in summary
    assert "valid:        2" in summary
    assert f"rejected:     1 -> written to {rejects_path}" in summary
    assert "unknown role 'bot'" in summary
    assert "duplicates:   1" in summary
    assert "formats:      messages: 1" in summary


def test_rejects_file_is_written_even_when_nothing_was_rejected(tmp_path):
    rejects_path = tmp_path / "rejects.jsonl"
    rejects_path.write_text('{"stale": "from an earlier run"}\n')

    load_conversations(GOOD, on_invalid="skip", rejects_path=rejects_path)

    assert rejects_path.read_text() == ""


def test_error_mode_raises_the_first_problem(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": ""}, {"text": 5}])

    with pytest.raises(DataError, match=r"two\.jsonl:1: field 'text': empty text"):
        load_conversations(path)


def test_rejects_collects_and_writes_records():
    rejects = Rejects()
    rejects.add(Source("a.jsonl", line=3), "bad", {"x": 1})
    rejects.add("b.csv:2", "worse", "raw line")

    assert len(rejects) == 2
    assert [(r.source, r.reason, r.record) for r in rejects] == [
        ("a.jsonl:3", "bad", {"x": 1}),
        ("b.csv:2", "worse", "raw line"),
    ]


# -- duplicates ------------------------------------------------------------------------------


def test_exact_duplicates_are_kept_and_counted(tmp_path):
    records = [
        {"messages": messages(("user", "Hi"), ("assistant", "Hello"))},
        {"messages": messages(("user", "Hi"), ("assistant", "Hello"))},
        {"messages": messages(("user", "Hi"), ("assistant", "Hello!"))},  # differs: not a duplicate
        {"messages": messages(("user", "Hi"), ("assistant", "Hello"))},
    ]
    path = write_jsonl(tmp_path / "dups.jsonl", records)

    result = load_conversations(path)

    assert len(result.conversations) == 4
    assert result.duplicates == 2
    assert "duplicates:   2" in result.summary()


def test_duplicates_are_counted_across_files_and_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    write_jsonl(
        tmp_path / "b.jsonl", [{"messages": messages(("user", "Hi"), ("assistant", "Hello"))}]
    )
    write_jsonl(tmp_path / "c.jsonl", [{"text": "Hi"}, {"text": "Hi"}])

    assert load_conversations(tmp_path).duplicates == 2
