"""Tool calls, tool results, tools and reasoning through the data commands: each field's
format reads into the expected messages; `data convert` writes what reads back the same, or
refuses the record saying why; `dedup` and `filter` write records as the input had them and
tell records apart by their calls; `data stats` counts them; bad input is a DataError naming
file:line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sftforge
from sftforge.curate.dedup import DuplicateFinder, find_duplicates
from sftforge.curate.filters import FilterRules, filter_conversations, write_filter
from sftforge.curate.stats import collect_stats, format_stats
from sftforge.data.loading import load_conversations
from sftforge.data.messages import Conversation, DataError, Message, Source, ToolCall
from sftforge.data.writers import (
    WRITERS,
    conversation_as_json,
    conversation_from_json,
    to_record,
    write_conversations,
    write_records,
)
from sftforge.models.tokenizer import text_side

DATA = Path(__file__).parent / "data" / "tools"
OPENAI, SHAREGPT, HERMES = DATA / "openai.jsonl", DATA / "sharegpt.jsonl", DATA / "hermes.jsonl"
XLAM, REASONING, BAD = DATA / "xlam.jsonl", DATA / "reasoning.jsonl", DATA / "bad.jsonl"
FIXTURES = [OPENAI, SHAREGPT, HERMES, XLAM, REASONING]


def load(*paths: Path, **options) -> list[Conversation]:
    return load_conversations(list(paths), **options).conversations


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def user(text: str) -> Message:
    return Message("user", text)


def answer(text: str, **fields) -> Message:
    return Message("assistant", text, **fields)


def calls(*calls: ToolCall) -> Message:
    return Message("assistant", "", tool_calls=calls)


def tool_names(conversation: Conversation) -> list[str]:
    return [tool["function"]["name"] for tool in conversation.tools]


# -- each fixture reads into the expected messages ------------------------------------------


def test_openai_records_read_calls_results_weights_reasoning_tools_and_ids():
    weather, arithmetic, parallel, text_and_call = load(OPENAI)
    assert weather.messages == (
        Message("system", "You can look up the weather."),
        user("What is the weather in Paris?"),
        calls(ToolCall("get_weather", {"city": "Paris", "unit": "celsius"}, "call_1")),
        Message("tool", '{"temperature": 18, "sky": "clear"}', tool_call_id="call_1"),
        answer("It is 18 °C and clear in Paris."),
    )
    assert weather.meta["id"] == "weather-1" and tool_names(weather) == ["get_weather"]
    assert weather.tools[0]["function"]["parameters"]["required"] == ["city"]
    assert arithmetic.messages == (
        user("What is 2+2?"),
        answer("4", trained=False, reasoning="Two and two make four."),
        user("And 3+3?"),
        answer("6", reasoning="Three and three make six."),
    )
    assert arithmetic.template_options == {"enable_thinking": True}
    assert arithmetic.meta["id"] == 2 and arithmetic.tools == ()
    assert parallel.messages[1] == calls(
        ToolCall("get_weather", {"city": "Oslo"}, "call_a"),
        ToolCall("get_time", {"city": "Oslo"}, "call_b"),
    )
    assert parallel.messages[2:4] == (
        Message("tool", '{"temperature": 4}', tool_call_id="call_a", name="get_weather"),
        Message("tool", "09:30", tool_call_id="call_b", name="get_time"),
    )
    assert tool_names(parallel) == ["get_weather", "get_time"]
    assert text_and_call.messages[1] == answer(
        "Let me check.", tool_calls=(ToolCall("get_weather", {"city": "Rome"}, "call_r"),)
    )


def test_sharegpt_function_call_and_observation_turns_read_as_calls_and_results():
    single, parallel = load(SHAREGPT)
    assert single.messages == (
        Message("system", "You can look up the weather."),  # the `system` column
        user("What is the weather in Paris?"),
        calls(ToolCall("get_weather", {"city": "Paris"})),
        Message("tool", '{"temperature": 18}'),
        answer("It is 18 °C in Paris."),
    )
    assert single.tools == (
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["city"],
                },
            },
        },
    )
    assert parallel.messages[1] == calls(
        ToolCall("get_weather", {"city": "Oslo"}), ToolCall("get_time", {"city": "Oslo"})
    )
    assert tool_names(parallel) == ["get_weather", "get_time"]


def test_hermes_sharegpt_reads_tool_call_blocks_and_unwraps_tool_responses():
    (conversation,) = load(HERMES)
    system, *rest = conversation.messages
    assert system.role == "system" and "<tools>" in system.content  # tools in the prompt, as is
    assert conversation.tools == ()
    assert rest == [
        user("What is the weather in Paris?"),
        calls(ToolCall("get_weather", {"city": "Paris"})),
        Message("tool", '{"name": "get_weather", "content": {"temperature": 18}}'),
        answer("It is 18 °C in Paris."),
    ]


def test_xlam_reads_query_tools_and_answers_from_json_strings():
    (conversation,) = load(XLAM)
    assert conversation.messages == (
        user("What is the weather in Paris and in Oslo?"),
        calls(
            ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Oslo"})
        ),
    )
    assert conversation.tools[0]["function"]["parameters"]["city"]["type"] == "str"
    assert conversation.meta == {"format": "xlam", "id": 7}


def test_a_think_block_opening_the_content_is_the_reasoning_and_an_empty_one_is_kept():
    thinking, quiet = load(REASONING)
    assert thinking.messages[1] == answer("51", reasoning="17*3 = 51.")
    assert quiet.messages[1] == answer("Hi!", reasoning="")  # thought nothing, not None
    assert quiet.template_options == {"enable_thinking": False}


# -- data convert: what is written reads back the same, or is refused with its reason --------


def same(a: Conversation, b: Conversation) -> bool:
    return (a.messages, a.text, a.tools, a.template_options, a.meta.get("id")) == (
        b.messages,
        b.text,
        b.tools,
        b.template_options,
        b.meta.get("id"),
    )


@pytest.mark.parametrize("format", [f for f in WRITERS if f != "text"])
@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_every_conversion_reads_back_whole_or_refuses_the_record(tmp_path, path, format):
    before = load(path)
    written = write_records(before, format, tmp_path / "out.jsonl")
    refused = {source for source, _ in written.refused}
    kept = [c for c in before if str(c.source) not in refused]
    assert written.count == len(kept) and written.count + len(refused) == len(before)
    after = load(tmp_path / "out.jsonl") if kept else []
    assert len(after) == len(kept)
    assert all(same(a, b) for a, b in zip(kept, after, strict=True))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_the_messages_format_holds_every_fixture_whole(tmp_path, path):
    before = load(path)
    written = write_records(before, "messages", tmp_path / "out.jsonl")
    assert written.refused == []
    assert all(same(a, b) for a, b in zip(before, load(tmp_path / "out.jsonl"), strict=True))


def test_sharegpt_is_written_the_llama_factory_way(tmp_path):
    weather = load(OPENAI)[0]
    (record,) = [to_record(weather, "sharegpt")]
    assert [turn["from"] for turn in record["conversations"]] == [
        "system",
        "human",
        "function_call",
        "observation",
        "gpt",
    ]
    call = json.loads(record["conversations"][2]["value"])
    assert call == {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}} | {
        "id": "call_1"
    }
    assert record["conversations"][3]["tool_call_id"] == "call_1"
    assert isinstance(record["tools"], str)
    assert json.loads(record["tools"])[0]["name"] == "get_weather"  # LLaMA-Factory's flat shape
    assert record["id"] == "weather-1"
    parallel = to_record(load(SHAREGPT)[1], "sharegpt")
    assert [c["name"] for c in json.loads(parallel["conversations"][1]["value"])] == [
        "get_weather",
        "get_time",
    ]


def test_sharegpt_writes_reasoning_as_a_think_block_opening_the_answer():
    record = to_record(load(REASONING)[0], "sharegpt")
    assert record["conversations"][1]["value"] == "<think>\n17*3 = 51.\n</think>\n\n51"


def test_what_sharegpt_cannot_hold_is_refused_with_its_reason(tmp_path):
    written = write_records(load(OPENAI), "sharegpt", tmp_path / "out.jsonl")
    assert written.count == 1
    assert written.refused == [
        (
            f"{OPENAI}:2",
            "an assistant turn that is not trained (weight 0), which sharegpt cannot express: "
            "convert to messages (or openai) instead",
        ),
        (
            f"{OPENAI}:3",
            "messages[3]: a second tool result in a row (parallel calls), which sharegpt cannot "
            "hold (LLaMA-Factory takes one observation per function_call turn): convert to "
            "messages instead",
        ),
        (
            f"{OPENAI}:4",
            "messages[1]: an assistant turn with text beside its tool calls, which sharegpt "
            "cannot hold (LLaMA-Factory's function_call turn holds calls alone): convert to "
            "messages instead",
        ),
    ]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1  # nothing written half


def test_alpaca_refuses_tools_calls_and_reasoning_by_name(tmp_path):
    records = load(XLAM, REASONING)
    written = write_records(records, "alpaca", tmp_path / "out.jsonl")
    assert written.count == 0
    assert [reason for _, reason in written.refused] == [
        "the tools offered (tools), which alpaca cannot hold: convert to messages instead",
        "reasoning (messages[1]), which alpaca cannot hold: convert to messages instead",
        "template options (chat_template_kwargs), which alpaca cannot hold: convert to "
        "messages instead",
    ]


def test_prompt_completion_keeps_calls_tools_and_id_as_trl_lays_them_out():
    record = to_record(load(XLAM)[0], "prompt_completion")
    assert record["prompt"] == "What is the weather in Paris and in Oslo?"
    (completion,) = record["completion"]
    assert [c["function"]["name"] for c in completion["tool_calls"]] == ["get_weather"] * 2
    assert record["id"] == 7 and len(record["tools"]) == 1


def test_a_record_that_would_read_back_changed_is_refused_not_written():
    odd = Conversation(
        Source("x.jsonl", 1), (user("q"), answer("a <think> tag in the middle")), meta={}
    )
    with pytest.raises(DataError, match="would not read back"):
        to_record(odd, "messages")


def test_convert_command_writes_sharegpt_and_names_each_refused_record(tmp_path, capsys):
    from sftforge.cli.main import main

    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as failed:
        main(["data", "convert", str(OPENAI), "--to", "sharegpt", "-o", str(out)])
    assert failed.value.code == 1
    printed = capsys.readouterr().out
    assert "1 records written" in printed
    assert f"not written: {OPENAI}:4: messages[1]: an assistant turn with text" in printed
    assert same(load(out)[0], load(OPENAI)[0])


def test_a_whole_conversation_as_json_keeps_its_tool_calls():
    for conversation in load(OPENAI, XLAM):
        again = conversation_from_json(json.loads(json.dumps(conversation_as_json(conversation))))
        assert again == conversation and again.meta == conversation.meta
        assert all(isinstance(c, ToolCall) for m in again.messages for c in m.tool_calls)


# -- dedup and filter: records written as the input had them; calls tell records apart --------


def with_argument(conversation: Conversation, city: str, line: int) -> Conversation:
    """`conversation` with its first call's city changed, as if read from another line."""
    messages = list(conversation.messages)
    for i, message in enumerate(messages):
        if message.tool_calls:
            first, *others = message.tool_calls
            changed = ToolCall(first.name, first.arguments | {"city": city}, first.id)
            messages[i] = Message(message.role, "", tool_calls=(changed, *others))
            break
    return Conversation(Source("other.jsonl", line), tuple(messages), tools=conversation.tools)


