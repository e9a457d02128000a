"""The Python API, `import sftforge`: what the CLI does as functions that take values and give
values back, raise SftforgeError subclasses instead of exiting, and print only when asked.

One LoRA run on the tiny model (records in memory, reported to TensorBoard) is trained once
for the module; loading, generating, evaluating, comparing and merging all use it."""

import importlib
import json
import pkgutil
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sftforge
from sftforge.data.writers import WRITERS
from sftforge.trackers import TrackerMissing

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"
RECORDS = [json.loads(line) for line in DEMO.read_text().splitlines()[:12]]
HELD_OUT = 2
IM_END = "<|im_end|>"  # SmolLM2's ChatML end of turn


def chat(*turns: str) -> dict:
    """A record in the messages format: user, assistant, user, assistant..."""
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]}


def tiny_run(model: str, output_dir: Path, **fields) -> dict:
    """Keyword fields of a LoRA run that takes a second or two on a CPU; lr high enough that
    two steps change the answers."""
    run = {
        "model": model,
        "output_dir": str(output_dir),
        "max_length": 128,
        "training": {"max_steps": 2, "batch_size": 4, "precision": "fp32", "lr": 5e-2},
        "eval": {"held_out": HELD_OUT, "samples": 0, "forgetting": False},
    }
    return run | fields


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> sftforge.TrainResult:
    out = tmp_path_factory.mktemp("api") / "run"
    return sftforge.train(data=RECORDS, report_to=["tensorboard"], **tiny_run(tiny_model_dir, out))


@pytest.fixture(scope="module")
def loaded(run) -> sftforge.LoadedModel:
    return sftforge.load_model(run.output_dir)


# ---- the public names ----------------------------------------------------------------------


def test_every_public_name_is_exported_and_no_submodule_import_replaces_it():
    from sftforge.api import curating, evaluating, inference, running

    names = sftforge.__all__
    assert len(names) == len(set(names))
    namespace: dict = {}
    exec("from sftforge import *", namespace)
    assert {n for n in namespace if n != "__builtins__"} == set(names)
    for module in (curating, evaluating, inference):  # each API module's names are public
        assert set(module.__all__) <= set(names), module.__name__
    assert {"train", "sweep", "demo"} <= set(names)

    before = {name: getattr(sftforge, name) for name in names}
    for found in pkgutil.walk_packages(sftforge.__path__, "sftforge."):
        if not found.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(found.name)
    # A submodule named like a function (sftforge.train vs sftforge.training) would rebind it.
    for name in names:
        assert getattr(sftforge, name) is before[name], name
        assert not isinstance(getattr(sftforge, name), types.ModuleType), name
    assert isinstance(sftforge.train, types.FunctionType)
    assert sftforge.train is running.train


# ---- train ---------------------------------------------------------------------------------


def test_train_on_records_in_memory_gives_the_run_back_as_values(run):
    assert isinstance(run, sftforge.TrainResult)
    out = run.output_dir
    assert (out / "adapter_model.safetensors").is_file() and (out / "sftforge.yaml").is_file()
    assert [row["step"] for row in run.metrics] == [1, 2]
    assert all(row["loss"] > 0 for row in run.metrics)
    assert run.metrics == read_jsonl(out / "metrics.jsonl")
    assert run.final_loss == run.metrics[-1]["loss"]
    assert run.summary["eval_loss_before"] > 0
    assert run.summary["eval_loss_after"] == run.metrics[-1]["eval_loss"]  # measured once
    assert run.data_report["examples"] == len(RECORDS) - HELD_OUT


def test_train_writes_records_in_memory_to_the_run_and_trains_from_that_file(run):
    written = run.output_dir / "data" / "train.jsonl"
    assert read_jsonl(written) == RECORDS
    saved = sftforge.load_config(run.output_dir / "sftforge.yaml")
    assert saved.data.train == str(written)  # the run can be resumed and reproduced from it
    assert sorted(p.name for p in written.parent.iterdir()) == ["train.jsonl"]


def test_train_takes_a_datasets_dataset(tmp_path, tiny_model_dir):
    import datasets

    records = RECORDS[:6]
    fields = tiny_run(tiny_model_dir, tmp_path / "run", training={"max_steps": 1})
    result = sftforge.train(data=datasets.Dataset.from_list(records), **fields)
    assert read_jsonl(result.output_dir / "data" / "train.jsonl") == records
    assert [row["step"] for row in result.metrics] == [1]
    assert result.data_report["examples"] == len(records) - HELD_OUT


