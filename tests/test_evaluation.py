"""Held-out split, perplexity, forgetting, eval/compare/chat commands, sweep, on tiny models."""

import io
import json
import math
from pathlib import Path

import pytest
import torch
from run_report import assert_report_shows_the_run

from sftforge.cli.main import main
from sftforge.data.loading import held_out_indices, load_conversations
from sftforge.data.messages import Message
from sftforge.encode.batches import collate
from sftforge.encode.encoder import IGNORE_INDEX, Encoder, Example
from sftforge.encode.templates import resolve_template
from sftforge.evaluation.forgetting import corpus_examples, perplexity
from sftforge.evaluation.generation import mean_token_loss
from sftforge.training.sweep import parse_sweep, recommend

DEMO = Path(__file__).parent.parent / "src/sftforge/assets/demo_train.jsonl"


def test_held_out_split_is_deterministic_and_a_set_of_distinct_indices():
    chosen = held_out_indices(50, 0.2, seed=7)
    assert chosen == held_out_indices(50, 0.2, seed=7)
    assert len(chosen) == len(set(chosen)) == 10 and all(0 <= i < 50 for i in chosen)
    assert held_out_indices(50, 0.2, seed=8) != chosen
    assert len(held_out_indices(50, 3, seed=7)) == 3


@pytest.mark.parametrize("bad", [0, 50, 1.5, 0.0])
def test_held_out_split_refuses_to_leave_nothing(bad):
    with pytest.raises(ValueError, match="held_out"):
        held_out_indices(50, bad, seed=0)


def test_perplexity_of_a_model_that_predicts_uniformly_is_the_vocabulary_size(tiny_model_factory):
    vocab = 300
    model = tiny_model_factory(vocab)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(32, vocab, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0: p = 1/vocab for every token
    examples = [Example([5, 6, 7, 8], [5, 6, 7, 8], "a"), Example([9, 10], [9, 10], "b")]
    assert perplexity(model, examples, torch.device("cpu"), 0) == pytest.approx(vocab, rel=1e-5)


def test_mean_token_loss_matches_a_hand_computed_log_softmax(tiny_model_factory):
    model = tiny_model_factory(200).eval()
    examples = [
        Example([3, 4, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7], "a"),
        Example([8, 9, 10], [IGNORE_INDEX, 9, 10], "b"),
    ]
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0], -1)
            for pos in range(1, len(ex.labels)):
                if ex.labels[pos] != IGNORE_INDEX:
                    total -= float(logp[pos - 1, ex.labels[pos]])
                    count += 1
    ours = mean_token_loss(model, examples, torch.device("cpu"), 0)
    assert count == 5 and ours == pytest.approx(total / count, rel=1e-5)
    assert math.exp(ours) == pytest.approx(perplexity(model, examples, torch.device("cpu"), 0))


def test_bundled_corpus_becomes_one_example_per_paragraph(smollm2_tokenizer):
    encoder = Encoder(smollm2_tokenizer, resolve_template("auto", smollm2_tokenizer))
    examples = corpus_examples(encoder, None, max_length=512)
    assert len(examples) >= 20
    assert all(ex.labels == ex.input_ids for ex in examples)
    assert collate(examples[:2], 0).input_ids.shape[0] == 2


def test_sweep_parses_one_key_with_aliases():
    key, values, rest = parse_sweep(["lr=1e-5,3e-5", "lora.r=8"])
    assert key == "training.lr" and values == [1e-5, 3e-5] and rest == ["lora.r=8"]
    assert parse_sweep(["rank=4,8"])[:2] == ("lora.r", [4, 8])
    with pytest.raises(ValueError, match="exactly one key"):
        parse_sweep(["lr=1e-5,1e-4", "rank=4,8"])


def test_sweep_recommends_accuracy_among_runs_that_did_not_forget():
    rows = [
        {"value": 1e-5, "eval_loss": 0.9, "accuracy": 0.4, "forgetting_ratio": 1.00},
        {"value": 1e-4, "eval_loss": 0.5, "accuracy": 0.8, "forgetting_ratio": 1.02},
        {"value": 1e-3, "eval_loss": 0.4, "accuracy": 0.9, "forgetting_ratio": 1.30},
    ]
    value, reason = recommend(rows)
    assert value == 1e-4
    assert "0.001 forgot too much" in reason and "80.0%" in reason


