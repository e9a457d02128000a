"""The bad-input corpus: every kind of bad input a user can hand sftforge, and the exact error
each must give, naming its file:line, file[row N] or config key.

The inputs live in tests/bad_inputs/ (see its README.md); those that cannot be committed (a
50 MB line, Parquet files, empty folders) are built into tmp_path by GENERATORS. CASES is the
one table of expectations. A case whose input must be accepted (a BOM, CRLF line endings, a
template that allows two assistant turns in a row) is a case too, with nothing rejected.
"""

from __future__ import annotations

import json
import shutil
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftforge.cli.main import main
from sftforge.config.loading import ConfigError, load_config
from sftforge.data.loading import Rejects, load_conversations
from sftforge.data.messages import DataError
from sftforge.data.readers import MAX_RECORD_BYTES
from sftforge.encode.encoder import Encoder
from sftforge.encode.parallel import encode_all
from sftforge.encode.templates import resolve_template

BAD_INPUTS = Path(__file__).parent / "bad_inputs"


@dataclass(frozen=True)
class Case:
    input: str  # a path under tests/bad_inputs/, or a generated/... path built by GENERATORS
    where: str  # data: what follows the path ("" the file, ":2" line 2, "[row 1]" row 1);
    # config: the key (or YAML line) the message must name
    message: str  # how the message goes on after "<path><where>: " (config: after "<path>: ")
    valid: int | None = None  # records kept with on_invalid="skip"; None: the load aborts
    rejected: int | None = None  # records rejected with on_invalid="skip"
    template: str | None = None  # encode with this template: a built-in name or a bad_inputs
    # path, which the message names as {template}