def test_a_refused_run_leaves_the_records_a_previous_run_trained_on(run, tiny_model_dir):
    written = run.output_dir / "data" / "train.jsonl"
    other = RECORDS[4:] + [chat("Extract the person as JSON.\n\nAda, 36, Oslo.", "{}")]
    for resume in (None, "auto"):  # a new run there is refused; so is resuming with other data
        fields = tiny_run(tiny_model_dir, run.output_dir, resume=resume)
        with pytest.raises(sftforge.InputError) as caught:
            sftforge.train(data=other, **fields)
        assert read_jsonl(written) == RECORDS, "the earlier run's records were replaced"
        assert "these records differ" in str(caught.value)
    assert sorted(p.name for p in written.parent.iterdir()) == ["train.jsonl"]
    assert not (run.output_dir / "data" / ".train.jsonl.new").exists()


def test_records_replace_those_of_a_run_that_never_trained_or_is_overwritten(
    tmp_path, tiny_model_dir
):
    out = tmp_path / "run"
    written = out / "data" / "train.jsonl"
    bad = {"messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(sftforge.DataError):
        sftforge.train(data=RECORDS[:5] + [bad], **tiny_run(tiny_model_dir, out))
    one_step = {"max_steps": 1, "batch_size": 4, "precision": "fp32"}
    fields = tiny_run(tiny_model_dir, out, training=one_step)
    sftforge.train(data=RECORDS[:6], **fields)  # the record fixed, the same output_dir
    assert read_jsonl(written) == RECORDS[:6]
    sftforge.train(data=RECORDS[6:], overwrite_output_dir=True, **fields)
    assert read_jsonl(written) == RECORDS[6:]


# ---- printing ------------------------------------------------------------------------------


@pytest.mark.quiet
def test_functions_print_nothing_unless_asked(capsys, smollm2_tokenizer_path):
    sftforge.inspect(RECORDS[:2], smollm2_tokenizer_path)
    sftforge.data_stats(RECORDS[:2], smollm2_tokenizer_path, num_proc=1)
    assert capsys.readouterr().out == ""

    sftforge.data_stats(RECORDS[:2], smollm2_tokenizer_path, num_proc=1, verbose=True)
    printed = capsys.readouterr().out
    assert "template: tokenizer" in printed and "conversations: 2" in printed
    sftforge.inspect(RECORDS[:2], smollm2_tokenizer_path, verbose=True)
    assert "template" in capsys.readouterr().out


# ---- errors --------------------------------------------------------------------------------


def test_a_bad_record_in_memory_is_a_data_error_naming_its_row_and_field(smollm2_tokenizer_path):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}
    for call in (
        lambda: sftforge.load_conversations([RECORDS[0], bad]),
        lambda: sftforge.inspect([RECORDS[0], bad], smollm2_tokenizer_path),
    ):
        with pytest.raises(sftforge.DataError) as caught:
            call()
        assert isinstance(caught.value, sftforge.InputError)
        assert isinstance(caught.value, sftforge.SftforgeError)
        assert str(caught.value).startswith("records[row 1]: field 'messages[1].content': missing")


def test_train_names_the_line_of_its_records_file_for_a_bad_record(tmp_path, tiny_model_dir):
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}
    out = tmp_path / "run"
    with pytest.raises(sftforge.DataError) as caught:
        sftforge.train(data=[RECORDS[0], bad], **tiny_run(tiny_model_dir, out))
    where = f"{out / 'data' / 'train.jsonl'}:2"
    assert str(caught.value).startswith(f"{where}: field 'messages[1].content'")
    assert not (out / "metrics.jsonl").exists()