def test_sweep_without_scorer_recommends_lowest_eval_loss():
    rows = [
        {"value": 1, "eval_loss": 0.9, "accuracy": None, "forgetting_ratio": None},
        {"value": 2, "eval_loss": 0.7, "accuracy": None, "forgetting_ratio": None},
    ]
    assert recommend(rows) == (2, "lowest held-out loss 0.7000")


def small_data(tmp_path, n=12) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(DEMO.read_text().splitlines(keepends=True)[:n]))
    return str(path)


def test_training_run_measures_before_after_and_writes_the_report(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            f"model={tiny_model_dir}",
            f"data.train={small_data(tmp_path, 16)}",
            f"output_dir={out}",
            "eval.held_out=4",
            "eval.every=2",
            "eval.scorer={kind: json}",
            "eval.max_new_tokens=8",
            "eval.samples=2",
            "training.max_steps=4",
            "training.batch_size=4",
            "max_length=128",
        ]
    )
    assert code == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"]["count"] == 4
    assert summary["eval_loss_after"] == rows[-1]["eval_loss"]  # final eval loss measured once
    assert summary["forgetting"]["corpus_ratio"] > 0
    assert len(summary["samples"]) == 2
    assert summary["data"]["held_out"] == 4 and summary["data"]["examples"] == 12
    assert_report_shows_the_run(out)
    shown = capsys.readouterr().err  # each measuring phase has its progress bar
    for phase in ("held-out loss", "generating answers", "corpus", "general prompts", "train"):
        assert f"{phase}:" in shown, phase