@pytest.mark.parametrize("near", [True, False], ids=["near", "exact-only"])
def test_records_differing_only_in_a_call_argument_are_not_duplicates(near):
    weather = load(OPENAI)[0]
    lyon = with_argument(weather, "Lyon", 1)
    finder = DuplicateFinder(threshold=0.5, near=near)
    assert [finder.keeps(c) for c in (weather, lyon)] == [True, True]
    # ...while a change of one word of text, at the same threshold, is a near duplicate.
    messages = (*weather.messages[:-1], answer("It is 18 °C and sunny in Paris."))
    reworded = Conversation(Source("other.jsonl", 2), messages, tools=weather.tools)
    assert finder.keeps(reworded) is not near


def test_call_arguments_compare_as_json_values_and_reasoning_counts():
    weather = load(OPENAI)[0]
    call = weather.messages[2].tool_calls[0]
    reordered = ToolCall(call.name, {"unit": "celsius", "city": "Paris"}, "call_other_id")
    messages = list(weather.messages)
    messages[2] = calls(reordered)
    same_call = Conversation(Source("other.jsonl", 1), tuple(messages), tools=weather.tools)
    messages[4] = answer(weather.messages[4].content, reasoning="Look it up first.")
    with_reasoning = Conversation(Source("other.jsonl", 2), tuple(messages), tools=weather.tools)
    result = find_duplicates([weather, same_call, with_reasoning], threshold=0.99)
    assert [(str(d.source), d.kind) for d in result.dropped] == [("other.jsonl:1", "exact")]