CASES: dict[str, Case] = {
    # -- JSON lines: one bad record among good ones; the good ones still load with skip
    "malformed JSON line": Case(
        "records/malformed_json.jsonl", ":2", "malformed JSON: Expecting ',' delimiter", 2, 1
    ),
    "truncated file (last line cut mid-JSON)": Case(
        "records/truncated.jsonl",
        ":3",
        "malformed JSON: Unterminated string starting at (column 59); the file ends mid-line",
        2,
        1,
    ),
    "invalid UTF-8 on one line": Case(
        "records/invalid_utf8.jsonl",
        ":2",
        "not valid UTF-8: invalid continuation byte at byte 67; save the file as UTF-8",
        2,
        1,
    ),
    "BOM at the start (accepted)": Case("records/bom.jsonl", "", "", 2, 0),
    "CRLF line endings (accepted)": Case("records/crlf.jsonl", "", "", 2, 0),
    "line is a list, not an object": Case(
        "records/not_an_object.jsonl", ":2", "expected a JSON object (a record), found list", 2, 1
    ),
    "duplicate key": Case(
        "records/duplicate_key.jsonl",
        ":2",
        "duplicate key 'instruction' in a JSON object; JSON readers silently keep only the last",
        2,
        1,
    ),
    "duplicate key inside a message": Case(
        "records/duplicate_nested_key.jsonl", ":2", "duplicate key 'content' in a JSON object", 2, 1
    ),
    "duplicate key in a JSON array row": Case(
        "records/duplicate_key.json", "[row 1]", "duplicate key 'output' in a JSON object", 2, 1
    ),
    "missing field": Case(
        "records/missing_field.jsonl",
        ":2",
        "field 'output': missing; found keys (instruction, input)",
        2,
        1,
    ),
    "null field": Case(
        "records/output_is_null.jsonl", ":2", "field 'output': expected a string, found null", 2, 1
    ),
    "null message content": Case(
        "records/content_is_null.jsonl",
        ":2",
        "field 'messages[1].content': expected a string, found null",
        2,
        1,
    ),
    "null messages": Case(
        "records/messages_is_null.jsonl",
        ":2",
        "field 'messages': expected a list of messages, found null",
        2,
        1,
    ),
    "number where a string belongs": Case(
        "records/output_is_number.jsonl",
        ":3",
        "field 'output': expected a string, found number (1)",
        2,
        1,
    ),
    "nested: message content is an object": Case(
        "records/content_is_object.jsonl",
        ":2",
        "field 'messages[1].content': expected a string, found object",
        2,
        1,
    ),
    "nested: message content is a list holding an image part": Case(
        "records/content_is_list.jsonl",
        ":2",
        "field 'messages[0].content[0]': only text parts are supported, found a part with "
        "type 'image_url'",
        2,
        1,
    ),
    "nested: ShareGPT value is a number": Case(
        "records/sharegpt_value_is_number.jsonl",
        ":2",
        "field 'conversations[1].value': expected a string, found number (4)",
        2,
        1,
    ),
    "nested: role is a number": Case(
        "records/role_is_number.jsonl",
        ":2",
        "field 'messages[0].role': expected a string, found number (1)",
        2,
        1,
    ),
    "nested: message is a string": Case(
        "records/message_not_an_object.jsonl",
        ":2",
        "field 'messages[1]': expected an object with 'role' and 'content', found string",
        2,
        1,
    ),
    "messages is an object, not a list": Case(
        "records/messages_not_a_list.jsonl",
        ":2",
        "field 'messages': expected a list of messages, found object",
        2,
        1,
    ),
    "completion is an object": Case(
        "records/completion_is_object.jsonl",
        ":2",
        "field 'completion': expected a string or a list of messages, found object",
        2,
        1,
    ),
    "missing assistant turn": Case(
        "records/no_assistant.jsonl", ":2", "field 'messages': no assistant turn", 2, 1
    ),
    "empty assistant turn": Case(
        "records/empty_assistant.jsonl",
        ":2",
        "field 'messages[1].content': empty assistant turn",
        2,
        1,
    ),
    "empty conversation": Case(
        "records/empty_conversation.jsonl", ":2", "field 'messages': empty conversation", 2, 1
    ),
    "empty text": Case("records/empty_text.jsonl", ":2", "field 'text': empty text", 2, 1),
    "unknown role": Case(
        "records/unknown_role.jsonl",
        ":2",
        "field 'messages[2].role': unknown role 'bot'; expected one of system, user, assistant",
        2,
        1,
    ),
    "unknown ShareGPT role": Case(
        "records/unknown_sharegpt_role.jsonl",
        ":2",
        "field 'conversations[1].from': unknown role 'robot'; expected one of system, human, gpt",
        1,
        1,
    ),
    "system message not first": Case(
        "records/system_not_first.jsonl",
        ":2",
        "field 'messages[1].role': system message at position 1",
        2,
        1,
    ),
    "two system messages": Case(
        "records/two_system_messages.jsonl",
        ":2",
        "field 'messages[1].role': a second system message",
        2,
        1,
    ),
    "first turn after the system message is the assistant's": Case(
        "records/first_not_user.jsonl",
        ":2",
        "field 'messages[1].role': the first non-system message must be from the user, "
        "found 'assistant'",
        2,
        1,
    ),
    "conversation ends on a user turn": Case(
        "records/trailing_user.jsonl",
        ":2",
        "field 'messages[2].role': conversation ends on a user turn, so nothing is learned from it",
        2,
        1,
    ),
    "unknown format (no known keys)": Case(
        "records/unknown_format.jsonl",
        ":1",
        "cannot detect the format from keys (question, answer)",
        0,
        2,
    ),
    # -- CSV
    "CSV with embedded newlines, then a bad row": Case(
        "records/csv_embedded_newlines.csv",
        ":5",
        "field 'output': empty assistant turn: nothing to learn",
        2,
        1,
    ),
    "CSV short row": Case(
        "records/short_row.csv", ":3", "CSV row has 1 cells but the header has 3", 2, 1
    ),
    "CSV cell that should hold JSON messages": Case(
        "records/messages_cell_not_json.csv",
        ":3",
        "field 'messages': expected a list of messages, found a string that is not JSON",
        2,
        1,
    ),
    "CSV with invalid UTF-8 in one row": Case(
        "records/invalid_utf8.csv",
        ":3",
        "not valid UTF-8 in column 'output'; save the file as UTF-8",
        2,
        1,
    ),
    "CSV with a BOM (accepted)": Case("records/bom.csv", "", "", 2, 0),
    "a line nested 5,000 levels deep": Case(
        "records/deeply_nested.jsonl",
        ":2",
        "nested too deeply to parse (over about a thousand levels of lists or objects)",
        2,
        1,
    ),
    # -- generated: too big to commit, or not expressible in git
    "a 50 MB line": Case(
        "generated/fifty_mb_line.jsonl",
        ":2",
        f"line is 52,428,840 bytes, over the limit of {MAX_RECORD_BYTES:,} bytes per record "
        "(sftforge.readers.MAX_RECORD_BYTES)",
        2,
        1,
    ),
    "Parquet with the wrong columns": Case(
        "generated/question_answer.parquet",
        "[row 0]",
        "cannot detect the format from keys (question, answer)",
        0,
        2,
    ),
    "Parquet with an int64 output column": Case(
        "generated/output_int64.parquet",
        "[row 0]",
        "field 'output': expected a string, found number (1)",
        0,
        2,
    ),
    # -- file-level: nothing in the file can be rejected as a record, so even skip aborts
    "empty file (0 bytes)": Case(
        "files/empty.jsonl", "", "no records: the file is empty (or holds only blank lines"
    ),
    "file of blank lines": Case("files/blank.jsonl", "", "no records: the file is empty"),
    "CSV with only a header": Case("files/header_only.csv", "", "no records: the file is empty"),
    "empty JSON array": Case("files/empty_array.json", "", "no records: the file is empty"),
    "broken JSON array": Case(
        "files/broken_array.json",
        ":4",
        "malformed JSON array: Expecting ',' delimiter (column 1); the file cannot be read",
    ),
    "JSON array with a record nested 5,000 levels deep": Case(
        "files/deeply_nested_array.json",
        "",
        "nested too deeply to parse (over about a thousand levels of lists or objects); no "
        "demonstration is shaped like that: fix or drop the record; the file cannot be read",
    ),
    "JSON array with invalid UTF-8": Case(
        "files/invalid_utf8_array.json",
        ":3",
        "not valid UTF-8: invalid continuation byte; the file cannot be read",
    ),
    "UTF-16 file": Case(
        "files/utf16.jsonl", "", "file is UTF-16 (it starts with a UTF-16 byte order mark)"
    ),
    "CSV header naming a column twice": Case(
        "files/duplicate_column.csv",
        ":1",
        "CSV header names column 'output' twice (columns 2 and 3)",
    ),
    "not a Parquet file": Case(
        "files/not_parquet.parquet", "", "cannot read Parquet file: Parquet magic bytes not found"
    ),
    "unsupported file type": Case(
        "files/data.txt", "", "unsupported file type '.txt'; supported: .csv, .json, .jsonl"
    ),
    "a directory given as a file": Case(
        "generated/folder_named_like_a_file.jsonl",
        "",
        "is a folder, not a .jsonl file, and the folder holds no .csv, .json, .jsonl, .parquet "
        "files",
    ),
    "a folder without data files": Case(
        "generated/notes_only", "", "folder holds no .csv, .json, .jsonl, .parquet files"
    ),
    # -- chat templates: records the loader accepts and some templates cannot render
    "two assistant turns in a row, template forbids it": Case(
        "template/assistant_after_assistant.jsonl",
        ":2",
        "field 'messages': chat template 'mistral-v1' refused: mistral-v1: after the optional system "
        "message, roles must alternate user/assistant/user/assistant/...",
        2,
        1,
        template="mistral",
    ),
    "two user turns in a row, template forbids it": Case(
        "template/user_after_user.jsonl",
        ":2",
        "field 'messages': chat template 'mistral-v1' refused: mistral-v1: after the optional system "
        "message, roles must alternate",
        2,
        1,
        template="mistral",
    ),
    "two assistant turns in a row, template allows it (accepted)": Case(
        "template/assistant_after_assistant.jsonl", "", "", 3, 0, template="chatml"
    ),
    "system message, template has no system role": Case(
        "template/system_prompt.jsonl",
        ":2",
        "field 'messages': chat template '{template}' refused: System role not supported",
        2,
        1,
        template="template/no_system_role.jinja",
    ),
    # -- config: the message names the key
    "unknown config key": Case(
        "config/unknown_key.yaml", "learning_rate", "unknown config key 'learning_rate'"
    ),
    "unknown nested config key": Case(
        "config/unknown_nested_key.yaml",
        "training.learning_rate",
        "unknown config key 'training.learning_rate'",
    ),
    "negative learning rate": Case(
        "config/negative_lr.yaml",
        "training.lr",
        "config key 'training.lr': Input should be greater than 0 (got -0.0001)",
    ),
    "LoRA rank 0": Case(
        "config/lora_rank_zero.yaml",
        "lora.r",
        "config key 'lora.r': Input should be greater than 0 (got 0)",
    ),
    "max_length 0": Case(
        "config/max_length_zero.yaml",
        "max_length",
        "config key 'max_length': Input should be greater than 1 (got 0)",
    ),
    "a string where a number belongs": Case(
        "config/epochs_not_a_number.yaml",
        "training.epochs",
        "config key 'training.epochs': Input should be a valid number",
    ),
    "method: dpo": Case(
        "config/method_dpo.yaml",
        "method",
        "config key 'method': 'dpo' is not allowed; expected 'full', 'lora' or 'qlora'",
    ),
    "on_invalid: ignore": Case(
        "config/on_invalid_ignore.yaml",
        "data.on_invalid",
        "config key 'data.on_invalid': 'ignore' is not allowed; expected 'error' or 'skip'",
    ),
    "a section that is not a mapping": Case(
        "config/section_not_a_mapping.yaml",
        "training",
        "config key 'training': Input should be a valid dictionary",
    ),
    "no training data": Case(
        "config/no_data.yaml",
        "data.train",
        "config key 'data.train': required",
    ),
    "a section given twice": Case(
        "config/duplicate_section.yaml",
        "line 5",
        "not valid YAML at line 5, column 1: key 'training' is given twice",
    ),
    "resume and overwrite_output_dir together": Case(
        "config/resume_and_overwrite.yaml",
        "overwrite_output_dir",
        "config key 'overwrite_output_dir': true deletes the run that resume=auto would continue",
    ),
    "pure_bf16 for full fine-tuning": Case(
        "config/pure_bf16_full.yaml",
        "training.precision",
        "config key 'training.precision': pure_bf16 is for LoRA",
    ),
    "YAML syntax error": Case(
        "config/yaml_syntax_error.yaml",
        "line 5",
        "not valid YAML at line 5, column 10: mapping values are not allowed here",
    ),
    "a list at the top instead of a mapping": Case(
        "config/top_level_list.yaml", "", "expected a mapping of config keys at the top"
    ),
}

