"""The field's data formats read directly: Dolly, FLAN, OpenAI chat fine-tuning files (text
parts, weights), Amazon Bedrock conversations, ShareGPT's role names and OpenAssistant message
trees. Fixtures are in tests/data/formats/ (bad records in its bad/ folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sftforge.data.loading import conversation_from_record, detect_format, load_conversations
from sftforge.data.messages import Conversation, DataError, Message, Source
from sftforge.encode.encoder import IGNORE_INDEX, Encoder
from sftforge.encode.parallel import EncodingReport, fit_to_length
from sftforge.models.tokenizer import text_side

FORMATS_DIR = Path(__file__).parent / "data" / "formats"
BAD = FORMATS_DIR / "bad"


def chat(*pairs: tuple[str, str]) -> tuple[Message, ...]:
    return tuple(Message(role, content) for role, content in pairs)


def roles_contents_trained(conversation: Conversation) -> list[tuple[str, str, bool]]:
    return [(m.role, m.content, m.trained) for m in conversation.messages]


# -- Dolly and FLAN ------------------------------------------------------------------------------


def test_dolly_reads_instruction_then_context_and_keeps_the_category():
    result = load_conversations(FORMATS_DIR / "dolly.jsonl")

    assert result.formats == {"dolly": 1}
    first, second, third = result.conversations
    assert first.messages == chat(
        (
            "user",
            "Summarise the note about the lighthouse keeper in one sentence.\n\n"
            "Maren kept the Skarvik light for thirty-one winters. She logged every passing ship "
            "in a green ledger and lit the lamp each evening, even the night the stairs iced over.",
        ),
        (
            "assistant",
            "Maren tended the Skarvik light for thirty-one winters, logging every ship and never "
            "missing a night.",
        ),
    )
    assert second.messages == chat(  # an empty context adds no blank line
        ("user", "Suggest a name for a cafe that only serves soup."),
        ("assistant", "The Ladle Room."),
    )
    assert third.messages[0].content.endswith(
        "\n\nIn the model the class built, Jupiter is a "
        "painted grapefruit, Saturn an orange and Earth a "
        "blueberry."
    )
    assert [c.meta for c in result.conversations] == [
        {"format": "dolly", "category": "summarization"},
        {"format": "dolly", "category": "brainstorming"},
        {"format": "dolly", "category": "closed_qa"},
    ]
    assert all(m.trained for c in result.conversations for m in c.messages)


@pytest.mark.parametrize(
    ("keys", "format"),
    [
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "context", "response", "category"], "dolly"),
        (["instruction", "response"], "dolly"),
        (["inputs", "targets"], "flan"),
        (["inputs", "targets", "task_name", "template_type"], "flan"),
        (["message_id", "parent_id", "role", "text", "rank", "lang"], "oasst"),
        (["messages", "system"], "messages"),
    ],
)
def test_detection_tells_the_new_formats_from_the_old(keys, format):
    assert detect_format(dict.fromkeys(keys, "x")) == format


def test_dolly_mapped_through_columns_still_reads_as_alpaca():
    record = {"instruction": "Q", "context": "", "response": "A", "category": "open_qa"}
    columns = {"instruction": "instruction", "input": "context", "output": "response"}

    assert detect_format(record, columns) == "alpaca"


def test_flan_reads_inputs_as_user_and_targets_as_assistant():
    result = load_conversations(FORMATS_DIR / "flan.jsonl")

    assert result.formats == {"flan": 1}
    assert [c.messages for c in result.conversations] == [
        chat(
            ("user", "Translate to French: The garden gate is open."),
            ("assistant", "Le portail du jardin est ouvert."),
        ),
        chat(
            (
                "user",
                "Is this review positive or negative?\n\n"
                "The bread was stale and the soup arrived cold.",
            ),
            ("assistant", "negative"),
        ),
    ]


# -- OpenAI chat fine-tuning files and Bedrock conversations ------------------------------------


def test_openai_chat_reads_text_parts_and_weights():
    result = load_conversations(FORMATS_DIR / "openai_chat.jsonl")

    assert result.formats == {"messages": 1}
    plain, parts, weighted = result.conversations
    assert roles_contents_trained(plain) == [
        ("system", "You answer questions about knots.", True),
        ("user", "Which knot makes a fixed loop?", True),
        ("assistant", "A bowline.", True),
    ]
    assert roles_contents_trained(parts) == [  # text parts joined with no separator
        ("user", "Name two knots for joining ropes.", True),
        ("assistant", "A sheet bend and a double fisherman's knot.", True),
    ]
    assert roles_contents_trained(weighted) == [
        ("user", "How do I tie a clove hitch?", True),
        ("assistant", "Just wrap it around twice.", False),  # weight 0: context only
        ("user", "That is too vague.", True),
        (
            "assistant",
            "Make two turns around the post, the second crossing over the first, and tuck the "
            "end under that crossing.",
            True,
        ),
    ]


def test_weights_read_from_parquet_where_missing_ones_are_null(tmp_path):
    records = [
        {
            "messages": [
                {"role": "user", "content": "Hi", "weight": None},
                {"role": "assistant", "content": "Hello", "weight": 0},
                {"role": "user", "content": "Again", "weight": None},
                {"role": "assistant", "content": "Hello again", "weight": None},
            ]
        }
    ]
    path = tmp_path / "weights.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)

    (conversation,) = load_conversations(path).conversations

    assert [m.trained for m in conversation.messages] == [True, False, True, True]


def test_bedrock_reads_system_blocks_and_content_blocks():
    result = load_conversations(FORMATS_DIR / "bedrock.jsonl")

    assert result.formats == {"messages": 1}
    assert [c.messages for c in result.conversations] == [
        chat(
            ("system", "You are a terse ship's navigator.\nAnswer in one line."),
            ("user", "How far to the harbour?"),
            ("assistant", "Eleven nautical miles, bearing north-east."),
        ),
        chat(
            ("user", "Is the tide rising?"),
            ("assistant", "Yes, high water at 14:20."),
            ("user", "And the wind?"),
            ("assistant", "Force four from the west."),
        ),
        chat(
            ("system", "Reply in French."),
            ("user", "Good morning."),
            ("assistant", "Bonjour."),
        ),
    ]


def test_an_empty_top_level_system_is_left_out():
    record = {
        "system": [],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    }

    conversation = conversation_from_record(record, Source("x.jsonl", line=1), "auto")

    assert conversation.messages == chat(("user", "Hi"), ("assistant", "Yo"))


# -- ShareGPT's role names ---------------------------------------------------------------------


def test_sharegpt_reads_human_gpt_system_and_user_assistant():
    result = load_conversations(FORMATS_DIR / "sharegpt_roles.jsonl")

    assert result.formats == {"sharegpt": 1}
    assert [c.messages for c in result.conversations] == [
        chat(
            ("system", "You are a patient chess coach."),
            ("user", "Why castle early?"),
            ("assistant", "It tucks the king away and connects the rooks."),
        ),
        chat(
            ("user", "What is a fork?"),
            ("assistant", "One piece attacking two at once."),
            ("user", "Which piece forks best?"),
            ("assistant", "The knight, since it cannot be blocked."),
        ),
        chat(("system", "Be brief."), ("user", "Best first move?"), ("assistant", "e4 or d4.")),
    ]


# -- OpenAssistant trees -----------------------------------------------------------------------

OASST = FORMATS_DIR / "oasst.jsonl"
BALLOON = "The air inside the envelope is heated, so it is less dense than the air around it and the balloon floats."
DAWN_BEST = "The air is calmest just after sunrise, before the ground warms and stirs up gusts."
HAIKU_1 = "Orange bloom on steel\nthe rain keeps its slow promise\nbolts forget their shape"
HAIKU_2 = "Red dust on the gate\nwhere the hinge used to complain\nsilence, then the wind"


def test_oasst_follows_each_trees_best_ranked_path():
    result = load_conversations(OASST)

    assert result.formats == {"oasst": 1}
    balloon, haiku = result.conversations
    assert balloon.messages == chat(
        ("user", "What keeps a hot-air balloon up?"),
        ("assistant", BALLOON),  # rank 0 over rank 1, though later in the file
        ("user", "So why do they usually fly at dawn?"),
        ("assistant", DAWN_BEST),  # ranked before unranked
    )
    assert balloon.meta == {
        "format": "oasst",
        "message_ids": ["t1-prompt", "t1-reply-a", "t1-dawn", "t1-dawn-best"],
        "lang": "en",
    }
    assert str(balloon.source) == f"{OASST}:3"  # the path's last message's line
    # Both haiku unranked: the first in the file wins.
    assert haiku.messages == chat(("user", "Write a haiku about rust."), ("assistant", HAIKU_1))
    assert str(haiku.source) == f"{OASST}:10"


def test_oasst_leaves_out_deleted_subtrees_and_unanswered_prompts_and_counts_them():
    result = load_conversations(OASST)

    assert result.records == 13
    assert len(result.rejects) == 0
    assert dict(result.left_out) == {
        "deleted OpenAssistant messages, with the replies under them": 2,
        "OpenAssistant prompts with no reply": 1,
    }
    summary = result.summary()
    assert "records read: 13" in summary
    assert (
        "left out:     2 (deleted OpenAssistant messages, with the replies under them)" in summary
    )
    ids = [i for c in result.conversations for i in c.meta["message_ids"]]
    assert "t1-reply-gone" not in ids and "t1-gone-follow-up" not in ids


def test_oasst_all_makes_every_path_a_conversation_ending_on_an_assistant_reply():
    result = load_conversations(OASST, format="oasst_all")

    assert result.formats == {"oasst_all": 1}
    assert [c.meta["message_ids"] for c in result.conversations] == [
        ["t1-prompt", "t1-reply-b"],
        ["t1-prompt", "t1-reply-a", "t1-dawn", "t1-dawn-best"],
        ["t1-prompt", "t1-reply-a", "t1-dawn", "t1-dawn-unranked"],
        ["t2-prompt", "t2-haiku-1"],
        ["t2-prompt", "t2-haiku-2"],  # its trailing prompt dropped
    ]
    assert [c.source.line for c in result.conversations] == [2, 3, 6, 10, 11]
    assert result.conversations[-1].messages == chat(
        ("user", "Write a haiku about rust."), ("assistant", HAIKU_2)
    )


def test_oasst_reads_from_parquet_as_from_jsonl(tmp_path):
    records = [json.loads(line) for line in OASST.read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "oasst.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)  # absent ranks become nulls

    from_parquet = load_conversations(path).conversations

    assert [c.messages for c in from_parquet] == [
        c.messages for c in load_conversations(OASST).conversations
    ]
    assert [c.source.row for c in from_parquet] == [2, 9]  # 0-based rows of the last messages


def test_one_oasst_record_alone_is_refused_with_why():
    record = json.loads(OASST.read_text(encoding="utf-8").splitlines()[0])

    with pytest.raises(DataError, match=r"x\.jsonl:1: an OpenAssistant record is one message"):
        conversation_from_record(record, Source("x.jsonl", line=1), "auto")


def test_replies_under_a_rejected_message_are_rejected_at_their_own_lines(tmp_path):
    records = [
        {"message_id": "p", "parent_id": None, "role": "prompter", "text": "Hi"},
        {"message_id": "a", "parent_id": "p", "role": "prompter", "text": "Not a reply"},
        {"message_id": "q", "parent_id": "a", "role": "assistant", "text": "Under it"},
        {"message_id": "x", "parent_id": "y", "role": "assistant", "text": "A cycle"},
        {"message_id": "y", "parent_id": "x", "role": "prompter", "text": "A cycle"},
    ]
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))

    result = load_conversations(path, on_invalid="skip")

    assert result.conversations == []
    assert [(r.source, r.reason.split(":")[0]) for r in result.rejects] == [
        (f"{path}:2", "field 'role'"),
        (f"{path}:3", "field 'parent_id'"),
        (f"{path}:4", "field 'parent_id'"),
        (f"{path}:5", "field 'parent_id'"),
    ]
    assert (
        "replies to a prompter, so it must be from the assistant" in list(result.rejects)[0].reason
    )
    with pytest.raises(DataError, match=rf"{path}:2: field 'role'"):
        load_conversations(path)


# -- bad records: each names its file:line and field ---------------------------------------------

BAD_CASES = {
    "dolly.jsonl": (":2", "field 'response': expected a string, found null"),
    "flan.jsonl": (":2", "field 'targets': expected a string, found list"),
    "openai_image_part.jsonl": (
        ":2",
        "field 'messages[0].content[1]': only text parts are supported, found a part with "
        "type 'image_url'",
    ),
    "openai_weight_half.jsonl": (
        ":2",
        "field 'messages[1].weight': expected 0 (not trained) or 1 (trained), found number (0.5)",
    ),
    "openai_weight_on_user.jsonl": (
        ":2",
        "field 'messages[0].weight': only assistant messages have a weight, found one on a "
        "user message",
    ),
    "openai_nothing_trained.jsonl": (
        ":2",
        "field 'messages': no trained assistant turn: nothing to learn",
    ),
    "bedrock_two_systems.jsonl": (
        ":2",
        "field 'system': a system prompt here and a system message (messages[0].role)",
    ),
    "bedrock_tool_block.jsonl": (
        ":2",
        "field 'messages[1].content[0]': only text parts are supported, found a part with "
        "keys (toolUse)",
    ),
    "sharegpt_bing.jsonl": (":2", "field 'conversations[1].from': unknown role 'bing'"),
    "oasst_orphan.jsonl": (
        ":3",
        "field 'parent_id': 'p-missing' is the message_id of no message in this file",
    ),
    "oasst_bad_role.jsonl": (":2", "field 'role': unknown role 'bot'"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_a_bad_record_names_its_line_and_field(name):
    where, message = BAD_CASES[name]
    path = BAD / name

    with pytest.raises(DataError) as error:
        load_conversations(path)

    assert str(error.value).startswith(f"{path}{where}: {message}")


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_with_skip_only_the_bad_record_is_rejected(name):
    where, message = BAD_CASES[name]
    path = BAD / name

    result = load_conversations(path, on_invalid="skip")

    assert [(r.source, r.reason[: len(message)]) for r in result.rejects] == [
        (f"{path}{where}", message)
    ]
    assert len(result.conversations) == 1


def test_every_fixture_has_a_test():
    assert {p.name for p in BAD.iterdir()} == set(BAD_CASES)


# -- weight 0 in the loss mask -------------------------------------------------------------------

HALF_TRAINED = Conversation(
    Source("weights.jsonl", line=4),
    (
        Message("user", "Hi"),
        Message("assistant", "Hello!", trained=False),
        Message("user", "2+2?"),
        Message("assistant", "4"),
    ),
)


def smollm2_encoder(tokenizer, train_on: str) -> Encoder:
    encoder, _ = text_side(tokenizer, "auto", train_on)
    return encoder


def trained_tokens(encoder: Encoder, labels: list[int]) -> list[str]:
    return [encoder.tokenizer.decode([t]) for t in labels if t != IGNORE_INDEX]


def test_a_weight_0_turn_is_in_the_prompt_and_only_the_second_answer_is_trained(
    smollm2_tokenizer,
):
    encoder = smollm2_encoder(smollm2_tokenizer, "all_assistant_turns")

    example = encoder.encode(HALF_TRAINED)

    assert trained_tokens(encoder, example.labels) == ["4", "<|im_end|>"]
    assert encoder.tokenizer.decode(example.input_ids) == (
        # SmolLM2's own template writes a default system prompt.
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    # The untrained turn is tokenized as at inference too: as the same conversation with
    # both turns trained, less those labels.
    both = Conversation(
        HALF_TRAINED.source, chat(*((m.role, m.content) for m in HALF_TRAINED.messages))
    )
    assert encoder.encode(both).input_ids == example.input_ids


def test_last_assistant_turn_with_weight_0_trains_nothing_and_the_example_is_dropped(
    smollm2_tokenizer,
):
    encoder = smollm2_encoder(smollm2_tokenizer, "last_assistant_turn")
    weighted_last = Conversation(
        HALF_TRAINED.source,
        (*HALF_TRAINED.messages[:3], Message("assistant", "4", trained=False)),
    )

    assert trained_tokens(encoder, encoder.encode(HALF_TRAINED).labels) == ["4", "<|im_end|>"]
    example = encoder.encode(weighted_last)
    assert trained_tokens(encoder, example.labels) == []
    report = EncodingReport()
    assert fit_to_length([example], 512, "drop", report) == []
    assert report.dropped_nothing_trained == ["weights.jsonl:4"]


def test_all_tokens_trains_a_weight_0_turn_too(smollm2_tokenizer):
    encoder = smollm2_encoder(smollm2_tokenizer, "all_tokens")

    example = encoder.encode(HALF_TRAINED)

    assert example.labels == example.input_ids