def test_dedup_command_writes_kept_records_as_the_input_had_them(tmp_path):
    from sftforge.cli.main import main

    for path in (OPENAI, SHAREGPT, XLAM):
        out = tmp_path / f"{path.stem}.jsonl"
        assert main(["data", "dedup", str(path), str(path), "-o", str(out)]) == 0
        assert read_jsonl(out) == read_jsonl(path)  # the second copy dropped, each field kept


def test_filter_command_keeps_and_rejects_records_as_the_input_had_them(tmp_path):
    from sftforge.cli.main import main

    out, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    blocked = ["--response-blocklist", "Rome"]
    assert (
        main(["data", "filter", str(OPENAI), "-o", str(out), "--rejected", str(rejected)] + blocked)
        == 0
    )
    originals = read_jsonl(OPENAI)
    assert read_jsonl(out) == originals[:3]
    (line,) = read_jsonl(rejected)
    assert line["source"] == f"{OPENAI}:4" and line["record"] == originals[3]


def test_kept_records_keep_id_tools_calls_and_reasoning_through_the_library_too(tmp_path):
    conversations = load(OPENAI, keep_records=True)
    sftforge.dedup(OPENAI, tmp_path / "d.jsonl", report=tmp_path / "r.jsonl")
    # A turn that only calls tools has no text: not a response too short.
    result = filter_conversations(conversations, FilterRules(min_response_chars=1))
    assert result.rejected == []
    write_filter(result, tmp_path / "f.jsonl", tmp_path / "rej.jsonl")
    for out in ("d.jsonl", "f.jsonl"):
        records = read_jsonl(tmp_path / out)
        assert [r["id"] for r in records] == ["weather-1", 2, "weather-2", "weather-3"]
        assert records[0]["tools"][0]["function"]["name"] == "get_weather"
        assert records[0]["messages"][2]["tool_calls"][0]["id"] == "call_1"
        assert records[1]["messages"][1]["reasoning_content"] == "Two and two make four."
    # Loaded without the records, conversations are written in the messages format, whole.
    write_conversations(tmp_path / "m.jsonl", load(XLAM))
    assert same(load(tmp_path / "m.jsonl")[0], load(XLAM)[0])