# -- generated inputs ----------------------------------------------------------------------


def fifty_mb_line(path: Path) -> None:
    good = json.dumps({"instruction": "Say hi", "output": "Hi"})
    with open(path, "w", encoding="utf-8") as f:
        f.write(good + "\n")
        f.write('{"instruction": "Repeat", "output": "')  # a well-formed record, only too long
        chunk = "a" * 2**20
        for _ in range(50):
            f.write(chunk)
        f.write('"}\n')
        f.write(good + "\n")


def parquet(columns: dict) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(columns), path)


def folder(*files: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.mkdir()
        for name in files:
            (path / name).write_text("not data\n")

    return make


GENERATORS = {
    "generated/fifty_mb_line.jsonl": fifty_mb_line,
    "generated/question_answer.parquet": parquet(
        {"question": ["2+2?", "3+3?"], "answer": ["4", "6"]}
    ),
    "generated/output_int64.parquet": parquet(
        {"instruction": ["Count to one", "Count to two"], "output": pa.array([1, 2], pa.int64())}
    ),
    "generated/folder_named_like_a_file.jsonl": folder(),
    "generated/notes_only": folder("notes.md"),
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """Every generated input, built once for the module (the tests only read them)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, make in GENERATORS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make(root / name)
    return root


def input_path(case: Case, generated: Path) -> Path:
    """The case's input: the committed file, or the one built under `generated`."""
    return generated / case.input if case.input in GENERATORS else BAD_INPUTS / case.input


# The folders (the first part of Case.input) that hold each kind of case.
KINDS = {"data": ("records", "files", "generated"), "template": ("template",)}
KINDS["config"] = ("config",)


def names(kind: str) -> list[str]:
    return [name for name, case in CASES.items() if case.input.split("/")[0] in KINDS[kind]]


def accepted(case: Case) -> bool:
    return case.rejected == 0


def test_the_corpus_has_at_least_30_cases_and_every_input_has_one():
    assert len(CASES) >= 30
    inputs = {case.input for case in CASES.values()}
    inputs |= {case.template for case in CASES.values() if case.template and "/" in case.template}
    committed = {
        str(path.relative_to(BAD_INPUTS))
        for path in BAD_INPUTS.rglob("*")
        if path.is_file() and path.name not in ("README.md", ".gitattributes")
    }
    assert committed == inputs - set(GENERATORS)


def test_every_generated_input_has_a_case():
    assert set(GENERATORS) <= {case.input for case in CASES.values()}


# -- data: the loader ----------------------------------------------------------------------


@pytest.mark.parametrize("name", names("data"))
def test_data_case_raises_naming_its_location_and_problem(name, generated):
    case = CASES[name]
    path = input_path(case, generated)
    if accepted(case):
        assert len(load_conversations(path).conversations) == case.valid
        return

    with pytest.raises(DataError) as error:
        load_conversations(path)

    assert str(error.value).startswith(f"{path}{case.where}: {case.message}")


@pytest.mark.parametrize("name", names("data"))
def test_data_case_with_skip_rejects_exactly_the_bad_records(name, generated):
    case = CASES[name]
    path = input_path(case, generated)
    if case.valid is None:  # nothing in the file can be rejected on its own: skip aborts too
        with pytest.raises(DataError) as error:
            load_conversations(path, on_invalid="skip")
        assert str(error.value).startswith(f"{path}{case.where}: {case.message}")
        return

    result = load_conversations(path, on_invalid="skip")

    assert (len(result.conversations), len(result.rejects)) == (case.valid, case.rejected)
    if not accepted(case):
        first = next(iter(result.rejects))
        assert first.source == f"{path}{case.where}"
        assert first.reason.startswith(case.message)


def test_csv_record_spanning_lines_keeps_its_text_and_its_first_line():
    path = BAD_INPUTS / "records/csv_embedded_newlines.csv"

    result = load_conversations(path, on_invalid="skip")

    first, last = result.conversations
    assert str(first.source) == f"{path}:2"
    assert [m.content for m in first.messages] == [
        "Write a poem\nabout the sea",
        "Waves\nand more waves",
    ]
    assert str(last.source) == f"{path}:6"


def test_a_50_mb_line_is_rejected_fast_without_being_held_in_memory(generated):
    path = input_path(CASES["a 50 MB line"], generated)

    tracemalloc.start()
    started = time.perf_counter()
    result = load_conversations(path, on_invalid="skip")
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert len(result.conversations) == 2
    # Read in 1 MiB chunks, of which at most one limit's worth is kept: never the 50 MB.
    assert peak < MAX_RECORD_BYTES + 4 * 2**20, f"peak {peak:,} bytes"
    assert seconds < 10, f"{seconds:.1f} s"  # about 0.1 s; the bound only catches a hang
    reject = next(iter(result.rejects))
    assert reject.record.startswith('{"instruction": "Repeat", "output": "aaa')
    assert reject.record.endswith("...") and len(reject.record) < 300


def test_rejects_keep_the_raw_record_as_it_was_in_the_file(tmp_path):
    records = BAD_INPUTS / "records"
    rejects_path = tmp_path / "rejects.jsonl"
    files = ["malformed_json.jsonl", "duplicate_key.jsonl", "invalid_utf8.jsonl", "short_row.csv"]

    load_conversations(
        [records / name for name in files], on_invalid="skip", rejects_path=rejects_path
    )

    rejects = [json.loads(line) for line in rejects_path.read_text("utf-8").splitlines()]
    raw = {Path(r["source"]).name: r["record"] for r in rejects}
    lines = {name: (records / name).read_bytes().splitlines() for name in files}
    assert raw["malformed_json.jsonl:2"] == lines["malformed_json.jsonl"][1].decode()
    # Both values of the repeated key are kept, not just the one json would have kept.
    assert raw["duplicate_key.jsonl:2"] == lines["duplicate_key.jsonl"][1].decode()
    assert raw["invalid_utf8.jsonl:2"] == lines["invalid_utf8.jsonl"][1].decode(errors="replace")
    assert raw["short_row.csv:3"] == ["Say bye"]


# -- chat templates: rejected when encoded, by the record's source ---------------------------


def template_choice(case: Case) -> str:
    return case.template if "/" not in case.template else str(BAD_INPUTS / case.template)


def encoder_for(case: Case, tokenizer) -> Encoder:
    return Encoder(tokenizer, resolve_template(template_choice(case), tokenizer))


@pytest.mark.parametrize("name", names("template"))
def test_template_case_rejects_the_record_it_cannot_render(name, smollm2_tokenizer):
    case = CASES[name]
    path = BAD_INPUTS / case.input
    conversations = load_conversations(path).conversations  # the loader accepts them all
    encoder = encoder_for(case, smollm2_tokenizer)
    rejects = Rejects()

    examples = encode_all(conversations, encoder, "skip", rejects)

    assert (len(examples), len(rejects)) == (case.valid, case.rejected)
    if not accepted(case):
        first = next(iter(rejects))
        assert first.source == f"{path}{case.where}"
        with pytest.raises(DataError) as error:
            encode_all(conversations, encoder, "error", Rejects())
        message = case.message.replace("{template}", template_choice(case))
        assert str(error.value).startswith(f"{path}{case.where}: {message}")


def test_a_template_that_allows_two_assistant_turns_trains_on_both(smollm2_tokenizer):
    path = BAD_INPUTS / "template/assistant_after_assistant.jsonl"
    conversation = load_conversations(path).conversations[1]
    encoder = encoder_for(
        CASES["two assistant turns in a row, template allows it (accepted)"], smollm2_tokenizer
    )

    example = encoder.encode(conversation)

    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label >= 0]
    assert smollm2_tokenizer.decode(trained) == "Hello<|im_end|>Anyone there?<|im_end|>"


# -- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", names("config"))
def test_config_case_raises_naming_the_key(name):
    case = CASES[name]
    path = BAD_INPUTS / case.input

    with pytest.raises(ConfigError) as error:
        load_config(path)

    message = str(error.value)
    assert message.startswith(f"{path}: {case.message}")
    assert case.where in message


@pytest.mark.parametrize(
    "name", ["unknown nested config key", "negative learning rate", "YAML syntax error"]
)
def test_cli_reports_a_bad_config_without_a_traceback(name, capsys):
    case = CASES[name]

    code = main(["train", str(BAD_INPUTS / case.input)])

    err = capsys.readouterr().err
    assert code != 0
    assert case.where in err and case.message in err
    assert "Traceback" not in err


# -- the whole corpus with on_invalid: skip ----------------------------------------------------


def test_skip_over_the_whole_corpus_rejects_every_bad_record_and_trains_on_the_rest(
    tmp_path, tiny_model_dir, generated
):
    """Every record-level case at once: one reject line per bad record, the rest train.

    The file-level cases (files/, the folders) are left out: a file holding no record to
    reject aborts the load even with skip, which is their expected behaviour (tested above).
    """
    from sftforge.training.loop import train

    corpus = tmp_path / "corpus"
    shutil.copytree(BAD_INPUTS / "records", corpus / "records")
    cases = [CASES[n] for n in names("data") if CASES[n].valid is not None]
    for case in cases:
        if case.input in GENERATORS:
            (corpus / case.input).parent.mkdir(parents=True, exist_ok=True)
            (corpus / case.input).symlink_to(input_path(case, generated))
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            "training.max_steps=1",
            "training.batch_size=4",
            "training.device=cpu",
            "training.save_every=null",
            "eval.forgetting=false",
            "max_length=128",
        ],
        model=tiny_model_dir,
        data={"train": str(corpus), "on_invalid": "skip"},
        output_dir=str(out),
    )

    train(config)

    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(case.rejected for case in cases)
    assert all(r.keys() == {"source", "reason", "record"} and r["record"] for r in rejects)
    by_source = {r["source"]: r["reason"] for r in rejects}
    for case in cases:
        if not accepted(case):
            assert by_source[f"{corpus / case.input}{case.where}"].startswith(case.message)
    report = json.loads((out / "data_report.json").read_text())
    assert report["examples"] == sum(case.valid for case in cases)