def test_eval_command_writes_per_example_results(tmp_path, tiny_model_dir):
    out = tmp_path / "results.jsonl"
    data = small_data(tmp_path, 3)
    code = main(
        [
            "eval",
            tiny_model_dir,
            "--data",
            data,
            "--scorer",
            "json",
            "--output",
            str(out),
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    assert set(rows[0]) == {"source", "prompt", "reference", "answer", "score"}
    assert rows[0]["source"].endswith("data.jsonl:1") and rows[0]["score"] == 0.0


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA run on the tiny model, trained hard enough that its answers change."""
    root = tmp_path_factory.mktemp("tuned")
    code = main(
        [
            "train",
            f"model={tiny_model_dir}",
            f"data.train={small_data(root, 12)}",
            f"output_dir={root / 'run'}",
            "training.max_steps=4",
            "training.batch_size=4",
            "training.lr=5e-2",
            "max_length=128",
            "eval.forgetting=false",
        ]
    )
    assert code == 0
    return root / "run"


def answers_of(model: str, data: str, out: Path) -> list[str]:
    args = ["eval", model, "--data", data, "--output", str(out), "--max-new-tokens", "6"]
    assert main(args) == 0
    return [json.loads(x)["answer"] for x in out.read_text().splitlines()]


def test_compare_puts_the_base_and_the_tuned_answers_in_their_own_columns(
    tmp_path, tiny_model_dir, tuned_run, capsys
):
    data = small_data(tmp_path, 3)
    out = tmp_path / "cmp.jsonl"
    code = main(
        [
            "compare",
            tiny_model_dir,
            str(tuned_run),
            "--data",
            data,
            "--scorer",
            "exact",
            "--output",
            str(out),
            "--max-new-tokens",
            "6",
        ]
    )
    assert code == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    base = answers_of(tiny_model_dir, data, tmp_path / "base.jsonl")
    tuned = answers_of(str(tuned_run), data, tmp_path / "tuned.jsonl")

    assert [r["base"] for r in rows] == base
    assert [r["tuned"] for r in rows] == tuned
    assert base != tuned, "training changed the answers, so swapped columns would show"
    assert [r["reference"] for r in rows] == [
        c.messages[-1].content for c in load_conversations(data).conversations
    ]
    printed = capsys.readouterr().out
    assert "BASE" in printed and "TUNED" in printed and "exact: base" in printed


def test_chat_reads_piped_lines_and_keeps_the_conversation(tiny_model_dir):
    from sftforge.encode.encoder import Encoder
    from sftforge.encode.templates import resolve_template
    from sftforge.evaluation.chat import chat
    from sftforge.models.trained import load_for_inference

    model, tokenizer = load_for_inference(tiny_model_dir)
    encoder = Encoder(tokenizer, resolve_template("auto", tokenizer))
    seen = []
    original = encoder.encode_prompt
    encoder.encode_prompt = lambda history, *rest: seen.append(list(history)) or original(history)
    out = io.StringIO()
    chat(model, encoder, max_new_tokens=3, stdin=io.StringIO("hello\n\nagain\n"), out=out)
    assert [len(h) for h in seen] == [1, 3]  # the second turn sees the first exchange
    assert seen[1][0].content == "hello" and seen[1][2].content == "again"
    assert seen[1][1].role == "assistant"  # the model's first reply is part of the history
    assert out.getvalue().endswith("\n") and "sftforge chat" not in out.getvalue()  # no prompts


def test_sweep_runs_each_value_and_writes_table_plot_and_recommendation(
    tmp_path, tiny_model_dir, capsys
):
    out = tmp_path / "sw"
    code = main(
        [
            "sweep",
            "lr=1e-4,1e-2",
            f"model={tiny_model_dir}",
            f"data.train={small_data(tmp_path, 12)}",
            f"output_dir={out}",
            "eval.held_out=3",
            "eval.samples=0",
            "training.batch_size=4",
            "max_length=128",
            "--steps",
            "2",
        ]
    )
    assert code == 0
    result = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [r["value"] for r in result["rows"]] == [1e-4, 1e-2]
    assert all(r["eval_loss"] > 0 and r["forgetting_ratio"] > 0 for r in result["rows"])
    assert result["recommended"] in (1e-4, 1e-2) and result["reason"]
    assert "<svg" in (out / "sweep" / "sweep.html").read_text()
    assert "recommended training.lr=" in capsys.readouterr().out


def test_compare_renders_the_base_with_the_tuned_models_template_and_says_so(
    tmp_path, untied_sentencepiece_model_dir, capsys
):
    # The base's own template is Llama 2's; the run trained ChatML, adding its tokens.
    run = tmp_path / "run"
    train_args = [f"model={untied_sentencepiece_model_dir}", "template=chatml"]
    train_args += [f"data.train={small_data(tmp_path, 4)}", f"output_dir={run}"]
    train_args += ["training.max_steps=1", "max_length=128", "eval.forgetting=false"]
    assert main(["train", *train_args]) == 0
    data = small_data(tmp_path, 2)
    capsys.readouterr()

    out = tmp_path / "cmp.jsonl"
    args = [untied_sentencepiece_model_dir, str(run), "--data", data, "--output", str(out)]
    assert main(["compare", *args, "--max-new-tokens", "4"]) == 0

    printed = capsys.readouterr().out
    assert f"both models rendered with the tuned model's own template (from {run})" in printed
    base_with_chatml = tmp_path / "base.jsonl"
    eval_args = ["--data", data, "--output", str(base_with_chatml), "--max-new-tokens", "4"]
    assert main(["eval", untied_sentencepiece_model_dir, "--template", "chatml", *eval_args]) == 0
    with_chatml = [json.loads(x)["answer"] for x in base_with_chatml.read_text().splitlines()]
    assert [json.loads(x)["base"] for x in out.read_text().splitlines()] == with_chatml


def test_prompts_that_begin_alike_share_one_cache_and_get_their_answers_alone(
    smollm2_tokenizer, tiny_model_factory
):
    from sftforge.evaluation.generation import Prompt, _common_start, generate_answers
    from sftforge.models.tokenizer import text_side

    torch.manual_seed(0)
    model = tiny_model_factory(len(smollm2_tokenizer), tie=False).eval()
    with torch.no_grad():  # sharp logits and strong attention: answers depend on the prompt
        model.lm_head.weight.mul_(200)
        for name, p in model.named_parameters():
            if name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(20)
    encoder = text_side(smollm2_tokenizer, "auto")[0]
    system = Message("system", "You answer in one short sentence. " * 12)
    questions = ("What is two plus two?", "Name a colour.", "Hi", "Which planet is the largest?")
    prompts = [Prompt([system, Message("user", q)]) for q in questions]
    encoded = [encoder.encode_prompt(p.messages) for p in prompts]
    assert _common_start(encoded) > 60  # the system prompt is computed once

    together = generate_answers(model, encoder, prompts, max_new_tokens=16)

    alone = []
    stops = list(encoder.stop_ids)
    for ids in encoded:  # no cache shared, no padding: plain generate
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=encoder.pad_id,
        )[0, len(ids) :].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        alone.append(smollm2_tokenizer.decode(out[:cut], skip_special_tokens=False))
    assert together == alone
    assert len(set(together)) > 1