def test_records_of_two_formats_are_not_mixed_in_one_output(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=f"{SHAREGPT}:1: a sharegpt record after messages ones"):
        write_conversations(out, load(OPENAI, SHAREGPT, keep_records=True))
    assert not out.exists()


# -- stats -----------------------------------------------------------------------------------


def test_stats_count_tools_calls_results_and_reasoning(smollm2_tokenizer):
    encoder = text_side(smollm2_tokenizer, "chatml")[0]
    stats = collect_stats(load(*FIXTURES), encoder, max_length=512)
    assert stats.conversations == 10
    assert stats.records_with_tools == 6  # openai 1, 3, 4; sharegpt 1, 2; xlam
    assert (stats.tools_offered, stats.most_tools) == (8, 2)
    assert (stats.tool_calls, stats.calling_turns, stats.tool_results) == (10, 7, 7)
    assert stats.reasoning_turns == 4  # openai 2 (one untrained), reasoning 2 (one empty)
    text = format_stats(stats)
    assert "records offering tools: 6 (60.0%); tools per such record: mean 1.3, max 2" in text
    assert (
        "tool calls: 10 (in 7 assistant turns), tool results: 7, assistant turns with reasoning: 4"
    ) in text


# -- bad input: a DataError naming file:line and field; nothing trained ----------------------

BAD_CASES = [
    (1, "messages[1].tool_calls[0].function.arguments", "JSON"),
    (2, "messages[1].role", "a tool result with no tool call before it"),
    (3, "messages[2].tool_call_id", "tool_call_id 'call_9' answers no call"),
    (4, "tools", "expected a list of function definitions, found object"),
    (5, "tools[0]", "expected a function definition"),
    (6, "messages[0].reasoning_content", "only assistant messages have reasoning"),
    (7, "messages[2].reasoning_content", "found it on a tool message"),
]


@pytest.mark.parametrize(("line", "field", "reason"), BAD_CASES)
def test_bad_tool_data_is_a_data_error_naming_file_line_and_field(tmp_path, line, field, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD.read_text(encoding="utf-8").splitlines()[line - 1] + "\n")
    with pytest.raises(DataError) as raised:
        load(path)
    assert str(raised.value).startswith(f"{path}:1: field '{field}':")
    assert reason in raised.value.reason


def test_every_bad_tool_record_is_rejected_and_none_is_trained():
    loaded = load_conversations(BAD, on_invalid="skip")
    assert loaded.conversations == []
    assert [(r.source, r.reason.split("'")[1]) for r in loaded.rejects] == [
        (f"{BAD}:{line}", field) for line, field, _ in BAD_CASES
    ]


def test_a_participant_name_on_a_user_message_is_carried_to_the_template(tmp_path):
    from sftforge.data.loading import load_conversations

    path = tmp_path / "named.jsonl"
    record = {
        "messages": [
            {"role": "user", "content": "Hi", "name": "ana"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    path.write_text(json.dumps(record) + "\n")
    (conversation,) = load_conversations(str(path)).conversations
    assert conversation.messages[0].name == "ana"
    assert conversation.messages[0].as_template_dict()["name"] == "ana"