def test_a_bad_config_key_is_a_config_error_naming_the_key(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    fields = tiny_run(tiny_model_dir, out, training={"max_steps": 2, "lrr": 1e-4})
    with pytest.raises(sftforge.ConfigError, match=r"unknown config key 'training\.lrr'"):
        sftforge.train(data=RECORDS, **fields)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(sftforge.ConfigError, match=r"config key 'training\.batch_size'"):
        sftforge.load_config(None, ["training.batch_size=0"], data={"train": "x.jsonl"})


def test_a_missing_data_file_is_an_input_error_naming_the_path(tmp_path, tiny_model_dir):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(sftforge.InputError, match=f"^{missing}: no such file or folder"):
        sftforge.load_conversations(missing)
    out = tmp_path / "run"
    with pytest.raises(sftforge.InputError, match=f"^{missing}: no such file or folder"):
        sftforge.train(data=missing, **tiny_run(tiny_model_dir, out))
    assert not (out / "metrics.jsonl").exists()


# ---- inspect -------------------------------------------------------------------------------


def test_inspect_shows_exactly_the_answers_and_their_end_of_turn_as_trained(
    smollm2_tokenizer_path,
):
    records = [chat("Say hi", "Hello there"), chat("Two?", "2", "Three?", "3")]
    inspection = sftforge.inspect(records, smollm2_tokenizer_path)
    tokenizer = inspection.encoder.tokenizer
    assert inspection.encoder.template.name == "tokenizer"  # SmolLM2's own ChatML
    # What ends an assistant turn, and so is trained after each answer: <|im_end|>, which is
    # also SmolLM2's eos; the newline the template writes after it is not trained.
    assert tokenizer.convert_ids_to_tokens(list(inspection.encoder.stop_ids)) == [IM_END]

    assert [len(group) for group in inspection.examples] == [1, 1]
    for (example,), record in zip(inspection.examples, records, strict=True):
        assert len(example.input_ids) == len(example.labels)
        # A label is its token's id where trained, -100 where not.
        pairs = zip(example.input_ids, example.labels, strict=True)
        assert all(label in (token, -100) for token, label in pairs)
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert inspection.trained_texts(example) == [a + IM_END for a in answers]
        assert tokenizer.decode(example.input_ids).count(IM_END) == len(record["messages"]) + 1

    header, shown = inspection.text(color=False).split("\n", 1)
    assert header == "template: tokenizer; trained tokens shown in [[ ]]"
    assert shown.count("[[") == 3 and shown.count("]]") == 3  # one per assistant turn
    assert "[[Hello| there|<|im_end|>|]]" in shown
    assert "\x1b[" not in shown
    coloured = inspection.text(color=True)
    assert "[[" not in coloured and "\x1b[" in coloured


# ---- trained models ------------------------------------------------------------------------


def test_load_model_answers_with_the_runs_template_and_stop_tokens(loaded, tiny_model_dir):
    assert isinstance(loaded, sftforge.LoadedModel)
    assert loaded.template.name == "tokenizer"
    assert loaded.template.source == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    im_end = loaded.encoder.tokenizer.convert_tokens_to_ids(IM_END)
    assert im_end in loaded.stop_ids

    answer = loaded.generate("hi", max_new_tokens=3)
    assert isinstance(answer, str)
    assert loaded.generate([{"role": "user", "content": "hi"}], max_new_tokens=3) == answer
    answers = loaded.generate(["hi", "Extract the person as JSON.", "hello"], max_new_tokens=3)
    assert isinstance(answers, list) and len(answers) == 3
    assert all(isinstance(a, str) for a in answers)


def test_evaluate_answers_and_scores_one_row_per_record(run, loaded, tmp_path):
    records = RECORDS[:3]
    output = tmp_path / "eval.jsonl"
    evaluation = sftforge.evaluate(loaded, records, scorer="exact", output=output, max_new_tokens=6)
    assert isinstance(evaluation, sftforge.Evaluation) and evaluation.scorer == "exact"
    rows = evaluation.results
    assert [r["source"] for r in rows] == ["records[row 0]", "records[row 1]", "records[row 2]"]
    assert [r["reference"] for r in rows] == [r["messages"][-1]["content"] for r in records]
    prompts = [r["messages"][:-1] for r in records]
    assert [r["answer"] for r in rows] == loaded.generate(prompts, max_new_tokens=6)
    assert isinstance(evaluation.mean_score, float) and 0 <= evaluation.mean_score <= 1
    assert evaluation.mean_score == sum(r["score"] for r in rows) / len(rows)
    assert read_jsonl(output) == rows

    by_path = sftforge.evaluate(str(run.output_dir), records, scorer="exact", max_new_tokens=6)
    assert by_path.results == rows


def test_compare_renders_both_models_with_the_tuned_template(run, loaded, tiny_model_dir):
    records = RECORDS[:3]
    comparison = sftforge.compare(
        tiny_model_dir, run.output_dir, records, scorer="exact", max_new_tokens=6
    )
    assert isinstance(comparison, sftforge.Comparison)
    assert comparison.template == f"the tuned model's own template (from {run.output_dir})"
    rows = comparison.rows
    assert len(rows) == len(records)
    assert all({"base", "tuned", "base_score", "tuned_score"} <= set(row) for row in rows)
    tuned = sftforge.evaluate(loaded, records, scorer="exact", max_new_tokens=6).results
    base = sftforge.evaluate(tiny_model_dir, records, scorer="exact", max_new_tokens=6).results
    assert [r["tuned"] for r in rows] == [r["answer"] for r in tuned]
    assert [r["base"] for r in rows] == [r["answer"] for r in base]
    assert [r["base"] for r in rows] != [r["tuned"] for r in rows], "columns would not show a swap"
    assert comparison.tuned_score == sum(r["tuned_score"] for r in rows) / len(rows)
    assert comparison.base_score == sum(r["base_score"] for r in rows) / len(rows)


def test_merge_writes_a_plain_transformers_model_that_answers_as_the_run(run, loaded, tmp_path):
    out = sftforge.merge(run.output_dir, tmp_path / "merged")
    assert out == tmp_path / "merged"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__module__.startswith("transformers.")
    ids = torch.tensor([loaded.encoder.tokenizer("Extract the person as JSON.").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded.model(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == loaded.template.source


# ---- data ----------------------------------------------------------------------------------


def test_data_stats_counts_the_conversations_and_names_the_template(smollm2_tokenizer_path):
    stats = sftforge.data_stats(RECORDS, smollm2_tokenizer_path, num_proc=1)
    assert stats.conversations == len(RECORDS)
    assert stats.template == "tokenizer"
    assert stats.rejected == 0


def test_dedup_writes_the_records_without_an_exact_repeat(tmp_path):
    records = RECORDS[:4] + [RECORDS[1]]
    result = sftforge.dedup(records, tmp_path / "kept.jsonl")
    assert result.counts["dropped"] == 1 and result.counts["exact"] == 1
    assert read_jsonl(tmp_path / "kept.jsonl") == RECORDS[:4]
    report = read_jsonl(tmp_path / "kept.jsonl.duplicates.jsonl")
    assert len(report) == 1 and "records[row 4]" in json.dumps(report)


def test_filter_data_rejects_a_short_answer_with_its_reason(tmp_path):
    short = chat("Is it on?", "ok")
    rules = sftforge.FilterRules(min_response_chars=5)
    result = sftforge.filter_data(RECORDS[:3] + [short], tmp_path / "kept.jsonl", rules)
    assert result.counts == {"min_response_chars": 1} and result.kept_count == 3
    assert read_jsonl(tmp_path / "kept.jsonl") == RECORDS[:3]
    (rejected,) = read_jsonl(tmp_path / "kept.jsonl.rejected.jsonl")
    assert rejected["source"] == "records[row 3]" and rejected["record"] == short
    assert "2 characters" in rejected["reason"] and "min_response_chars 5" in rejected["reason"]


@pytest.mark.parametrize("to", [w for w in WRITERS if w != "text"])
def test_convert_data_writes_records_that_read_back_as_the_same_conversations(tmp_path, to):
    records = RECORDS[:3]
    loaded, written = sftforge.convert_data(records, tmp_path / "out.jsonl", to=to)
    assert (written.path, written.count, written.refused) == (tmp_path / "out.jsonl", 3, [])
    assert loaded.valid == 3 and read_jsonl(tmp_path / "out.jsonl.rejected.jsonl") == []
    back = sftforge.load_conversations(tmp_path / "out.jsonl").conversations
    before = sftforge.load_conversations(records).conversations
    assert [c.messages for c in back] == [c.messages for c in before]


def test_convert_data_to_raw_text_refuses_each_chat_with_its_reason(tmp_path):
    _, written = sftforge.convert_data(RECORDS[:2], tmp_path / "out.jsonl", to="text")
    assert written.count == 0
    assert written.refused == [(f"records[row {k}]", "a chat, not raw text") for k in range(2)]
    not_written = read_jsonl(tmp_path / "out.jsonl.rejected.jsonl")
    assert [(r["source"], r["reason"], r["record"]) for r in not_written] == [
        (f"records[row {k}]", "a chat, not raw text", RECORDS[k]) for k in range(2)
    ]


# ---- trackers ------------------------------------------------------------------------------


def test_train_reports_every_step_and_the_summary_to_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.output_dir / "tensorboard"), {"scalars": 0})
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(row["step"], pytest.approx(row["loss"])) for row in run.metrics]
    # The summary goes as {"run": summary, "data": data report}, flattened, at the last step.
    last = run.metrics[-1]["step"]
    for tag, value in (
        ("summary/run.eval_loss_before", run.summary["eval_loss_before"]),
        ("summary/run.eval_loss_after", run.summary["eval_loss_after"]),
        ("summary/data.examples", run.data_report["examples"]),
    ):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(last, pytest.approx(value))]


def test_a_tracker_whose_library_is_missing_is_refused_before_training(
    monkeypatch, tmp_path, tiny_model_dir
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    out = tmp_path / "run"
    with pytest.raises(TrackerMissing, match="wandb") as caught:
        sftforge.train(data=RECORDS, report_to=["wandb"], **tiny_run(tiny_model_dir, out))
    assert isinstance(caught.value, sftforge.InputError)
    assert not (out / "metrics.jsonl").exists()
    assert not (out / "adapter_model.safetensors").exists()


def test_a_prompt_of_message_dicts_keeps_tool_calls_and_results_and_names_a_mistake():
    from sftforge.api.inference import _prompt

    prompt = _prompt(
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "x"},
        ],
        (),
    )
    assert [m.role for m in prompt.messages] == ["user", "assistant", "tool"]
    assert [c.name for c in prompt.messages[1].tool_calls] == ["f"]
    with pytest.raises(sftforge.DataError, match=r"messages\[0\].*robot"):
        _prompt([{"role": "robot", "content": "x"}], ())
